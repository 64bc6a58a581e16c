"""Report section: Slurm accounting (sacct) and the submissions of jobs.json."""

from __future__ import annotations

import math

import pandas as pd

from bonehpc.report.doc import Section, _fmt
from bonehpc.report.experiment import Experiment


def failure_lines(acct: pd.DataFrame) -> list[str]:
    """One line per failed task: fold, role, state and the last exception line of its log (bonehpc.accounting's
    "error" column, from bonehpc.resources.task_failure_line)."""
    if "error" not in acct:
        return []
    out = []
    for r in acct.itertuples(index=False):
        err = getattr(r, "error", None)
        if isinstance(err, str) and err.strip():
            out.append(f"{getattr(r, 'fold', '?')} {getattr(r, 'role', '?')} {getattr(r, 'state', '?')}: {err.strip()}")
    return out


def section_slurm(exp: Experiment) -> Section:
    sec = Section("Slurm accounting (sacct)", "slurm")
    if exp.acct is None:
        sec.p(f"Slurm accounting unavailable: {exp.acct_problem}", "missing")
    else:
        df = exp.acct
        gh = pd.to_numeric(df["gpu_hours"], errors="coerce") if "gpu_hours" in df else None
        state = df["state"].astype(str) if "state" in df else pd.Series(dtype=str)
        failed = state[~state.str.upper().str.startswith(("COMPLETED", "RUNNING", "PENDING"))]
        req = pd.to_numeric(df["requeues"], errors="coerce").sum() if "requeues" in df else math.nan
        sec.p(
            f"{len(df)} jobs; states: {', '.join(f'{k} {v}' for k, v in state.value_counts().items()) or 'n/a'}; "
            f"failures (not COMPLETED/RUNNING/PENDING): {len(failed)}; requeues: {_fmt(req)}; "
            f"GPU-hours total: {_fmt(float(gh.sum())) if gh is not None else 'n/a'}."
        )
        sec.table(df, "slurm_jobs", "Per job: state, elapsed, exit code, requeues, node, GPU-hours.")
        for line in failure_lines(df):
            sec.p(line, "missing")
    jobs = exp.paths.jobs
    if jobs.is_file():
        sec.p(f"Submitted jobs (jobs.json):\n{jobs.read_text()[:20000]}", "pre")
    else:
        sec.p("jobs.json not found: nothing was submitted through bonehpc's Slurm path", "note")
    return sec
