"""Report section: the operating point, 0.5 (MURA protocol) and the out-of-fold threshold, with CIs and per body part;
honest probabilities (class-weight correction, mean probability vs prevalence); the final-vs-ensemble check."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from bonehpc import metrics as M
from bonehpc.constants import THRESHOLD
from bonehpc.paths import read_json
from bonehpc.report.doc import CI_NOTE, Section, _ci, ci_wide
from bonehpc.report.experiment import Experiment, _cached, oof_predictions, study_level

OOF_NOTE = (
    "Operating point: the cut of the study probability that maximises study Cohen's kappa on the pooled "
    "out-of-fold predictions of a role's fold models (`bonehpc evaluate`, calibration.json; Youden's J cut also "
    "stored). It is chosen on the train patients only and applied unchanged to the holdout models of the role "
    "(final and ensemble) and by `bonehpc predict`. The CV row at the out-of-fold cut is cross-fitted: each "
    "fold's studies are cut at the threshold chosen on the OTHER folds, so no study scores the cut it chose."
)


def calibration_doc(exp: Experiment) -> dict[str, Any]:
    """calibration.json of the experiment (empty when `bonehpc evaluate` has not run)."""
    return read_json(exp.root / M.CALIBRATION_FILE) or {}


def operating_points(exp: Experiment) -> dict[str, dict[str, Any]]:
    return _cached(exp, "operating_points", lambda: M.read_thresholds(exp.root))


def threshold_sets(exp: Experiment) -> dict[str, pd.DataFrame]:
    """Study tables with a threshold column: "<set> @ 0.5" and "<set> @ oof" for the pooled CV of each role
    (cross-fitted cuts) and each holdout model (its role's cut)."""

    def make() -> dict[str, pd.DataFrame]:
        ops = operating_points(exp)
        out: dict[str, pd.DataFrame] = {}
        for role in exp.roles:
            oof = oof_predictions(exp, role)
            if oof is None:
                continue
            st = study_level(oof)
            out[f"CV {role} @ 0.5"] = st.assign(threshold=THRESHOLD)
            cuts = (ops.get(role) or {}).get("cross_fitted") or {}
            fold_of = oof.drop_duplicates("study").set_index("study")["fold"].str.removeprefix("fold")
            cut = fold_of.reindex(st["study"]).map({f: cuts.get(f, math.nan) for f in set(fold_of)}).to_numpy(float)
            if len(cuts) and not pd.isna(cut).any():
                out[f"CV {role} @ oof (cross-fitted)"] = st.assign(threshold=cut)
        for model, (preds, *_rest) in exp.holdout.items():
            if preds is None:
                continue
            st = study_level(preds)
            out[f"holdout {model} @ 0.5"] = st.assign(threshold=THRESHOLD)
            op = ops.get(model.split("_", 1)[1])
            if op:
                out[f"holdout {model} @ oof {op['value']:.3f}"] = st.assign(threshold=float(op["value"]))
        return out

    return _cached(exp, "threshold_sets", make)


def threshold_ci(exp: Experiment) -> pd.DataFrame:
    sets = threshold_sets(exp)
    return _cached(exp, "threshold_ci", lambda: M.ci_table(sets) if sets else pd.DataFrame())


def points_table(exp: Experiment) -> pd.DataFrame:
    """Per role: the stored cuts, their out-of-fold scores and the probability record of calibration.json."""
    rows = []
    for role, c in (calibration_doc(exp).get("roles") or {}).items():
        op = c.get("threshold") or {}
        shifts = sorted({round(float(v["logit_shift"]), 4) for v in (c.get("prob_correction") or {}).values() if v})
        rows.append(
            {
                "role": role,
                "out-of-fold cut (kappa)": op.get("value"),
                "out-of-fold kappa at it (in-sample)": op.get("kappa"),
                "Youden's J cut": (op.get("youden") or {}).get("value"),
                "cross-fitted cuts": ", ".join(f"{k}: {v:.3f}" for k, v in (op.get("cross_fitted") or {}).items()),
                "class-weight logit shift": ", ".join(map(str, shifts)) or "none recorded",
                "mean probability (out-of-fold images)": c.get("mean_prob"),
                "mean probability before the correction": c.get("mean_prob_uncorrected"),
                "prevalence (out-of-fold images)": c.get("prevalence"),
                "ECE": c.get("ece_before"),
                "ECE before the correction": c.get("ece_uncorrected"),
                "temperature": c.get("temperature"),
                "bias": c.get("bias", 0.0),
            }
        )
    return pd.DataFrame(rows)


def mean_prob_table(exp: Experiment) -> pd.DataFrame:
    """Mean predicted image probability vs prevalence, before the class-weight correction, after it and after the
    out-of-fold recalibration: out-of-fold (the rows the recalibration was fitted on) and each holdout model
    (never used for any fit). The holdout "before" undoes the mean logit shift of the role's fold runs."""
    rows = []
    roles = calibration_doc(exp).get("roles") or {}
    for role, c in roles.items():
        rows.append(
            {
                "predictions": f"out-of-fold {role}",
                "images": c.get("n_images"),
                "prevalence": c.get("prevalence"),
                "before correction": c.get("mean_prob_uncorrected"),
                "after correction": c.get("mean_prob"),
                "after recalibration": c.get("mean_prob_calibrated"),
            }
        )
    for model, (preds, *_rest) in exp.holdout.items():
        c = roles.get(model.split("_", 1)[-1])
        if preds is None or not c or "temperature" not in c:
            continue
        p = preds["prob"].to_numpy(float)
        shifts = [float(v["logit_shift"]) for v in (c.get("prob_correction") or {}).values() if v]
        shift = sum(shifts) / len(shifts) if shifts else 0.0
        rows.append(
            {
                "predictions": f"holdout {model}",
                "images": len(p),
                "prevalence": float(preds["label"].mean()),
                "before correction": float(M.correct_prior(p, -shift).mean()),
                "after correction": float(p.mean()),
                "after recalibration": float(M.apply_temperature(p, c["temperature"], c.get("bias", 0.0)).mean()),
            }
        )
    return pd.DataFrame(rows)


def part_table(ci: pd.DataFrame) -> pd.DataFrame:
    """Rows body part (ALL last), one "kappa [95 % CI]" column per prediction set and cut."""
    k = ci[ci.metric == "kappa"]
    parts = sorted(p for p in k.body_part.unique() if p != "ALL") + ["ALL"]
    cols = {
        name: {r.body_part: _ci(r.estimate, r.ci_low, r.ci_high) for r in sub.itertuples(index=False)}
        for name, sub in k.groupby("model", sort=False)
    }
    return pd.DataFrame([{"body_part": p, **{f"kappa {c}": v.get(p, "—") for c, v in cols.items()}} for p in parts])


def final_outside_ensemble(exp: Experiment) -> list[str]:
    """One line per final model whose holdout study kappa (at 0.5, and at the out-of-fold cut) falls outside the
    bootstrap 95 % CI of its own fold ensemble at the same cut: its epoch selection (or training) went wrong."""
    ci = threshold_ci(exp)
    if not len(ci):
        return []
    k = ci[(ci.metric == "kappa") & (ci.body_part == "ALL")].set_index("model")
    out = []
    for name in k.index:
        if not name.startswith("holdout final_"):
            continue
        model, _, cut = name.removeprefix("holdout ").partition(" @ ")
        ens = f"holdout ensemble_{model.split('_', 1)[1]} @ {cut}"
        if ens not in k.index:
            continue
        est, lo, hi = (float(k.loc[name, "estimate"]), float(k.loc[ens, "ci_low"]), float(k.loc[ens, "ci_high"]))
        if math.isfinite(est) and math.isfinite(lo) and not lo <= est <= hi:
            out.append(
                f"FLAG {model}: holdout study kappa {est:.3f} at {cut} is outside the 95 % CI [{lo:.3f}, {hi:.3f}] "
                f"of its fold ensemble (ensemble_{model.split('_', 1)[1]}): check its epoch selection "
                "(metrics.json 'selection') and learning curve before reporting it."
            )
    return out


def section_operating_point(exp: Experiment) -> Section:
    sec = Section("Operating point: 0.5 (MURA protocol) and the out-of-fold threshold", "operating")
    sec.p(OOF_NOTE)
    sec.p(
        "Probabilities: a model trained with class weights (train.class_weight=auto) has every logit shifted by "
        "log(w_abnormal / w_normal); training records the weights and every prediction (validation, holdout, "
        "predict) is corrected by that shift before calibration, so the mean probability should sit near the "
        "prevalence.",
        "note",
    )
    points = points_table(exp)
    if len(points):
        sec.table(points, "operating_points", "Stored operating points and probability record per role.")
    else:
        sec.p(f"no operating point stored ({M.CALIBRATION_FILE} missing: `bonehpc evaluate` writes it)", "missing")
    means = mean_prob_table(exp)
    if len(means):
        sec.table(
            means,
            "mean_probability",
            "Mean predicted image probability vs prevalence: the model's own (class-weighted) output, after the "
            "log(w1/w0) logit correction, and after the temperature+bias recalibration fitted on the out-of-fold "
            "rows (the out-of-fold rows are its fit: their recalibrated mean equals their prevalence by "
            "construction; the holdout rows are the test).",
        )
    for line in final_outside_ensemble(exp):
        sec.p(line, "flag")
    ci = threshold_ci(exp)
    if not len(ci):
        sec.p("no out-of-fold or holdout predictions: no table", "missing")
        return sec
    sec.p(CI_NOTE, "note")
    sec.table(
        ci_wide(ci[ci.body_part == "ALL"].rename(columns={"model": "predictions @ cut"}), ["predictions @ cut"]),
        "operating_point_ci",
        "Study-level metrics at 0.5 and at the out-of-fold cut, patient-grouped bootstrap 95 % CIs.",
    )
    sec.table(part_table(ci), "operating_point_body_parts", "Study kappa per body part at both cuts, 95 % CIs.")
    sec.table(ci, "operating_point_ci_long", "Every set, cut, body part and metric (machine-readable).", show=False)
    return sec
