"""Image- and study-level metrics against scikit-learn and hand-worked cases, per part, degenerate input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, precision_score, recall_score, roc_auc_score

from bonehpc.metrics import confusion, evaluate_predictions, study_table

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
    assert list(t.columns) == ["study", "body_part", "label", "prob", "n_images"]
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
