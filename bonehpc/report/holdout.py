"""Report section: the holdout (official valid split) metrics of the final models and the fold ensembles."""

from __future__ import annotations

import pandas as pd

from bonehpc.report.doc import CI_NOTE, LEVELS, METRICS, UNIT_NOTE, Section, _metric_row, ci_wide
from bonehpc.report.experiment import Experiment, holdout_ci
from bonehpc.report.operating_point import final_outside_ensemble

HOLDOUT_PROTOCOL = (
    "Holdout protocol: the final models never see the official valid split while training; a patient-grouped "
    "slice of the train patients is held out of their training and monitors it, and they keep their last epoch "
    "(train.final_epoch=last; with best they select on the slice); the fold models select on their own fold. The "
    "official valid split is evaluated once, by the holdout job, after training. Holdout probabilities are "
    "corrected for the class weights of training; the out-of-fold operating point is in the next section."
)


def selection_notes(exp: Experiment) -> list[tuple[str, str]]:
    """(text, kind) per final run: the epoch-selection record of its metrics.json ("selection"), if any."""
    out = []
    for role in exp.roles:
        r = exp.runs.get(("final", role))
        if r is None or r.state != "completed":
            continue
        sel = r.summary.get("selection")
        if isinstance(sel, dict) and sel:
            desc = ", ".join(f"{k}={v}" for k, v in sel.items() if not isinstance(v, (list, dict)))
            out.append((f"final {role}: epoch selection recorded in metrics.json: {desc}.", "note"))
        else:
            out.append(
                (
                    f"final {role}: its metrics.json records no epoch selection (a run from before the holdout "
                    "protocol); its best epoch may have been chosen on the valid split, so its holdout numbers are "
                    "optimistic.",
                    "missing",
                )
            )
    return out


def section_holdout(exp: Experiment) -> Section:
    sec = Section("Holdout: the official MURA valid split", "holdout")
    sec.p(
        "final_*: one model per role trained on the train patients less a held-out slice. "
        "ensemble_*: the fold models of a role, "
        "their image probabilities averaged. " + HOLDOUT_PROTOCOL
    )
    for text, kind in selection_notes(exp):
        sec.p(text, kind)
    sec.p(UNIT_NOTE, "note")
    rows = []
    for model, (_, m, _, problem) in exp.holdout.items():
        for level in LEVELS:
            if problem:
                rows.append({"model": model, "level": level, "status": problem})
            else:
                rows.append({"model": model, "level": level, "status": "completed", **_metric_row(m, level)})
        if problem:
            sec.p(f"{model}: {problem}", "missing")
        elif exp.holdout[model][2].get("folds_missing"):
            meta = exp.holdout[model][2]
            sec.p(f"{model}: averages folds {meta.get('folds_used')}; folds {meta['folds_missing']} missing", "missing")
    for line in final_outside_ensemble(exp):  # a final model that disagrees with its own fold ensemble
        sec.p(line, "flag")
    df = pd.DataFrame(rows).reindex(columns=["model", "level", "status", "n", "n_pos", *METRICS])
    sec.table(df, "holdout_metrics", "Holdout metrics of the final models and the fold ensembles.")
    ci = holdout_ci(exp)
    if len(ci):
        sec.p(CI_NOTE, "note")
        sec.table(
            ci_wide(ci[ci.body_part == "ALL"], ["model"]),
            "holdout_ci",
            "Study-level holdout metrics with patient-grouped bootstrap 95 % CIs.",
        )
        sec.table(ci, "holdout_ci_long", "Holdout CIs, every body part (machine-readable).", show=False)
    return sec
