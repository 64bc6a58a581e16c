"""Slurm accounting: parse `sacct -P` text, and the per-fold / per-role status table of an experiment.

Text, not `sacct --json`: Slurm 22.05's JSON reports exit code 0 for failed jobs. `-D` keeps one row per
run of a requeued job (REQUEUED / PREEMPTED rows), which is how requeues are counted.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bonehpc.paths import RUN_METRICS, read_json
from bonehpc.registry import latest_tasks, read_registry, registry_tasks
from bonehpc.resources import task_failure_line
from bonehpc.shellsafe import SLURM_JOB_ID_RE

log = logging.getLogger(__name__)

SACCT_FIELDS = (
    "JobID",
    "JobName",
    "State",
    "ExitCode",
    "Elapsed",
    "NodeList",
    "AllocTRES",
    "Start",
    "End",
    "DerivedExitCode",
)
# sacct text written before DerivedExitCode was asked for (saved outputs) still parses
_OLD_FIELDS = len(SACCT_FIELDS) - 1
SACCT_ARGS = ("sacct", "-X", "-D", "-P", "-n", f"--format={','.join(SACCT_FIELDS)}")
REQUEUE_STATES = frozenset({"REQUEUED", "PREEMPTED"})
# A task in one of these states may still finish: never submit its fold/role a second time.
ACTIVE_STATES = frozenset(
    {
        "SUBMITTED",
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SUSPENDED",
        "CONFIGURING",
        "COMPLETING",
        "SIGNALING",
        "STAGE_OUT",
        "RESV_DEL_HOLD",
        "PREEMPTED",
    }
)
# States `bonehpc submit resubmit` reruns.
RETRY_STATES = frozenset({"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})
STATUS_COLUMNS = (
    "fold",
    "role",
    "job_id",
    "task_id",
    "state",
    "elapsed_s",
    "exit_code",
    "signal",
    "exit",
    "requeues",
    "node",
    "gpus",
    "gpu_hours",
    "start",
    "end",
    "metrics",
    "error",
)

_ARRAY_RANGE = re.compile(r"^(\d+)_\[([^\]]+)\]$")


@dataclass
class SacctRow:
    """One sacct row: one run of a job or array task (a requeued task has several)."""

    job_id: str
    """Task id: `123`, `123_4`."""
    name: str
    state: str
    """Base state (COMPLETED, FAILED, CANCELLED, ...); `CANCELLED by 0` -> CANCELLED."""
    exit_code: int | None
    signal: int | None
    elapsed_s: int
    node: str
    gpus: int
    start: str
    end: str
    cancelled_by: str = ""
    """uid that cancelled the job, when State says `CANCELLED by <uid>`."""
    derived_signal: int | None = None
    """Signal of sacct's DerivedExitCode (the highest exit of the job's steps): a step killed by a signal
    when the batch script itself exited normally."""


@dataclass
class TaskRecord:
    """Accounting of one task id: its latest run and how often it was requeued."""

    task_id: str
    runs: list[SacctRow] = field(default_factory=list)

    @property
    def last(self) -> SacctRow:
        return self.runs[-1]

    @property
    def state(self) -> str:
        return self.last.state

    @property
    def requeues(self) -> int:
        """Every run before the current one ended in a requeue (time limit, preemption, node failure,
        scontrol requeue), whatever sacct calls its state."""
        return max(0, len(self.runs) - 1)

    @property
    def elapsed_s(self) -> int:
        """Run time summed over every run of the task."""
        return sum(r.elapsed_s for r in self.runs)

    @property
    def gpu_hours(self) -> float:
        return sum(r.elapsed_s * r.gpus for r in self.runs) / 3600.0


def parse_elapsed(text: str) -> int:
    """Seconds of a Slurm duration: `SS`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`; `INVALID`/empty -> 0."""
    text = text.strip()
    if not text or not text[0].isdigit():
        return 0
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(p) for p in text.split(":")]
        parts += [0] * (3 - len(parts))  # D-HH, D-HH:MM
    else:
        parts = [int(p) for p in text.split(":")]
        parts = [0] * (3 - len(parts)) + parts
    h, m, s = parts
    return ((days * 24 + h) * 60 + m) * 60 + s


def parse_tres_gpus(tres: str) -> int:
    """GPUs in an AllocTRES string (`cpu=2,gres/gpu=2,mem=4G`); typed entries (`gres/gpu:a100=2`) if no total."""
    total = None
    typed = 0
    for item in tres.split(","):
        key, _, val = item.partition("=")
        if key == "gres/gpu":
            total = int(val)
        elif key.startswith("gres/gpu:"):
            typed += int(val)
    return total if total is not None else typed


def expand_array_ids(job_id: str) -> list[str]:
    """`123_[1-3,7%2]` -> [123_1, 123_2, 123_3, 123_7]; anything else -> [job_id]."""
    m = _ARRAY_RANGE.match(job_id)
    if not m:
        return [job_id]
    base, spec = m.group(1), m.group(2).split("%", 1)[0]
    out = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            step = 1
            if ":" in hi:
                hi, st = hi.split(":", 1)
                step = int(st)
            out += [f"{base}_{i}" for i in range(int(lo), int(hi) + 1, step)]
        elif part:
            out.append(f"{base}_{int(part)}")
    return out


def parse_sacct(text: str) -> list[SacctRow]:
    """Rows of `sacct -X -D -P -n --format=<SACCT_FIELDS>`; pending array ranges expand to one row per task.

    Lines that do not have the expected number of fields are skipped with a warning (never an exception).
    """
    rows: list[SacctRow] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) == _OLD_FIELDS:
            parts.append("")
        if len(parts) != len(SACCT_FIELDS):
            log.warning("sacct: skipping a line with %d fields, expected %d: %r", len(parts), len(SACCT_FIELDS), line)
            continue
        job_id, name, state, exit_code, elapsed, node, tres, start, end, derived = parts
        state_words = state.split()
        base_state = state_words[0] if state_words else "UNKNOWN"
        cancelled_by = state_words[2] if len(state_words) >= 3 and state_words[1] == "by" else ""
        code, sig = _exit_pair(exit_code)
        derived_sig = _exit_pair(derived)[1]
        for tid in expand_array_ids(job_id):
            rows.append(
                SacctRow(
                    job_id=tid,
                    name=name,
                    state=base_state,
                    exit_code=code,
                    signal=sig,
                    elapsed_s=parse_elapsed(elapsed),
                    node="" if node in ("None assigned", "(null)") else node,
                    gpus=parse_tres_gpus(tres),
                    start=start if start not in ("Unknown", "None") else "",
                    end=end if end not in ("Unknown", "None") else "",
                    cancelled_by=cancelled_by,
                    derived_signal=derived_sig or None,
                )
            )
    return rows


def _exit_pair(text: str) -> tuple[int | None, int | None]:
    """`2:0` -> (2, 0); anything else -> (None, None)."""
    a, sep, b = text.partition(":")
    return (int(a), int(b)) if sep and a.isdigit() and b.isdigit() else (None, None)


def exit_label(code: int | None, sig: int | None) -> str:
    """`1:0`, `0:12 (USR2)`: sacct's ExitCode with the signal's name ('' when unknown)."""
    if code is None and sig is None:
        return ""
    text = f"{code if code is not None else '?'}:{sig or 0}"
    if sig:
        with contextlib.suppress(ValueError):
            text += f" ({signal.Signals(sig).name.removeprefix('SIG')})"
    return text


def group_rows(rows: Iterable[SacctRow]) -> dict[str, TaskRecord]:
    """Task id -> its runs in sacct's order (the last one is the current run)."""
    out: dict[str, TaskRecord] = {}
    for r in rows:
        out.setdefault(r.job_id, TaskRecord(r.job_id)).runs.append(r)
    return out


def run_sacct(job_ids: Iterable[str], timeout_s: float = 60.0) -> str:
    """Raw `sacct` text for these job ids ('' when sacct is missing or fails: shown as unknown, never fatal)."""
    ids = sorted({str(j).split("_")[0] for j in job_ids if SLURM_JOB_ID_RE.fullmatch(str(j))})  # never an option
    if not ids or not shutil.which("sacct"):
        return ""
    cmd = [*SACCT_ARGS, "-j", ",".join(ids)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("sacct failed: %s", err)
        return ""
    if res.returncode != 0:
        log.warning("sacct exited %d: %s", res.returncode, res.stderr.strip()[:500])
        return ""
    return res.stdout


def query(job_ids: Iterable[str]) -> dict[str, TaskRecord]:
    """Accounting records of every task of these jobs (arrays included)."""
    return group_rows(parse_sacct(run_sacct(job_ids)))


def squeue_states() -> dict[str, str]:
    """Task id -> state of every job the controller holds (covers jobs not yet in accounting)."""
    if not shutil.which("squeue"):
        return {}
    try:
        res = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out: dict[str, str] = {}
    if res.returncode == 0:
        for line in res.stdout.splitlines():
            tid, _, state = line.strip().partition("|")
            for t in expand_array_ids(tid):
                out[t] = state
    return out


def job_states(task_ids: Iterable[str]) -> dict[str, str]:
    """Current state of Slurm task ids (`123`, `123_4`): sacct's latest run, else squeue (a job not yet in
    accounting), else UNKNOWN (in neither; not active, so a task lost with its cluster may run again)."""
    ids = sorted({str(t) for t in task_ids if str(t)})
    if not ids:
        return {}
    records = query(ids)
    live = squeue_states()
    return {t: records[t].state if t in records else live.get(t, "UNKNOWN") for t in ids}


def task_states(registry: dict[str, Any]) -> dict[str, str]:
    """Current state of every task id of a registry (bonehpc.registry): Slurm tasks from `job_states`,
    local/debug tasks the state recorded when they ran."""
    tasks = registry_tasks(registry)
    states = {t["task_id"]: t.get("state", "UNKNOWN") for t in tasks if t["mode"] != "slurm"}
    states.update(job_states(t["task_id"] for t in tasks if t["mode"] == "slurm"))
    return states


def _metrics_status(exp_dir: Path, fold: str, role: str) -> str:
    """status of the run's metrics.json (holdout/outcome.json for the evaluation job); '' when unreadable."""
    path = exp_dir / "holdout" / "outcome.json" if role == "evaluate" else exp_dir / fold / role / RUN_METRICS
    doc = read_json(path)
    return "" if doc is None else str(doc.get("status", "written"))


def _recent(iso: str, seconds: float = 300.0) -> bool:
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        return False
    return (dt.datetime.now(dt.UTC) - when).total_seconds() < seconds


def experiment_status(
    exp_dir: str | Path, records: dict[str, TaskRecord] | None = None, live: dict[str, str] | None = None
) -> pd.DataFrame:
    """One row per fold and role (latest submission of each) plus the evaluation job.

    Columns: STATUS_COLUMNS. Slurm tasks come from sacct (squeue for jobs not yet in accounting, UNKNOWN
    when neither knows them); local/debug tasks carry the state recorded when they ran. `records` and `live`
    replace the sacct and squeue queries (tests, or a caller that already has them).
    """
    exp = Path(exp_dir)
    registry = read_registry(exp)
    latest = latest_tasks(registry)
    slurm_jobs = {t["job_id"] for t in registry_tasks(registry) if t["mode"] == "slurm"}
    if live is None:
        live = squeue_states() if slurm_jobs and records is None else {}
    if records is None:
        records = query(slurm_jobs) if slurm_jobs else {}
    rows: list[dict[str, Any]] = []

    def order(key: tuple[str, str]) -> tuple[int, int, int, str]:
        fold, role = key
        num = fold.removeprefix("fold")
        group = {"pack": 0, "final": 2, "holdout": 3}.get(fold, 1)
        shard = role.removeprefix("shard")
        rank = {"teacher": 0, "outputs": 1, "student": 2}.get(role, 3)
        return (group, int(num) if num.isdigit() else 0, int(shard) if shard.isdigit() else rank, role)

    for (fold, role), task in sorted(latest.items(), key=lambda kv: order(kv[0])):
        tid = task["task_id"]
        row: dict[str, Any] = {c: None for c in STATUS_COLUMNS}
        row.update(fold=fold, role=role, job_id=task["job_id"], task_id=tid, requeues=0, gpus=0, gpu_hours=0.0)
        rec = records.get(tid) if task["mode"] == "slurm" else None
        if rec is not None:
            last = rec.last
            sig = last.signal or last.derived_signal  # a step killed by a signal, the batch shell exiting 0
            row.update(
                state=last.state,
                elapsed_s=rec.elapsed_s,
                exit_code=last.exit_code,
                signal=sig,
                exit=exit_label(last.exit_code, sig),
                requeues=rec.requeues,
                node=last.node,
                gpus=last.gpus,
                gpu_hours=round(rec.gpu_hours, 4),
                start=last.start,
                end=last.end,
            )
        elif task["mode"] == "slurm":
            # not in accounting yet (the controller writes to slurmdbd asynchronously): ask squeue; a job
            # neither knows is SUBMITTED right after submission and UNKNOWN later
            row["state"] = live.get(tid) or ("SUBMITTED" if _recent(task.get("time", "")) else "UNKNOWN")
        else:  # local/debug: what was recorded when the job ran
            row.update(
                state=task.get("state", "UNKNOWN"),
                elapsed_s=task.get("elapsed_s"),
                exit_code=task.get("exit_code"),
                exit="" if task.get("exit_code") is None else f"{task.get('exit_code')}:0",
                node="local",
            )
        row["metrics"] = _metrics_status(exp, fold, role)
        if row["metrics"] == "completed" and row["state"] in RETRY_STATES:
            # the run's files and its Slurm task disagree: say both (the run trained to its end, then the
            # task failed, or another run wrote them); never just "completed" next to FAILED
            row["metrics"] = f"completed, task {row['state']}"
        if row["state"] in RETRY_STATES:  # failures explained: the task's log, else what sacct says
            row["error"] = task.get("error") or failure_line(exp / "submitit", tid, rec)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(STATUS_COLUMNS))


def failure_line(submitit_dir: Path, task_id: str, rec: TaskRecord | None) -> str:
    """Why a task failed: the exception or Slurm error line of its logs (task_failure_line), else the
    signal that killed it, else its state and exit code."""
    line = task_failure_line(submitit_dir, task_id)
    if line or rec is None:
        return line
    last = rec.last
    sig = last.signal or last.derived_signal
    if sig:
        return f"killed by signal {sig} {exit_label(0, sig).partition(' ')[2]}".rstrip()
    if last.state == "NODE_FAIL":
        return "the node failed (NODE_FAIL)"
    return f"{last.state} with exit code {exit_label(last.exit_code, 0)}" if last.exit_code else ""


def status_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The status table as JSON-safe records: missing numbers are null, never NaN."""
    return [
        {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
        for row in df.astype(object).where(df.notna(), None).to_dict(orient="records")
    ]


def totals(df: pd.DataFrame) -> dict[str, Any]:
    """Task counts per state, summed elapsed hours, GPU-hours and requeues of a status table."""
    if df.empty:
        return {"tasks": 0, "states": {}, "elapsed_h": 0.0, "gpu_hours": 0.0, "requeues": 0}
    return {
        "tasks": int(len(df)),
        "states": {str(k): int(v) for k, v in df["state"].value_counts().items()},
        "elapsed_h": round(float(pd.to_numeric(df["elapsed_s"]).fillna(0).sum()) / 3600.0, 4),
        "gpu_hours": round(float(pd.to_numeric(df["gpu_hours"]).fillna(0).sum()), 4),
        "requeues": int(pd.to_numeric(df["requeues"]).fillna(0).sum()),
    }
