"""The job registry of an experiment: `runs/<exp>/jobs.json` (and `runs/<exp>/tune/jobs.json` for tuning).

One JSON object `{"version", "experiment", "submissions": [entry, ...]}`; an entry is one `bonehpc submit ...`
call, built by `new_entry` only:

    {"kind": folds|resubmit|pack|tune, "time", "mode", "profile", "config_hash", "git_sha", "workdir",
     "skipped": {...}, "jobs": [{"kind", "role", "dependency", "job_id", "tasks": [{"index", "fold",
     "task_id", "state"?, "exit_code"?, "elapsed_s"?}, ...]}, ...], ...kind-specific keys}

Local/debug tasks carry the state they ended in; Slurm tasks are looked up in sacct/squeue
(`bonehpc.accounting`). Torch-free, scheduler-free: readers (status, report, planning) import only this.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bonehpc.config import ConfigError, to_dict
from bonehpc.fsio import atomic_write_json
from bonehpc.paths import JOBS_REGISTRY
from bonehpc.shellsafe import check_dependency, check_job_id

if TYPE_CHECKING:
    from bonehpc.config import ExperimentConfig

REGISTRY_VERSION = 1
MAX_REGISTRY_BYTES = 64 << 20
"""A registry grows by a few KB per submission; a larger file is not one bonehpc wrote."""


def config_hash(cfg: ExperimentConfig) -> str:
    """SHA-256 (first 12 hex digits) of the resolved config."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def git_sha(cwd: str | Path | None = None) -> str:
    """HEAD of the source tree ('+dirty' when tracked files changed), or 'unknown'. The one git lookup."""
    src = Path(cwd) if cwd else Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def read_registry(folder: str | Path) -> dict[str, Any]:
    """`<folder>/jobs.json` ({"submissions": []} when there is none)."""
    path = Path(folder) / JOBS_REGISTRY
    if not path.is_file():
        return {"version": REGISTRY_VERSION, "submissions": []}
    size = path.stat().st_size
    if size > MAX_REGISTRY_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes, more than a job registry may hold ({MAX_REGISTRY_BYTES:,})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); fix or move it away") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deep to be a job registry; fix or move it away") from None
    if not isinstance(data, dict) or not isinstance(data.get("submissions"), list):
        raise ConfigError(f"{path}: expected an object with a 'submissions' list")
    for n, sub in enumerate(data["submissions"]):
        _check_submission(f"{path}: submissions[{n}]", sub)
    return data


def _check_submission(where: str, sub: Any) -> None:
    """One registry entry as bonehpc writes it: its ids reach scancel, sacct and `--dependency=` (bonehpc.shellsafe
    rules), so a hand-edited or foreign jobs.json is refused in one line, never passed on."""
    if not isinstance(sub, dict) or not isinstance(sub.get("jobs", []), list):
        raise ConfigError(f"{where}: expected an object with a 'jobs' list")
    mode = sub.get("mode", "slurm")
    if not isinstance(mode, str) or not isinstance(sub.get("workdir", ""), str):
        raise ConfigError(f"{where}: mode and workdir must be strings")
    slurm = mode == "slurm"
    for j, job in enumerate(sub.get("jobs", [])):
        at = f"{where}.jobs[{j}]"
        if not isinstance(job, dict) or not isinstance(job.get("kind"), str) or not isinstance(job.get("tasks"), list):
            raise ConfigError(f"{at}: expected an object with a 'kind' and a 'tasks' list")
        if "job_id" not in job or not isinstance(job.get("role", ""), str):
            raise ConfigError(f"{at}: no job_id (or a role that is not a string)")
        if job["job_id"] != "":
            check_job_id(f"{at}.job_id", str(job["job_id"]), slurm)
        if slurm and job.get("dependency"):
            check_dependency(f"{at}.dependency", str(job["dependency"]))
        for t, task in enumerate(job["tasks"]):
            if not isinstance(task, dict) or "task_id" not in task:
                raise ConfigError(f"{at}.tasks[{t}]: expected an object with a task_id")
            check_job_id(f"{at}.tasks[{t}].task_id", str(task["task_id"]), slurm)
            if not isinstance(task.get("fold", ""), str):
                raise ConfigError(f"{at}.tasks[{t}].fold: {task['fold']!r} is not a string")


def new_entry(
    kind: str, cfg: ExperimentConfig, *, mode: str, profile: str, workdir: str, jobs: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """The one builder of a registry entry (a submission): who submitted what, from which code and config."""
    return {
        "kind": kind,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "profile": profile,
        "config_hash": config_hash(cfg),
        "git_sha": git_sha(),
        "workdir": workdir,
        "skipped": {},
        **extra,
        "jobs": jobs,
    }


def append_submission(folder: str | Path, experiment: str, entry: dict[str, Any]) -> None:
    """Add `entry` to `<folder>/jobs.json` (created when missing), atomically."""
    registry = read_registry(folder)
    registry.setdefault("version", REGISTRY_VERSION)
    registry.setdefault("experiment", experiment)
    registry["submissions"].append(entry)
    atomic_write_json(Path(folder) / JOBS_REGISTRY, registry, indent=1)


def registry_tasks(registry: dict[str, Any]) -> list[dict[str, Any]]:
    """Every task ever submitted, oldest first: {kind, role, fold, job_id, task_id, mode, submission, state?}."""
    out = []
    for n, sub in enumerate(registry.get("submissions", [])):
        for job in sub.get("jobs", []):
            for task in job.get("tasks", []):
                out.append(
                    {
                        "submission": n,
                        "time": sub.get("time", ""),
                        "mode": sub.get("mode", "slurm"),
                        "kind": job["kind"],
                        "role": job.get("role", ""),
                        "job_id": str(job["job_id"]),
                        **task,
                    }
                )
    return out


def latest_tasks(registry: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """The newest task per (fold name, role); the evaluation job under ("holdout", "evaluate"), pack tasks
    under ("pack", "shard<i>" | "finalize")."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for t in registry_tasks(registry):
        if t["kind"] == "pack":
            key = ("pack", str(t.get("fold", "")))
        else:
            key = (str(t.get("fold", "holdout")), t["role"] or t["kind"])
        latest[key] = t
    return latest
