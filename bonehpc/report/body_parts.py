"""Report section: study-level Cohen's kappa per body part (the MURA paper's Table 2), with CIs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from bonehpc.report.doc import CI_NOTE, Section, _ci
from bonehpc.report.experiment import Experiment, _evaluate, holdout_ci, oof_ci, oof_predictions, study_level


def _part_kappas(m: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    parts = {}
    for k, v in m.items():
        if k.startswith("study_kappa/"):
            part = k.split("/", 1)[1]
            parts[part] = (v, m.get(f"study_n/{part}", math.nan))
    return parts


def section_body_parts(exp: Experiment) -> Section:
    sec = Section("Study-level Cohen's kappa per body part", "bodyparts")
    sec.p(
        "Shape of the MURA paper's Table 2: one row per study type, kappa at study level (mean of view "
        "probabilities, threshold 0.5). CV columns pool the out-of-fold predictions of all completed folds "
        "(every train study predicted once, by the fold model that did not see it). n = number of studies."
    )
    cols: dict[str, dict[str, tuple[float, float]]] = {}
    studies: dict[str, pd.DataFrame] = {}
    for role in exp.roles:
        oof = oof_predictions(exp, role)
        if oof is not None:
            m = _evaluate(oof)
            cols[f"CV {role} (out-of-fold)"] = {**_part_kappas(m), "ALL": (m["study_kappa"], m["study_n"])}
            studies.setdefault("CV", study_level(oof))
    for model, (preds, m, _, _problem) in exp.holdout.items():
        if preds is not None:
            cols[f"holdout {model}"] = {**_part_kappas(m), "ALL": (m["study_kappa"], m["study_n"])}
            studies.setdefault("holdout", study_level(preds))
    if not cols:
        sec.p("missing: no completed fold and no holdout predictions", "missing")
        return sec
    parts = sorted({p for c in cols.values() for p in c if p != "ALL"}) + ["ALL"]
    rows = []
    for part in parts:
        row: dict[str, Any] = {"body_part": part}
        for where, st in studies.items():
            sub = st if part == "ALL" else st[st.body_part == part]
            row[f"{where} studies (normal/abnormal)"] = f"{int((sub.label == 0).sum())}/{int((sub.label == 1).sum())}"
        for name, c in cols.items():
            row[f"kappa {name}"] = c.get(part, (math.nan, math.nan))[0]
        rows.append(row)
    sec.table(pd.DataFrame(rows), "body_part_kappa", "Study-level Cohen's kappa per body part.")
    ci = part_kappa_ci(exp, parts)
    if len(ci):
        sec.p(CI_NOTE, "note")
        sec.table(ci, "body_part_kappa_ci", "Study-level Cohen's kappa per body part with 95 % CIs.")
    return sec


def part_kappa_ci(exp: Experiment, parts: list[str]) -> pd.DataFrame:
    """Rows body part (ALL last), one "kappa [95 % CI]" column per pooled-CV role and holdout model."""
    cols: dict[str, dict[str, str]] = {}
    for prefix, ci in (("CV (out-of-fold)", oof_ci(exp)), ("holdout", holdout_ci(exp))):
        if not len(ci):
            continue
        k = ci[ci.metric == "kappa"]
        for model, sub in k.groupby("model", sort=False):
            cols[f"kappa {prefix} {model}"] = {
                r.body_part: _ci(r.estimate, r.ci_low, r.ci_high) for r in sub.itertuples(index=False)
            }
    if not cols:
        return pd.DataFrame()
    return pd.DataFrame([{"body_part": p, **{c: v.get(p, "—") for c, v in cols.items()}} for p in parts])
