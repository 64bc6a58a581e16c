"""Report section: ROC, precision-recall, confusion matrices and calibration (study level)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from bonehpc import metrics as M
from bonehpc.constants import THRESHOLD
from bonehpc.report import plots
from bonehpc.report.doc import Section
from bonehpc.report.experiment import Experiment, oof_predictions, study_level


def section_curves(exp: Experiment) -> Section:
    sec = Section("ROC, precision-recall, confusion matrices and calibration (study level)", "curves")
    sec.p("All curves are at study level: study probability = mean of its views' probabilities.", "note")
    sets: dict[str, pd.DataFrame] = {}
    for role in exp.roles:
        done = {
            r.fold: study_level(r.preds) for r in exp.cv_runs(role) if r.state == "completed" and r.preds is not None
        }
        if done:
            sec.figure(
                plots.roc_pr_figure(done, f"{role}: cross-validation, per fold and mean (band: ± 1 std)"),
                f"roc_pr_cv_{role}",
                f"{role}: study-level ROC and precision-recall per fold and their vertical mean.",
            )
            oof = oof_predictions(exp, role)
            assert oof is not None
            sets[f"CV {role} (out-of-fold)"] = study_level(oof)
        else:
            sec.p(f"{role}: no completed fold, no CV curves", "missing")
    hold = {m: study_level(p) for m, (p, _, _, _) in exp.holdout.items() if p is not None}
    if hold:
        sec.figure(
            plots.roc_pr_figure(hold, "holdout (official valid split)", mean_label=None),
            "roc_pr_holdout",
            "Study-level ROC and precision-recall of the holdout models.",
        )
        sets.update({f"holdout {m}": d for m, d in hold.items()})
    else:
        sec.p("holdout: no predictions, no holdout curves", "missing")
    if sets:
        sec.figure(
            plots.confusion_figure(sets, THRESHOLD),
            "confusion",
            "Study-level confusion matrices (abnormal when the mean view probability > 0.5).",
        )
        sec.figure(
            plots.calibration_figure(sets),
            "calibration",
            "Reliability diagram: fraction of abnormal studies per bin of predicted study probability; the legend "
            "gives each set's expected calibration error (ECE, 10 equal-width bins).",
        )
        sec.table(calibration_table(exp, sets), "calibration_ece", "Expected calibration error (study level).")
        calib = M.read_temperatures(exp.root)
        if calib:
            sec.p(
                "Recalibration: one temperature T and bias b per role, fitted on the out-of-fold image predictions of "
                "the fold models (never on the holdout) by `bonehpc evaluate`, saved in "
                f"{M.CALIBRATION_FILE}; `bonehpc predict --calibrate` applies it (p -> sigmoid(logit(p) / T + b)). "
                "The bias moves the out-of-fold mean probability onto the out-of-fold prevalence, so calls at a "
                "fixed 0.5 cut change; the out-of-fold cut is chosen on the scale it is applied on.",
                "note",
            )
        else:
            sec.p(f"no temperature fitted ({M.CALIBRATION_FILE} not found: `bonehpc evaluate` writes it)", "note")
    return sec


def calibration_table(exp: Experiment, sets: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """ECE per prediction set, and for holdout models the ECE after their role's recalibration."""
    temps = M.read_calibration(exp.root)
    rows = []
    for name, st in sets.items():
        row: dict[str, Any] = {
            "predictions": name,
            "studies": len(st),
            "ECE": M.expected_calibration_error(st["label"], st["prob"]),
        }
        model = name.removeprefix("holdout ")
        role = model.split("_", 1)[-1]
        preds = exp.holdout.get(model, (None,))[0]
        if name.startswith("holdout ") and role in temps and preds is not None:
            t, b = temps[role]
            scaled = study_level(preds.assign(prob=M.apply_temperature(preds["prob"].to_numpy(), t, b)))
            row["temperature (fitted out-of-fold)"] = t
            row["bias (fitted out-of-fold)"] = b
            row["ECE after recalibration"] = M.expected_calibration_error(scaled["label"], scaled["prob"])
        rows.append(row)
    return pd.DataFrame(rows).reindex(
        columns=[
            "predictions",
            "studies",
            "ECE",
            "temperature (fitted out-of-fold)",
            "bias (fitted out-of-fold)",
            "ECE after recalibration",
        ]
    )
