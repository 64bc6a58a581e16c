"""Image- and study-level metrics against scikit-learn and hand-worked cases, per part, degenerate input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, precision_score, recall_score, roc_auc_score

from bonehpc.metrics import (
    apply_temperature,
    bootstrap_weights,
    ci_table,
    confusion,
    evaluate_predictions,
    expected_calibration_error,
    fit_temperature,
    paired_diff_table,
    patient_of,
    study_table,
    weighted_metrics,
)

LEVEL_KEYS = ("accuracy", "precision", "recall", "f1", "auroc", "kappa", "n", "n_pos")


def preds(rows: list[tuple[str, str, int, float]]) -> pd.DataFrame:
    """rows of (study, body_part, label, prob) -> a predictions table."""
    df = pd.DataFrame(rows, columns=["study", "body_part", "label", "prob"])
    df.insert(0, "image_id", np.arange(len(df)))
    return df


@pytest.fixture
def case() -> pd.DataFrame:
    return preds(
        [
            ("e1/", "ELBOW", 1, 0.2),  # e1: (.2 + .7 + .9) / 3 = .6 -> positive (label 1: TP)
            ("e1/", "ELBOW", 1, 0.7),
            ("e1/", "ELBOW", 1, 0.9),
            ("e2/", "ELBOW", 0, 0.1),  # e2: .3 -> negative (TN)
            ("e2/", "ELBOW", 0, 0.5),  # exactly 0.5 is negative
            ("e3/", "ELBOW", 0, 0.8),  # e3: .8 -> FP
            ("h1/", "HAND", 1, 0.4),  # h1: .45 -> FN
            ("h1/", "HAND", 1, 0.5),
            ("h2/", "HAND", 0, 0.05),  # h2: TN
            ("h3/", "HAND", 1, 0.95),  # h3: TP
        ]
    )


def test_study_table_aggregates_by_mean(case: pd.DataFrame) -> None:
    t = study_table(case)
    assert list(t.columns) == ["study", "body_part", "label", "prob", "n_images", "pred"]
    assert t.set_index("study")["pred"].to_dict() == {"e1/": 1, "e2/": 0, "e3/": 1, "h1/": 0, "h2/": 0, "h3/": 1}
    e1 = t.set_index("study").loc["e1/"]
    assert e1["prob"] == pytest.approx(0.6) and e1["n_images"] == 3 and e1["label"] == 1
    assert t.set_index("study").loc["h1/", "prob"] == pytest.approx(0.45)
    assert len(t) == 6


def test_image_level_matches_sklearn(case: pd.DataFrame) -> None:
    m = evaluate_predictions(case)
    y, p = case["label"].to_numpy(), case["prob"].to_numpy()
    pred = (p > 0.5).astype(int)
    assert m["image_accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["image_precision"] == pytest.approx(precision_score(y, pred))
    assert m["image_recall"] == pytest.approx(recall_score(y, pred))
    assert m["image_f1"] == pytest.approx(f1_score(y, pred))
    assert m["image_auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["image_kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert (m["image_n"], m["image_n_pos"]) == (10, 6)


def test_study_level_by_hand(case: pd.DataFrame) -> None:
    m = evaluate_predictions(case)
    # studies: TP e1, h3; TN e2, h2; FP e3; FN h1
    assert (m["study_n"], m["study_n_pos"]) == (6, 3)
    assert m["study_accuracy"] == pytest.approx(4 / 6)
    assert m["study_precision"] == pytest.approx(2 / 3)
    assert m["study_recall"] == pytest.approx(2 / 3)
    assert m["study_f1"] == pytest.approx(2 / 3)
    # kappa: po = 4/6, pe = (3/6)(3/6) + (3/6)(3/6) = 1/2 -> (2/3 - 1/2) / (1/2) = 1/3
    assert m["study_kappa"] == pytest.approx(1 / 3)
    # AUROC over study probs: positives .6 .45 .95 vs negatives .3 .8 .05 -> 7 of 9 pairs ranked right
    assert m["study_auroc"] == pytest.approx(7 / 9)
    assert confusion(case, "study") == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    assert confusion(case, "image") == {"tp": 3, "fp": 1, "tn": 3, "fn": 3}


def test_per_body_part(case: pd.DataFrame) -> None:
    m = evaluate_predictions(case)
    # ELBOW studies: e1 (1, .6 -> 1), e2 (0, .3 -> 0), e3 (0, .8 -> 1)
    assert m["study_n/ELBOW"] == 3
    assert m["study_accuracy/ELBOW"] == pytest.approx(2 / 3)
    assert m["study_kappa/ELBOW"] == pytest.approx(cohen_kappa_score([1, 0, 0], [1, 0, 1]))
    assert m["study_auroc/ELBOW"] == pytest.approx(0.5)  # .6 beats .3 but not .8
    # HAND studies: h1 (1, .45 -> 0), h2 (0 -> 0), h3 (1 -> 1)
    assert m["study_n/HAND"] == 3
    assert m["study_kappa/HAND"] == pytest.approx(cohen_kappa_score([1, 0, 1], [0, 0, 1]))
    assert m["study_auroc/HAND"] == pytest.approx(1.0)
    parts = {k.split("/")[1] for k in m if "/" in k}
    assert parts == {"ELBOW", "HAND"}
    for key in LEVEL_KEYS:
        assert f"image_{key}" in m and f"study_{key}" in m


def test_one_class_only_never_crashes() -> None:
    all_negative_right = preds([("a/", "HAND", 0, 0.1), ("b/", "HAND", 0, 0.2), ("c/", "WRIST", 0, 0.3)])
    m = evaluate_predictions(all_negative_right)
    assert math.isnan(m["study_auroc"]) and math.isnan(m["image_auroc"])
    assert math.isnan(m["study_kappa"])  # labels and predictions one and the same class: 0/0
    assert m["study_accuracy"] == 1.0
    assert m["study_precision"] == 0.0 and m["study_recall"] == 0.0 and m["study_f1"] == 0.0
    assert m["study_n_pos"] == 0

    one_wrong = preds([("a/", "HAND", 0, 0.1), ("b/", "HAND", 0, 0.9)])
    m = evaluate_predictions(one_wrong)
    assert math.isnan(m["study_auroc"])
    assert m["study_kappa"] == pytest.approx(cohen_kappa_score([0, 0], [0, 1])) == 0.0

    single = evaluate_predictions(preds([("a/", "ELBOW", 1, 0.7)]))
    assert single["study_n"] == 1 and single["study_accuracy"] == 1.0 and math.isnan(single["study_kappa/ELBOW"])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.drop(columns=["prob"]), "prob"),
        (lambda d: d.iloc[0:0], "empty"),
        (lambda d: d.assign(label=[2] + [0] * (len(d) - 1)), "label"),
        (lambda d: d.assign(prob=[1.5] + [0.1] * (len(d) - 1)), "prob"),
        (lambda d: d.assign(prob=[float("nan")] + [0.1] * (len(d) - 1)), "prob"),
        (lambda d: d.assign(image_id=0), "repeated"),
        (lambda d: d.assign(label=[0] + d["label"].tolist()[1:]), "disagree"),  # e1's images: 0, 1, 1
    ],
)
def test_bad_input_names_the_problem(case: pd.DataFrame, mutate, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate_predictions(mutate(case))


def test_confusion_level_checked(case: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="level"):
        confusion(case, "patient")


def test_study_table_without_labels_is_predicts_aggregation() -> None:
    """predict's new images have no label and no body part: the same function, the same rule."""
    df = pd.DataFrame({"study": ["a/", "a/", "b/"], "prob": [0.4, 0.7, 0.5], "path": ["x", "y", "z"]})
    t = study_table(df)
    assert list(t.columns) == ["study", "prob", "n_images", "pred"]
    assert t["prob"].tolist() == pytest.approx([0.55, 0.5]) and t["pred"].tolist() == [1, 0]


def test_patient_of_mura_paths() -> None:
    s1 = "MURA-v1.1/valid/XR_ELBOW/patient11186/study1_positive/"
    s2 = "MURA-v1.1/valid/XR_HAND/patient11186/study2_negative/"
    assert patient_of(s1) == patient_of(s2) == "valid/patient11186"  # one patient across body parts
    assert patient_of("MURA-v1.1/train/XR_HAND/patient11186/study1_negative/") == "train/patient11186"
    assert patient_of("/data/new/p7/study1/") == "/data/new/p7"


def _random_studies(rng: np.random.Generator, n: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 * y + rng.normal(0.25, 0.25, n), 0, 1)
    return y, (np.round(p, 1) if ties else p)


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_metrics_equal_sklearn_on_repeated_rows(ties: bool) -> None:
    rng = np.random.default_rng(1)
    y, p = _random_studies(rng, 60, ties)
    w = rng.integers(0, 4, (5, 60)).astype(float)
    w[0] = 1.0
    got = weighted_metrics(y, p, w)
    for b in range(5):
        yy, pp = np.repeat(y, w[b].astype(int)), np.repeat(p, w[b].astype(int))
        pred = (pp > 0.5).astype(int)
        assert got["kappa"][b] == pytest.approx(cohen_kappa_score(yy, pred), abs=1e-12)
        assert got["auroc"][b] == pytest.approx(roc_auc_score(yy, pp), abs=1e-12)
        assert got["f1"][b] == pytest.approx(f1_score(yy, pred), abs=1e-12)
        assert got["accuracy"][b] == pytest.approx(accuracy_score(yy, pred), abs=1e-12)


def test_weighted_metrics_undefined_cases() -> None:
    got = weighted_metrics(np.array([0, 0]), np.array([0.1, 0.2]), np.ones((1, 2)))
    assert math.isnan(got["kappa"][0]) and math.isnan(got["auroc"][0]) and got["f1"][0] == 0.0


def test_bootstrap_weights_draw_patients_with_their_studies() -> None:
    groups = ["p1", "p1", "p2", "p3", "p3", "p3"]
    w = bootstrap_weights(groups, n_boot=500, seed=3)
    assert w.shape == (500, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 4]).all() and (w[:, 4] == w[:, 5]).all()
    # three patients drawn per resample
    assert (w[:, 0] + w[:, 2] + w[:, 3] == 3).all()
    assert np.array_equal(w, bootstrap_weights(groups, n_boot=500, seed=3))
    assert not np.array_equal(w, bootstrap_weights(groups, n_boot=500, seed=4))


def _kappa_population(pi: float, flip: float) -> float:
    """Cohen's kappa of a predictor that is wrong with probability `flip` whatever the label (prevalence pi)."""
    po = 1 - flip
    p1 = pi * (1 - flip) + (1 - pi) * flip
    pe = pi * p1 + (1 - pi) * (1 - p1)
    return (po - pe) / (1 - pe)


def test_bootstrap_ci_covers_a_known_kappa_about_95_percent_of_the_time() -> None:
    """Patients with 1-3 studies; a patient is 'hard' (errors likely on all of their studies) or not, so the
    studies of a patient are correlated (what the grouped bootstrap is for). The study-level flip rate is
    q a + (1 - q) b whatever the label, which gives the population kappa in closed form."""
    pi, q, a, b = 0.4, 0.3, 0.45, 0.05
    true_kappa = _kappa_population(pi, q * a + (1 - q) * b)
    reps, covered, widths = 200, 0, []
    for rep in range(reps):
        rng = np.random.default_rng(1000 + rep)
        n_pat = 150
        k = rng.integers(1, 4, n_pat)
        hard = rng.random(n_pat) < q
        pat = np.repeat(np.arange(n_pat), k)
        y = (rng.random(len(pat)) < pi).astype(int)
        flip = rng.random(len(pat)) < np.where(hard[pat], a, b)
        pred = np.where(flip, 1 - y, y)
        p = np.where(pred == 1, 0.8, 0.2)
        t = pd.DataFrame(
            {
                "study": [f"MURA-v1.1/valid/XR_HAND/patient{i}/study{j}_x/" for j, i in enumerate(pat)],
                "body_part": "HAND",
                "label": y,
                "prob": p,
            }
        )
        row = ci_table({"m": t}, n_boot=1000, seed=rep, by_part=False).set_index("metric").loc["kappa"]
        covered += row["ci_low"] <= true_kappa <= row["ci_high"]
        widths.append(row["ci_high"] - row["ci_low"])
    coverage = covered / reps
    # binomial sd at 200 repetitions is 1.5 points; the percentile bootstrap runs slightly under nominal
    assert 0.89 <= coverage <= 0.99, f"coverage {coverage:.3f} (true kappa {true_kappa:.3f})"
    assert 0.05 < np.mean(widths) < 0.4


def test_ci_table_rows_and_the_point_estimate(case: pd.DataFrame) -> None:
    st = study_table(case)
    ci = ci_table({"m": st}, n_boot=200, seed=0)
    assert set(ci["body_part"]) == {"ALL", "ELBOW", "HAND"}
    assert set(ci["metric"]) == {"kappa", "auroc", "f1", "accuracy"}
    allk = ci[(ci.body_part == "ALL") & (ci.metric == "kappa")].iloc[0]
    assert allk["estimate"] == pytest.approx(evaluate_predictions(case)["study_kappa"])
    assert allk["n_studies"] == 6 and allk["n_boot"] == 200
    ok = ci.dropna(subset=["ci_low"])
    assert (ok["ci_low"] <= ok["ci_high"]).all()


def test_paired_difference_of_a_model_with_itself_is_zero_and_sign_is_right() -> None:
    rng = np.random.default_rng(5)
    y, p = _random_studies(rng, 300)
    studies = [f"MURA-v1.1/valid/XR_HAND/patient{i // 2}/study{i}_x/" for i in range(300)]
    good = pd.DataFrame({"study": studies, "body_part": "HAND", "label": y, "prob": p})
    worse = good.assign(prob=np.clip(p + rng.normal(0, 0.3, 300), 0, 1))
    same = paired_diff_table("a", good, "b", good, n_boot=300).set_index("metric")
    assert (same[["estimate", "ci_low", "ci_high"]].abs() < 1e-12).all().all()
    diff = paired_diff_table("good", good, "worse", worse, n_boot=300).set_index("metric")
    assert diff.loc["auroc", "comparison"] == "good − worse"
    assert diff.loc["auroc", "ci_low"] > 0 and diff.loc["auroc", "estimate"] > 0


def test_bootstrap_is_vectorised_enough_for_mura_sizes() -> None:
    import time

    rng = np.random.default_rng(0)
    y, p = _random_studies(rng, 13_000)
    w = bootstrap_weights([str(i // 2) for i in range(13_000)], n_boot=1000)
    t0 = time.perf_counter()
    weighted_metrics(y, p, w)
    assert time.perf_counter() - t0 < 30  # a loop over resamples in Python would still pass; the CPU is shared


def test_expected_calibration_error_by_hand() -> None:
    # bin [0.1, 0.2): p .1 .1, y 0 1 -> |0.5 - 0.1| x 2/4; bin [0.9, 1]: p .9 1.0, y 1 1 -> |1 - .95| x 2/4
    y = np.array([0, 1, 1, 1])
    p = np.array([0.1, 0.1, 0.9, 1.0])
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.4 + 0.5 * 0.05)
    assert expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0


def test_temperature_recovers_an_overconfident_model() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, 20_000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)  # calibrated logits z
    p_overconfident = 1 / (1 + np.exp(-3 * z))
    t = fit_temperature(y, p_overconfident)
    assert t == pytest.approx(3.0, rel=0.1)
    fixed = apply_temperature(p_overconfident, t)
    assert expected_calibration_error(y, fixed) < expected_calibration_error(y, p_overconfident) / 3
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(p_overconfident, 0.0)


# ---------------------------------------------------------------------------------------------- operating point


def test_choose_threshold_is_the_best_cut_by_brute_force() -> None:
    from sklearn.metrics import cohen_kappa_score, roc_curve

    from bonehpc.metrics import choose_threshold

    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.15).astype(int)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.15, 300), 0.001, 0.999).round(3)  # ties on purpose
    t, k = choose_threshold(y, p, "kappa")
    brute = max(cohen_kappa_score(y, (p > c).astype(int)) for c in np.unique(p))
    assert k == pytest.approx(brute) and cohen_kappa_score(y, (p > t).astype(int)) == pytest.approx(brute)
    assert t != 0.5
    tj, j = choose_threshold(y, p, "youden")
    fpr, tpr, _ = roc_curve(y, p)
    assert j == pytest.approx(np.max(tpr - fpr))
    yy = (p > tj).astype(int)
    assert (yy[y == 1].mean() - yy[y == 0].mean()) == pytest.approx(j)
    assert choose_threshold(np.zeros(5), p[:5]) == (0.5, pytest.approx(float("nan"), nan_ok=True))
    with pytest.raises(ValueError, match="threshold method"):
        choose_threshold(y, p, "accuracy")


def test_cross_fitted_threshold_of_a_fold_ignores_that_fold() -> None:
    from bonehpc.metrics import choose_threshold, cross_fitted_thresholds

    rng = np.random.default_rng(0)
    st = pd.DataFrame({"label": rng.integers(0, 2, 200), "fold": np.repeat([0, 1], 100)})
    st["prob"] = np.clip(0.4 * st["label"] + rng.random(200) * 0.6, 0, 1)
    cuts = cross_fitted_thresholds(st)
    for k in (0, 1):
        other = st[st.fold != k]
        assert cuts[k] == choose_threshold(other["label"], other["prob"])[0]
    st.loc[st.fold == 0, "prob"] = 1 - st.loc[st.fold == 0, "prob"]  # fold 0 changes: only fold 1's cut moves
    assert cross_fitted_thresholds(st)[0] == cuts[0] and cross_fitted_thresholds(st)[1] != cuts[1]


def test_logit_shift_undoes_class_weighting() -> None:
    """The minimiser of a class-weighted log loss is q_w = w1 q / (w1 q + w0 (1 - q)); the shift gives q back,
    and with it a mean probability equal to the prevalence."""
    from bonehpc.distill import inverse_frequency_weights
    from bonehpc.metrics import correct_prior, logit_shift, prob_correction_record

    rng = np.random.default_rng(1)
    q = rng.beta(1, 5, 20000)  # calibrated probabilities, prevalence ~0.17
    y = (rng.random(q.size) < q).astype(int)
    w0, w1 = inverse_frequency_weights(y).tolist()
    qw = w1 * q / (w1 * q + w0 * (1 - q))
    assert qw.mean() > y.mean() + 0.15  # what the weighted loss makes of them
    fixed = correct_prior(qw, logit_shift([w0, w1]))
    np.testing.assert_allclose(fixed, q, atol=1e-6)
    assert abs(fixed.mean() - y.mean()) < 0.01
    assert logit_shift(None) == 0.0 and prob_correction_record(None)["logit_shift"] == 0.0
    with pytest.raises(ValueError, match="class weights"):
        logit_shift([1.0, 0.0])


def test_recalibration_bias_puts_the_skewed_mean_on_the_prevalence(tmp_path) -> None:  # noqa: ANN001
    """A small net that overfits is over-confident, so the fixed class-weight shift over-corrects (mean below the
    prevalence); temperature alone cannot move the mean back, temperature + bias (fit_calibration) does."""
    import json

    from bonehpc.metrics import fit_calibration, read_calibration

    rng = np.random.default_rng(3)
    z = rng.normal(-2.2, 1.2, 20000)  # true logits, prevalence ~0.15
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
    p = 1 / (1 + np.exp(-(2.0 * z - 2.0)))  # over-confident and over-corrected
    assert y.mean() - p.mean() > 0.03
    t = fit_temperature(y, p)
    assert abs(apply_temperature(p, t).mean() - y.mean()) > 0.01  # the temperature alone leaves the gap
    t2, b = fit_calibration(y, p)
    assert abs(apply_temperature(p, t2, b).mean() - y.mean()) < 0.01
    assert t2 == pytest.approx(2.0, rel=0.1) and b == pytest.approx(1.0, abs=0.15)
    assert fit_calibration(np.zeros(5, int), np.full(5, 0.3)) == (1.0, 0.0)  # one class: identity
    # a calibration file from before the bias (temperature only) reads as bias 0
    (tmp_path / "calibration.json").write_text(json.dumps({"roles": {"teacher": {"temperature": 1.5}}}))
    assert read_calibration(tmp_path) == {"teacher": (1.5, 0.0)}
