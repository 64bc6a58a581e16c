"""Report section: cross-validation per fold, mean ± std and pooled out-of-fold with CIs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bonehpc.report.doc import CI_NOTE, LEVELS, METRICS, UNIT_NOTE, Section, _ci, _fmt, _metric_row, _pm, ci_wide
from bonehpc.report.experiment import Experiment, oof_ci


def cv_tables(exp: Experiment) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per fold rows, mean/std rows) of the cross-validation, both roles, both levels."""
    rows, summ = [], []
    for role in exp.roles:
        for level in LEVELS:
            vals = []
            for run in exp.cv_runs(role):
                if run.state == "completed":
                    r = _metric_row(run.metrics, level)
                    vals.append(r)
                    rows.append({"role": role, "fold": run.fold, "level": level, "status": "completed", **r})
                else:
                    rows.append({"role": role, "fold": run.fold, "level": level, "status": run.reason})
            for metric in METRICS:
                xs = np.array([v[metric] for v in vals if v[metric] is not None], dtype=float)
                summ.append(
                    {
                        "role": role,
                        "level": level,
                        "metric": metric,
                        "mean": float(np.nanmean(xs)) if xs.size and not np.isnan(xs).all() else math.nan,
                        "std": float(np.nanstd(xs)) if xs.size and not np.isnan(xs).all() else math.nan,
                        "folds": int(xs.size),
                        "of_folds": len(exp.folds),
                    }
                )
    cols = ["role", "fold", "level", "status", "n", "n_pos", *METRICS]
    return pd.DataFrame(rows).reindex(columns=cols), pd.DataFrame(summ)


def _cv_display(
    per_fold: pd.DataFrame, summary: pd.DataFrame, level: str, pooled: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per-fold rows, the mean ± std row and (study level, `pooled` = oof_ci) the pooled out-of-fold row with
    its bootstrap CIs, per role."""
    out = []
    for role in dict.fromkeys(per_fold["role"]):
        sub = per_fold[(per_fold.role == role) & (per_fold.level == level)]
        for _, r in sub.iterrows():
            row = {"model": role, "fold": r["fold"]}
            if r["status"] == "completed":
                row.update({"studies" if level == "study" else "images": _fmt(int(r["n"]))})
                row.update({k: _fmt(r[k]) for k in METRICS})
            else:
                row.update({k: r["status"] if k == "accuracy" else "" for k in METRICS})
            out.append(row)
        s = summary[(summary.role == role) & (summary.level == level)].set_index("metric")
        nf = int(s["folds"].iloc[0]) if len(s) else 0
        row = {"model": role, "fold": f"mean ± std ({nf}/{len(sub)} folds)"}
        row.update({k: _pm(s.loc[k, "mean"], s.loc[k, "std"]) for k in METRICS})
        out.append(row)
        if pooled is not None and len(pooled) and level == "study":
            ci = pooled[(pooled.model == role) & (pooled.body_part == "ALL")].set_index("metric")
            if len(ci):
                row = {
                    "model": role,
                    "fold": "pooled out-of-fold [95 % CI]",
                    "studies": _fmt(int(ci["n_studies"].iloc[0])),
                }
                row.update({k: _ci(*ci.loc[k, ["estimate", "ci_low", "ci_high"]]) for k in ci.index})
                out.append(row)
    unit = "studies" if level == "study" else "images"
    return pd.DataFrame(out).reindex(columns=["model", "fold", unit, *METRICS]).fillna("")


def section_cv(exp: Experiment) -> Section:
    sec = Section("Cross-validation (patient-grouped folds of the official train split)", "cv")
    per_fold, summary = cv_tables(exp)
    sec.p(
        f"{len(exp.folds)} folds; each fold's model is validated on the patients held out of its training. "
        "Every number is recomputed from the run's predictions_val.csv (best checkpoint) with "
        "bonehpc.metrics.evaluate_predictions."
    )
    sec.p(UNIT_NOTE, "note")
    for run in [*exp.cv_runs("teacher"), *exp.cv_runs("student")]:
        if run.state != "completed":
            sec.p(f"{run.label}: {run.reason}", "missing")
        else:
            stored = run.summary.get("metrics", {}).get("val/study_kappa")
            mine = run.metrics.get("study_kappa")
            if stored is not None and mine is not None and not np.isclose(stored, mine, atol=1e-6, equal_nan=True):
                sec.p(
                    f"{run.label}: metrics.json says val/study_kappa={stored:.4f} but its predictions give "
                    f"{mine:.4f} (the table uses the predictions)",
                    "missing",
                )
    for level in LEVELS:
        unit = "studies" if level == "study" else "images"
        sec.table(
            _cv_display(per_fold, summary, level, oof_ci(exp)),
            f"cv_{level}_display",
            f"{level.capitalize()}-level validation metrics per fold (unit: {unit}).",
        )
    pooled = oof_ci(exp)
    if len(pooled):
        sec.p(
            "Pooled out-of-fold: every train study predicted once, by the fold model that did not see it, all folds "
            "scored together (the mean ± std rows above weight the folds equally instead). " + CI_NOTE,
            "note",
        )
        sec.table(
            ci_wide(pooled[pooled.body_part == "ALL"].rename(columns={"model": "role"}), ["role"]),
            "cv_pooled_ci",
            "Study-level pooled out-of-fold metrics with patient-grouped bootstrap 95 % CIs.",
        )
        sec.table(
            pooled, "cv_pooled_ci_long", "Pooled out-of-fold CIs, every body part (machine-readable).", show=False
        )
    sec.table(per_fold, "cv_metrics", "All per-fold numbers (machine-readable).", show=False)
    sec.table(summary, "cv_summary", "Mean and standard deviation over the completed folds.", show=False)
    sec.p("Machine-readable: cv_metrics.csv (every fold, role and level) and cv_summary.csv (mean, std).", "note")
    return sec
