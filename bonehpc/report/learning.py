"""Report section: learning curves and the epochs of every run."""

from __future__ import annotations

import math

import pandas as pd

from bonehpc.report import plots
from bonehpc.report.doc import Section
from bonehpc.report.experiment import Experiment


def section_learning(exp: Experiment) -> Section:
    sec = Section("Learning curves", "learning")
    metric = exp.early_stop_metric
    sec.p(f"Per epoch, from each run's metrics.jsonl. The early-stop metric is {metric} (higher is better).")
    for role in exp.roles:
        runs = [*exp.cv_runs(role), exp.runs[("final", role)]]
        hist = {r.fold: r.history for r in runs if r.history is not None and len(r.history) and "epoch" in r.history}
        if not hist:
            sec.p(f"{role}: no metrics.jsonl found", "missing")
            continue
        sec.figure(plots.learning_curve_figure(hist, metric, role), f"learning_{role}", f"{role}: learning curves.")
        best = []
        for r in runs:
            if r.history is not None and len(r.history):
                best.append(
                    {
                        "run": r.fold,
                        "epochs_run": len(r.history),
                        "best_epoch": r.summary.get("best_epoch"),
                        f"best {metric}": r.history[metric].max() if metric in r.history else math.nan,
                        "train time s": r.history["time_s"].sum() if "time_s" in r.history else math.nan,
                    }
                )
        sec.table(pd.DataFrame(best), f"epochs_{role}", f"{role}: epochs run and best epoch.")
    return sec
