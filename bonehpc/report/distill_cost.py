"""Report section: what distillation costs, the teacher-outputs stage vs the students that read it."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from bonehpc.paths import OUTPUTS_FILE, OUTPUTS_ROLE, RUN_METRICS, read_json
from bonehpc.report.doc import Section
from bonehpc.report.experiment import Experiment


def _acct(exp: Experiment) -> dict[tuple[str, str], dict[str, Any]]:
    """(fold, role) -> the status row (elapsed_s, gpu_hours) of the latest task, when there is accounting."""
    if exp.acct is None or not len(exp.acct):
        return {}
    return {(str(r["fold"]), str(r["role"])): dict(r) for _, r in exp.acct.iterrows()}


def _num(x: Any) -> float:
    v = pd.to_numeric(x, errors="coerce")
    return float(v) if v is not None and not pd.isna(v) else math.nan


def cost_table(exp: Experiment) -> pd.DataFrame:
    """Per fold: the outputs job (task seconds, its own time, img/s, views) and the roles that train after it."""
    acct = _acct(exp)
    rows = []
    for fold in [*(f"fold{k}" for k in exp.folds), "final"]:
        out = read_json(exp.root / fold / OUTPUTS_ROLE / RUN_METRICS) or {}
        row: dict[str, Any] = {"fold": fold}
        for stage in ("teacher", "outputs", "student", "baseline"):
            if stage == "baseline" and not exp.has_baseline:
                continue
            run = exp.runs.get((fold, stage))
            summary = out if stage == "outputs" else (run.summary if run is not None else {})
            task = acct.get((fold, stage), {})
            row[f"{stage} s"] = _num(task.get("elapsed_s", summary.get("time_s")))
            row[f"{stage} GPU-h"] = _num(task.get("gpu_hours"))
        row["outputs views"] = out.get("epochs", 0) * out.get("images_per_epoch", 0) or math.nan
        row["outputs img/s"] = _num(out.get("img_per_s"))
        student = exp.runs.get((fold, "student"))
        row["student teacher logits"] = (student.summary.get("teacher_outputs") if student else None) or "n/a"
        rows.append(row)
    return pd.DataFrame(rows)


def _tune_readers(exp: Experiment) -> int:
    """Tune trial runs (every study of the experiment) that read cached teacher outputs."""
    n = 0
    for metrics in exp.paths.tune.glob(f"**/trials/*/fold*/student/{RUN_METRICS}"):
        n += (read_json(metrics) or {}).get("teacher_outputs") == "cached"
    return n


def section_distill_cost(exp: Experiment) -> Section:
    sec = Section("Distillation cost: teacher outputs vs students", "kdcost")
    distill = exp.raw_cfg.get("distill", {})
    folds = ["final", *(f"fold{k}" for k in exp.folds)]
    if not any((exp.root / f / OUTPUTS_ROLE / OUTPUTS_FILE).is_file() for f in folds):
        mode = distill.get("teacher_outputs", "auto")
        sec.p(
            f"No teacher-outputs stage in this experiment (distill.kind={distill.get('kind')}, "
            f"distill.teacher_outputs={mode}): every distilled student ran the frozen teacher on each step.",
            "note",
        )
        return sec
    df = cost_table(exp)
    gpu = [c for c in df.columns if c.endswith("GPU-h")]
    has_gpu = bool(df[gpu].apply(pd.to_numeric, errors="coerce").fillna(0).to_numpy().sum() > 0)
    if not has_gpu:
        df = df.drop(columns=gpu)
    total = {"fold": "total"}
    total.update({c: df[c].sum(min_count=1) for c in df.columns if c.endswith((" s", "GPU-h", "views"))})
    df = pd.concat([df, pd.DataFrame([total])], ignore_index=True)
    unit = "GPU-hours (sacct) and task seconds" if has_gpu else "task seconds (CPU: no GPU was allocated)"
    sec.p(
        "The outputs job of a fold runs its frozen teacher once, in inference mode, over every training view of "
        "every epoch of the students' schedule (bonehpc.teacher_outputs); the fold's student and every tune trial "
        f"on the fold then read the logits instead of running the teacher. Cost in {unit}: Slurm's elapsed time "
        "per task where there is accounting, else the run's own time (metrics.json time_s)."
    )
    readers = _tune_readers(exp)
    if readers:
        sec.p(f"{readers} tune trial run(s) read these outputs too (their cost is in the tuning section).")
    out_s, st_s = float(df.iloc[-1].get("outputs s", math.nan)), float(df.iloc[-1].get("student s", math.nan))
    if out_s > 0 and st_s > 0:
        sec.p(f"The outputs stage cost {out_s / st_s:.2f}x the students' time it serves (all folds).")
    sec.table(df, "distill_cost", "Per fold: teacher, outputs and student (and baseline) cost; outputs throughput.")
    return sec
