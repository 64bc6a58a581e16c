"""Cluster profiles, submitit executors, the fold job graph (submit_folds, resubmit) and the run registry.

Job graph of one experiment (Slurm mode), all through one submit helper (`_submit`):

    teacher array   index i -> fold i (0..K-1), index K -> "final" (all training patients)
    student array   same index -> fold mapping, --dependency=aftercorr:<teacher array>, so student task i
                    starts when teacher task i succeeded (--kill-on-invalid-dep=yes cancels it otherwise)
    evaluate        --dependency=afterany:<both arrays>: holdout evaluation + report, also when folds failed

Folds already completed (their metrics.json says so) and tasks still pending or running are skipped, so
submitting again is safe. Under cluster.mode local/debug the same graph runs with submitit's local/debug
executor, one job after another in dependency order.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import yaml

from bonehpc.config import ConfigError, ExperimentConfig, _build, load_config, save_config, to_dict
from bonehpc.paths import HOLDOUT_MODELS, ROLES, ExperimentPaths

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).resolve().parents[1] / "slurm" / "clusters"
REGISTRY_VERSION = 1
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
# States `resubmit` reruns.
RETRY_STATES = frozenset({"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})


@dataclass(kw_only=True)
class ResourceSpec:
    """What one job asks the scheduler for (a profile, or a profile's per-kind override)."""

    partition: str = ""
    """Slurm partition (empty: the cluster's default)."""
    account: str = ""
    """Slurm account (empty: the user's default)."""
    qos: str = ""
    """Quality of service (empty: the default)."""
    nodes: int = 1
    """Nodes per task (more than 1: multi-node torchrun, rendezvous on the first node)."""
    gpus_per_node: int = 0
    """GPUs per node (0: CPU-only)."""
    cpus_per_task: int = 2
    """CPU cores per node (one submitit task per node; torchrun starts the ranks)."""
    mem_gb: float = 4.0
    """Memory per node in GB."""
    time_min: int = 60
    """Time limit of one run of the job, minutes (a timed-out job is requeued from its checkpoint)."""
    constraint: str = ""
    """Node feature constraint (--constraint)."""
    signal_delay_s: int = 120
    """USR2 this many seconds before the time limit (the job checkpoints and requeues)."""
    array_parallelism: int = 32
    """Array tasks running at once."""
    max_num_timeout: int = 3
    """Time limits a job may hit and be requeued before it is given up."""
    additional: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch options without the leading dashes ({exclusive: true, reservation: r1})."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job (module load ..., export ...)."""
    python: str = ""
    """Python interpreter of the jobs (empty: the one that submits)."""
    nproc_per_node: int = 0
    """Training processes per node (0: one per GPU, 1 on CPU-only nodes); cluster.nproc_per_node wins."""

    def __post_init__(self) -> None:
        for key in ("nodes", "cpus_per_task", "time_min", "array_parallelism"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)!r}")
        for key in ("gpus_per_node", "signal_delay_s", "max_num_timeout", "nproc_per_node"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)!r}")
        for key, value in self.additional.items():
            if value is False or value is None or isinstance(value, (dict, list)):
                raise ConfigError(
                    f"additional.{key}: {value!r} is not an sbatch option value (use a string, a number or true)"
                )
        if self.mem_gb <= 0:
            raise ConfigError(f"mem_gb: must be > 0, got {self.mem_gb!r}")
        if self.signal_delay_s >= self.time_min * 60:
            raise ConfigError(
                f"signal_delay_s: {self.signal_delay_s} s is not shorter than time_min ({self.time_min} min)"
            )


JOB_KINDS = ("train", "evaluate", "report", "pack")


@dataclass(kw_only=True)
class ClusterProfile(ResourceSpec):
    """A cluster profile (slurm/clusters/<name>.yaml): resources plus per-job-kind overrides."""

    name: str = "dev"
    """Profile name (the file name without .yaml)."""
    per_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Overrides of the resource keys for one job kind (train, evaluate, report, pack)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for kind, over in self.per_kind.items():
            if kind not in JOB_KINDS:
                raise ConfigError(f"per_kind.{kind}: unknown job kind (valid: {', '.join(JOB_KINDS)})")
            self.for_kind(kind)  # validates the keys and values now, naming them
            del over

    def for_kind(self, kind: str) -> ResourceSpec:
        """The resources of one job kind: the profile with its per_kind overrides applied."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(ResourceSpec)}
        over = self.per_kind.get(kind, {})
        try:
            return _build(ResourceSpec, {**base, **over})
        except ConfigError as err:
            raise ConfigError(f"per_kind.{kind}.{err}") from None


def profile_path(name_or_path: str) -> Path:
    """slurm/clusters/<name>.yaml for a bare name, else the path itself."""
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        return Path(name_or_path)
    return PROFILE_DIR / f"{name_or_path}.yaml"


def load_profile(name_or_path: str) -> ClusterProfile:
    """Load and validate a cluster profile; errors name the file and the key."""
    path = profile_path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise ConfigError(f"cluster profile {name_or_path!r} not found at {path} (known profiles: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data.setdefault("name", path.stem)
    try:
        profile: ClusterProfile = _build(ClusterProfile, data)
    except ConfigError as err:
        raise ConfigError(f"cluster profile {path}: {err}") from None
    return profile


def slurm_available() -> bool:
    """True when a Slurm controller answers `sinfo`."""
    if not shutil.which("sinfo"):
        return False
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def resolve_mode(mode: str) -> str:
    """cluster.mode with auto resolved: slurm when `sinfo` answers, else local."""
    if mode == "auto":
        return "slurm" if slurm_available() else "local"
    if mode not in ("slurm", "local", "debug"):
        raise ConfigError(f"cluster.mode: {mode!r} is not one of auto, slurm, local, debug")
    return mode


def executor_parameters(spec: ResourceSpec, name: str, mode: str) -> dict[str, Any]:
    """submitit update_parameters() arguments for one job kind (slurm_* keys only in Slurm mode)."""
    params: dict[str, Any] = {"name": name, "timeout_min": spec.time_min}
    if mode != "slurm":
        return params
    params.update(
        nodes=spec.nodes,
        tasks_per_node=1,  # one task per node; torchrun starts the ranks inside it
        cpus_per_task=spec.cpus_per_task,
        mem_gb=spec.mem_gb,
        slurm_signal_delay_s=spec.signal_delay_s,
        slurm_array_parallelism=spec.array_parallelism,
    )
    if spec.gpus_per_node:
        params["gpus_per_node"] = spec.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(spec, key):
            params[f"slurm_{key}"] = getattr(spec, key)
    if spec.setup:
        params["slurm_setup"] = list(spec.setup)
    if spec.additional:
        params["slurm_additional_parameters"] = dict(spec.additional)
    return params


def make_executor(
    spec: ResourceSpec, folder: str | Path, mode: str, name: str, dependency: str = ""
) -> submitit.AutoExecutor:
    """A submitit executor for one job: Slurm, local (subprocesses) or debug (in-process)."""
    kwargs: dict[str, Any] = {}
    if mode == "slurm":
        kwargs["slurm_max_num_timeout"] = spec.max_num_timeout
        if spec.python:
            kwargs["slurm_python"] = spec.python
    executor = submitit.AutoExecutor(folder=str(folder), cluster=mode, **kwargs)
    params = executor_parameters(spec, name, mode)
    if mode == "slurm" and dependency:
        params["slurm_dependency"] = dependency
        extra = dict(params.get("slurm_additional_parameters", {}))
        # a task whose dependency can never be met is cancelled, so the afterany evaluation still runs
        extra.setdefault("kill_on_invalid_dep", "yes")
        params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor


def render_sbatch(spec: ResourceSpec, folder: str, name: str, dependency: str = "", command: str = "CMD") -> str:
    """The sbatch script submitit would write for a job of this spec (for review and golden tests)."""
    executor = make_executor(spec, folder, "slurm", name, dependency)
    inner = executor._executor
    return inner._make_submission_file_text(command, "UID")  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------
# Registry: runs/<exp>/jobs.json


def config_hash(cfg: ExperimentConfig) -> str:
    """SHA-256 (first 12 hex digits) of the resolved config."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def git_sha(cwd: str | Path | None = None) -> str:
    """HEAD of the source tree ('+dirty' when it has changes), or 'unknown'."""
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


def read_registry(exp_dir: str | Path) -> dict[str, Any]:
    """jobs.json of an experiment ({"submissions": []} when none)."""
    path = Path(exp_dir) / "jobs.json"
    if not path.is_file():
        return {"version": REGISTRY_VERSION, "submissions": []}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); fix or move it away") from None
    if not isinstance(data, dict) or not isinstance(data.get("submissions"), list):
        raise ConfigError(f"{path}: expected an object with a 'submissions' list")
    return data


def _write_registry(exp_dir: Path, data: dict[str, Any]) -> None:
    path = exp_dir / "jobs.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


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
    """The newest task per (fold name, role); the evaluation job under ("holdout", "evaluate")."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for t in registry_tasks(registry):
        if t["kind"] == "pack":
            key = ("pack", str(t.get("fold", "")))
        else:
            key = (str(t.get("fold", "holdout")), t["role"] or t["kind"])
        latest[key] = t
    return latest


# ----------------------------------------------------------------------------------------------
# Planning


def fold_keys(cfg: ExperimentConfig) -> list[int | str]:
    """Array order of the fold graph: 0..K-1, then "final"."""
    return [*range(cfg.data.num_folds), "final"]


def role_completed(paths: ExperimentPaths, fold: int | str, role: str) -> bool:
    """metrics.json of the run exists and says completed."""
    path = paths.role_dir(fold, role) / "metrics.json"
    try:
        return json.loads(path.read_text()).get("status") == "completed"
    except (OSError, json.JSONDecodeError):
        return False


def holdout_done(paths: ExperimentPaths) -> bool:
    """Every holdout model has metrics.json and the report exists."""
    return (
        all((paths.holdout_dir(m) / "metrics.json").is_file() for m in HOLDOUT_MODELS)
        and (paths.report / "index.html").is_file()
    )


def _task_states(registry: dict[str, Any]) -> dict[str, str]:
    """Current state of every registered task id.

    Slurm tasks: sacct, else squeue (a job not yet in accounting), else UNKNOWN (gone from both).
    Local/debug tasks: the state recorded when they ran.
    """
    from bonehpc import accounting

    tasks = registry_tasks(registry)
    states = {t["task_id"]: t.get("state", "UNKNOWN") for t in tasks if t["mode"] != "slurm"}
    slurm_jobs = sorted({t["job_id"] for t in tasks if t["mode"] == "slurm"})
    if slurm_jobs:
        records = accounting.query(slurm_jobs)
        live = accounting.squeue_states()
        for t in tasks:
            if t["mode"] == "slurm":
                rec = records.get(t["task_id"])
                states[t["task_id"]] = rec.state if rec else live.get(t["task_id"], "UNKNOWN")
                # UNKNOWN (in neither) is not active: a task lost with its cluster may be submitted again
    return states


@dataclass
class Plan:
    """What one submission will run: fold keys per role, and the dependencies on earlier tasks."""

    teacher: list[int | str]
    student: list[int | str]
    evaluate: bool
    skipped: dict[str, str]
    """'fold0/teacher' -> why it is not submitted (completed, or the active task id)."""
    active: dict[tuple[str, str], str]
    """(fold name, role) -> task id of a still pending/running task from an earlier submission."""


def plan_folds(cfg: ExperimentConfig, paths: ExperimentPaths, only: set[tuple[str, str]] | None = None) -> Plan:
    """Which (fold, role) to submit: not completed and not pending/running; `only` restricts further."""
    registry = read_registry(paths.root)
    latest = latest_tasks(registry)
    states = _task_states(registry) if latest else {}
    todo: dict[str, list[int | str]] = {r: [] for r in ROLES}
    skipped: dict[str, str] = {}
    active: dict[tuple[str, str], str] = {}
    for fold in fold_keys(cfg):
        fname = paths.role_dir(fold, "teacher").parent.name
        for role in ROLES:
            key = f"{fname}/{role}"
            if role_completed(paths, fold, role):
                skipped[key] = "completed"
                continue
            prev = latest.get((fname, role))
            if prev and states.get(prev["task_id"], "UNKNOWN") in ACTIVE_STATES:
                skipped[key] = f"{states[prev['task_id']].lower()} as {prev['task_id']}"
                active[(fname, role)] = prev["task_id"]
                continue
            if only is not None and (fname, role) not in only:
                skipped[key] = "not selected"
                continue
            todo[role].append(fold)
    # a student whose teacher is rerun reruns too (its teacher changes); an explicit selection is kept as is
    for fold in todo["teacher"] if only is None else []:
        if fold not in todo["student"]:
            fname = paths.role_dir(fold, "teacher").parent.name
            if (fname, "student") not in active:
                todo["student"].append(fold)
                skipped.pop(f"{fname}/student", None)
    order = {f: i for i, f in enumerate(fold_keys(cfg))}
    todo["student"].sort(key=lambda f: order[f])
    prev_eval = latest.get(("holdout", "evaluate"))
    prev_state = states.get(prev_eval["task_id"], "UNKNOWN") if prev_eval else ""
    if todo["teacher"] or todo["student"]:
        need_eval = True
    elif prev_state in ACTIVE_STATES:
        need_eval = False
        skipped["holdout/evaluate"] = f"{prev_state.lower()} as {prev_eval['task_id']}"  # type: ignore[index]
    elif prev_state == "COMPLETED" or (not prev_eval and holdout_done(paths)):
        need_eval = False
        skipped["holdout/evaluate"] = "completed"
    else:
        need_eval = True
    return Plan(todo["teacher"], todo["student"], need_eval, skipped, active)


# ----------------------------------------------------------------------------------------------
# Submission


@dataclass
class SubmitContext:
    """Everything the one submit helper needs."""

    cfg: ExperimentConfig
    paths: ExperimentPaths
    profile: ClusterProfile
    mode: str
    workdir: str
    jobs: list[dict[str, Any]] = field(default_factory=list)


def _submit(
    ctx: SubmitContext,
    kind: str,
    task: Callable[..., Any],
    items: Sequence[Any] | None = None,
    *,
    role: str = "",
    dependency: str = "",
    run_if: Callable[[Any], bool] | None = None,
) -> dict[str, Any]:
    """THE submit path of every job kind: one job, or an array over `items`; records it in ctx.jobs.

    Slurm: returns at once (the scheduler orders jobs by `dependency`). Local/debug: runs the jobs now,
    one after another, skipping an item whose `run_if(item)` is false (its dependency failed).
    """
    spec = ctx.profile.for_kind(kind)
    name = f"{ctx.cfg.name}-{role or kind}"
    executor = make_executor(spec, ctx.paths.submitit / "%j", ctx.mode, name, dependency)
    record: dict[str, Any] = {"kind": kind, "role": role, "dependency": dependency, "tasks": []}
    if ctx.mode == "slurm":
        if items is None:
            job = executor.submit(task)
            record["job_id"] = job.job_id
            record["tasks"].append({"task_id": job.job_id})
        else:
            jobs = executor.map_array(task, list(items))
            record["job_id"] = jobs[0].job_id.split("_")[0]
            for i, (item, job) in enumerate(zip(items, jobs, strict=True)):
                record["tasks"].append({"index": i, "fold": _fold_str(item), "task_id": job.job_id})
        log.info("submitted %s %s as job %s%s", kind, role, record["job_id"], f" ({dependency})" if dependency else "")
    else:
        record["job_id"] = ""
        for i, item in enumerate(items if items is not None else [None]):
            entry: dict[str, Any] = {"index": i} if items is not None else {}
            if items is not None:
                entry["fold"] = _fold_str(item)
            if run_if is not None and not run_if(item):
                entry.update(task_id=f"skipped-{kind}-{role}-{i}", state="CANCELLED", reason="dependency failed")
                record["tasks"].append(entry)
                continue
            t0 = time.monotonic()
            job = executor.submit(task) if items is None else executor.submit(task, item)
            entry["task_id"] = str(job.job_id)
            item_label = entry.get("fold", "") if kind == "train" else (f"task {i}" if items is not None else "")
            what = " ".join(str(x) for x in dict.fromkeys((kind, role, item_label)) if x)
            log.info("running %s locally (job %s; log %s)", what, job.job_id, job.paths.stdout)
            try:
                job.result()
                entry.update(state="COMPLETED", exit_code=0)
                log.info("%s COMPLETED in %.0f s", what, time.monotonic() - t0)
            except Exception as err:  # noqa: BLE001 - a failed job is recorded, the graph goes on
                log.error("%s FAILED: %s", what, str(err).strip()[-2000:])
                entry.update(state="FAILED", exit_code=1)
            entry["elapsed_s"] = round(time.monotonic() - t0)
            record["tasks"].append(entry)
        record["job_id"] = record["tasks"][0]["task_id"] if record["tasks"] else ""
    ctx.jobs.append(record)
    return record


def _fold_str(fold: Any) -> str:
    return "final" if fold == "final" else f"fold{fold}"


def prepare_experiment(cfg: ExperimentConfig) -> ExperimentPaths:
    """runs/<exp>/: config.yaml (always the submitted one), manifest.csv and folds.csv when absent."""
    paths = ExperimentPaths.of(cfg)
    paths.root.mkdir(parents=True, exist_ok=True)
    if paths.config.is_file():
        old = load_config(paths.config)
        if config_hash(old) != config_hash(cfg):
            log.warning(
                "config of %s changed since the last submission (%s -> %s); completed runs are kept",
                cfg.name,
                config_hash(old),
                config_hash(cfg),
            )
    save_config(cfg, paths.config)
    if not paths.manifest.is_file() or not paths.folds.is_file():
        from bonehpc.data.folds import make_folds, write_folds
        from bonehpc.data.mura import build_manifest, read_manifest, write_manifest

        if paths.manifest.is_file():
            manifest = read_manifest(paths.manifest)
        else:
            manifest = build_manifest(cfg.data.mura_root)
            write_manifest(manifest, paths.manifest)
        if not paths.folds.is_file():
            write_folds(make_folds(manifest, cfg.data.num_folds, cfg.data.fold_seed), paths.folds)
    return paths


def submit_folds(
    cfg: ExperimentConfig,
    *,
    only: set[tuple[str, str]] | None = None,
    kind: str = "folds",
    workdir: str | Path | None = None,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Submit (or run, in local/debug mode) the fold graph of an experiment; returns the registry entry.

    Args:
        cfg: the experiment config (saved as runs/<exp>/config.yaml, which the jobs read).
        only: restrict to these (fold name, role) pairs (resubmit); None: everything not done or active.
        kind: name of the submission in the registry (folds or resubmit).
        workdir: the jobs' working directory (relative paths of the config resolve there); default cwd.
        evaluate: also submit the holdout evaluation + report job when it is due.
    """
    from jobs.evaluate import EvaluateTask
    from jobs.train import TrainTask

    mode = resolve_mode(cfg.cluster.mode)
    profile = load_profile(cfg.cluster.profile if mode == "slurm" or cfg.cluster.profile != "dev" else "local")
    paths = prepare_experiment(cfg)
    plan = plan_folds(cfg, paths, only)
    ctx = SubmitContext(cfg, paths, profile, mode, str(Path(workdir or os.getcwd()).resolve()))
    cfg_path = str(paths.config.resolve())
    nproc = cfg.cluster.nproc_per_node or profile.for_kind("train").nproc_per_node
    train_ids: list[str] = [tid for tid in plan.active.values()]

    teacher: dict[str, Any] | None = None
    if plan.teacher:
        teacher = _submit(
            ctx, "train", TrainTask(cfg_path, "teacher", ctx.workdir, nproc), plan.teacher, role="teacher"
        )
        train_ids.append(teacher["job_id"])
    if plan.student:
        by_fold = {t["fold"]: t["task_id"] for t in (teacher or {}).get("tasks", [])}
        deps = []
        for fold in plan.student:
            fname = _fold_str(fold)
            if fname in by_fold:
                deps.append(by_fold[fname])
            elif (fname, "teacher") in plan.active:
                deps.append(plan.active[(fname, "teacher")])
        same_order = teacher is not None and [_fold_str(f) for f in plan.student] == [
            t["fold"] for t in teacher["tasks"]
        ]
        if ctx.mode == "slurm" and same_order and teacher is not None:
            dependency = f"aftercorr:{teacher['job_id']}"
        else:
            dependency = "afterok:" + ":".join(deps) if deps else ""

        def teacher_ok(fold: Any) -> bool:
            return role_completed(paths, fold, "teacher")

        student = _submit(
            ctx,
            "train",
            TrainTask(cfg_path, "student", ctx.workdir, nproc),
            plan.student,
            role="student",
            dependency=dependency if ctx.mode == "slurm" else "",
            run_if=teacher_ok,
        )
        train_ids.append(student["job_id"])
    if plan.evaluate and evaluate:
        dependency = "afterany:" + ":".join(train_ids) if train_ids and ctx.mode == "slurm" else ""
        _submit(ctx, "evaluate", EvaluateTask(cfg_path, ctx.workdir), role="", dependency=dependency)

    entry = {
        "kind": kind,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "profile": profile.name,
        "config_hash": config_hash(cfg),
        "git_sha": git_sha(),
        "workdir": ctx.workdir,
        "skipped": plan.skipped,
        "jobs": ctx.jobs,
    }
    if ctx.jobs:
        registry = read_registry(paths.root)
        registry.setdefault("experiment", cfg.name)
        registry["submissions"].append(entry)
        _write_registry(paths.root, registry)
    else:
        log.info("nothing to submit for %s: %s", cfg.name, ", ".join(f"{k} {v}" for k, v in plan.skipped.items()))
    entry["run_dir"] = str(paths.root)
    return entry


def submit_pack(cfg: ExperimentConfig, workdir: str | Path | None = None) -> dict[str, Any]:
    """Pack cfg.data into shards on the cluster: an array with one task per shard, then the finalize job.

    The plan is made here (bonehpc.data.pack.plan_pack saves it next to the shards); shards already packed
    are skipped by the tasks, so submitting again resumes. Recorded in runs/<exp>/jobs.json as kind pack.
    """
    from bonehpc.data.pack import plan_pack
    from jobs.pack import FinalizePackTask, PackShardTask

    mode = resolve_mode(cfg.cluster.mode)
    profile = load_profile(cfg.cluster.profile if mode == "slurm" or cfg.cluster.profile != "dev" else "local")
    paths = ExperimentPaths.of(cfg)
    paths.root.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    plan = plan_pack(
        d.mura_root,
        d.shards,
        pack_size=d.pack_size,
        fit=d.fit,
        compression=d.compression,
        images_per_shard=d.images_per_shard,
    )
    out = str(Path(d.shards).resolve())
    ctx = SubmitContext(cfg, paths, profile, mode, str(Path(workdir or os.getcwd()).resolve()))
    shards = list(range(len(plan.shards)))
    arr = _submit(ctx, "pack", PackShardTask(out), shards, role="")
    for task, index in zip(arr["tasks"], shards, strict=True):
        task["fold"] = f"shard{index}"
    dependency = f"afterok:{arr['job_id']}" if mode == "slurm" else ""
    fin = _submit(ctx, "pack", FinalizePackTask(out, d.max_reject_frac), role="", dependency=dependency)
    fin["tasks"][0]["fold"] = "finalize"
    entry = {
        "kind": "pack",
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "profile": profile.name,
        "config_hash": config_hash(cfg),
        "git_sha": git_sha(),
        "workdir": ctx.workdir,
        "skipped": {},
        "jobs": ctx.jobs,
    }
    registry = read_registry(paths.root)
    registry.setdefault("experiment", cfg.name)
    registry["submissions"].append(entry)
    _write_registry(paths.root, registry)
    entry["run_dir"] = str(paths.root)
    return entry


def resubmit(exp_dir: str | Path, workdir: str | Path | None = None) -> dict[str, Any]:
    """Resubmit only the failed / cancelled / timed-out tasks of an experiment (and their dependents)."""
    exp = Path(exp_dir)
    cfg_path = exp / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{exp}: no config.yaml; is this an experiment folder (runs/<exp>)?")
    cfg = load_config(cfg_path)
    registry = read_registry(exp)
    if not registry["submissions"]:
        raise ConfigError(f"{exp}/jobs.json: nothing was submitted yet; use `bonehpc submit folds`")
    states = _task_states(registry)
    paths = ExperimentPaths(exp)
    only: set[tuple[str, str]] = set()
    for (fname, role), task in latest_tasks(registry).items():
        if task["kind"] != "train":
            continue
        fold: int | str = "final" if fname == "final" else int(fname.removeprefix("fold"))
        if states.get(task["task_id"]) in RETRY_STATES and not role_completed(paths, fold, role):
            only.add((fname, role))
            if role == "teacher" and not role_completed(paths, fold, "student"):
                only.add((fname, "student"))  # the dependent student (cancelled or never run) goes too
    log.info("resubmitting %s", ", ".join(f"{f}/{r}" for f, r in sorted(only)) or "no training task")
    if not registry["submissions"][-1].get("workdir") and workdir is None:
        workdir = os.getcwd()
    return submit_folds(cfg, only=only, kind="resubmit", workdir=workdir or registry["submissions"][-1]["workdir"])


def python_executable(profile: ResourceSpec) -> str:
    """The interpreter jobs run with."""
    return profile.python or sys.executable
