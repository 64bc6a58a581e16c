"""Report sections: teacher vs student (size, cost, accuracy given up) and what distillation buys."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping
from typing import Any

import pandas as pd

from bonehpc.paths import BEST_CKPT, CORE_ROLES
from bonehpc.report.cv import cv_tables
from bonehpc.report.doc import CI_NOTE, Section, ci_wide, paired_rows
from bonehpc.report.experiment import Experiment, holdout_studies, oof_studies


def _model_entry(exp: Experiment, role: str) -> dict[str, Any]:
    for fold in [*[f"fold{k}" for k in exp.folds], "final"]:
        r = exp.runs[(fold, role)]
        if isinstance(r.summary.get("model"), dict):
            return dict(r.summary["model"])
    return {}


def _first(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def measure_inference(exp: Experiment, role: str) -> dict[str, Any]:
    """Inference img/s of the role's first best.pt, timed here (train runs record params and GFLOPs only)."""
    import torch

    from bonehpc.checkpoint import build_model_from_checkpoint, load_checkpoint
    from bonehpc.models.info import measure_throughput

    ckpts = [exp.runs[(f, role)].path / BEST_CKPT for f in [*(f"fold{k}" for k in exp.folds), "final"]]
    ckpt = next((c for c in ckpts if c.is_file()), None)
    if ckpt is None:
        return {}
    model = build_model_from_checkpoint(load_checkpoint(ckpt))
    size = exp.cfg.data.image_size if exp.cfg else 224
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"{platform.node()} CPU ({os.cpu_count()} cores)"
    ips = measure_throughput(model, size, batch_size=8, device=device, steps=3, warmup=1)
    return {"img_per_s": ips, "device": f"report time, {where}, batch 8, {size} px"}


def section_teacher_student(exp: Experiment) -> Section:
    sec = Section("Teacher vs student", "kd")
    _, summary = cv_tables(exp)
    rows = []
    for role in CORE_ROLES:
        m = _model_entry(exp, role)
        if _first(m, "img_per_s", "infer_img_per_s") is None:
            try:
                m.update(measure_inference(exp, role))
            except Exception as err:  # noqa: BLE001 - a missing or unloadable checkpoint only costs this column
                sec.p(f"{role}: inference speed not measured ({type(err).__name__}: {err})", "note")
        params = _first(m, "params")
        row: dict[str, Any] = {
            "role": role,
            "model": _first(m, "name") or (exp.cfg.role(role).model if exp.cfg else None),
            "params (M)": params / 1e6 if params else math.nan,
            "GFLOPs / image": _first(m, "gflops"),
            "inference img/s": _first(m, "img_per_s", "infer_img_per_s"),
            "measured on": _first(m, "device", "machine"),
        }
        for metric in ("accuracy", "kappa", "auroc"):
            s = summary[(summary.role == role) & (summary.level == "study") & (summary.metric == metric)]
            row[f"CV study {metric} (mean)"] = float(s["mean"].iloc[0]) if len(s) else math.nan
        fm = exp.holdout[f"final_{role}"][1]
        row["holdout final study kappa"] = fm.get("study_kappa", math.nan)
        rows.append(row)
    df = pd.DataFrame(rows)
    num = df.drop(columns=["role", "model", "measured on"]).apply(pd.to_numeric, errors="coerce")
    gap = {"role": "teacher − student", "model": "", "measured on": ""}
    gap.update({c: num[c].iloc[0] - num[c].iloc[1] for c in num.columns})
    df = pd.concat([df, pd.DataFrame([gap])], ignore_index=True)
    sec.p(
        "Parameters and GFLOPs (torch's count, 2 per multiply-add, one image) from the runs' metrics.json "
        "'model' entries (bonehpc.models.info.model_info); inference img/s timed when the report was built, "
        "on the machine named in 'measured on'. "
        "The last row is what the student gives up (positive: the teacher is better or bigger)."
    )
    if df["inference img/s"].isna().iloc[:2].all():
        sec.p("inference img/s: no checkpoint to time (best.pt missing); see `bonehpc bench`", "note")
    speed = pd.to_numeric(df["inference img/s"].iloc[:2], errors="coerce")
    if speed.notna().all() and speed.iloc[0] > 0:
        sec.p(f"The student runs {speed.iloc[1] / speed.iloc[0]:.2f}x the teacher's inference img/s (same machine).")
    distill = exp.raw_cfg.get("distill", {})
    if distill:
        sec.p(f"Distillation: kind={distill.get('kind')}, alpha={distill.get('alpha')}, tau={distill.get('tau')}.")
    sec.table(df, "teacher_vs_student", "Teacher vs student: size, cost and the accuracy/kappa given up.")
    diffs = paired_rows(
        [
            ("CV pooled out-of-fold", "teacher", "student", oof_studies(exp)),
            ("holdout", "final_teacher", "final_student", holdout_studies(exp)),
            ("holdout", "ensemble_teacher", "ensemble_student", holdout_studies(exp)),
        ]
    )
    if len(diffs):
        sec.p(CI_NOTE, "note")
        sec.table(
            ci_wide(diffs, ["comparison"]),
            "teacher_minus_student_ci",
            "Teacher − student, study level, paired bootstrap 95 % CIs (positive: the teacher is better).",
        )
    return sec


def kd_gain_per_fold(exp: Experiment) -> pd.DataFrame:
    """Per fold: study kappa and AUROC of teacher, student (with KD) and baseline (student without KD)."""
    rows = []
    for k in exp.folds:
        row: dict[str, Any] = {"fold": f"fold{k}"}
        for role in ("teacher", "student", "baseline"):
            r = exp.runs.get((f"fold{k}", role))
            for metric in ("kappa", "auroc"):
                done = r is not None and r.state == "completed"
                row[f"{role} {metric}"] = r.metrics.get(f"study_{metric}", math.nan) if r and done else math.nan
        for metric in ("kappa", "auroc"):
            row[f"KD gain {metric} (student − baseline)"] = row[f"student {metric}"] - row[f"baseline {metric}"]
        rows.append(row)
    return pd.DataFrame(rows)


def section_kd_gain(exp: Experiment) -> Section:
    sec = Section("What distillation buys: student without KD vs with KD vs teacher", "kdgain")
    if not exp.has_baseline:
        sec.p(
            "No baseline in this experiment (the student architecture trained without KD, role 'baseline'), so "
            "the value of distillation is not measured here.",
            "note",
        )
        return sec
    sec.p(
        "baseline: the student's architecture and recipe trained without distillation (distill.kind=none) on the "
        "same folds; student: the same with KD from its fold's teacher. Study level."
    )
    sec.table(kd_gain_per_fold(exp), "kd_gain_folds", "Per fold: study kappa and AUROC, and the KD gain.")
    oof, hold = oof_studies(exp), holdout_studies(exp)
    gains = paired_rows(
        [
            ("CV pooled out-of-fold", "student", "baseline", oof),
            ("CV pooled out-of-fold", "teacher", "student", oof),
            ("holdout", "final_student", "final_baseline", hold),
            ("holdout", "ensemble_student", "ensemble_baseline", hold),
        ]
    )
    if len(gains):
        sec.p(CI_NOTE, "note")
        sec.table(
            ci_wide(gains, ["comparison"]),
            "kd_gain_ci",
            "KD gain (student − baseline) and what is left to the teacher (teacher − student), paired bootstrap "
            "95 % CIs.",
        )
    else:
        sec.p("no baseline predictions to compare yet (no completed baseline fold or holdout model)", "missing")
    return sec
