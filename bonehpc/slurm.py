"""Cluster profiles, submitit executors and the one submit primitive (`submit`) every job kind goes through.

The job graphs built on `submit` (folds, resubmit, pack, tune) live with the entry points they submit, in
jobs/submit.py; the registry they write (jobs.json) is bonehpc.registry.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from bonehpc import localgraph, shellsafe
from bonehpc.config import ConfigError, ExperimentConfig, _build, read_yaml
from bonehpc.paths import ExperimentPaths
from bonehpc.resources import DEFAULT_SAVE_WAIT_S, check_signal_delay, last_error_line

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).resolve().parents[1] / "slurm" / "clusters"


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
    save_wait_s: int = DEFAULT_SAVE_WAIT_S
    """Longest a stopping job waits for last.pt to be written; signal_delay_s must exceed it by a margin."""
    startup_s: int = 120
    """Seconds from a job's start to its first training step (Python, torchrun, data, model); the preflight
    refuses a time limit that leaves no room to progress after it."""
    array_parallelism: int = 32
    """Array tasks running at once."""
    max_num_timeout: int = 3
    """Time limits a job may hit and be requeued before it is given up."""
    additional: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch options without the leading dashes ({exclusive: true, reservation: r1}): known sbatch
    options only, none that a field above sets, none that bonehpc sets unless listed in additional_override."""
    additional_override: list[str] = field(default_factory=list)
    """Options bonehpc sets (signal, requeue, no-requeue, array, dependency, output, error, open-mode,
    job-name, kill-on-invalid-dep) that `additional` may replace: an explicit opt-in, empty by default."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job (module load ..., export ...), one printable line each."""
    python: str = ""
    """Python interpreter of the jobs: one absolute path (a wrapper script for a container), quoted when
    rendered; empty: the one that submits."""
    nproc_per_node: int = 0
    """Training processes per node (0: one per GPU, 1 on CPU-only nodes); cluster.nproc_per_node wins."""

    def __post_init__(self) -> None:
        for key in ("nodes", "cpus_per_task", "time_min", "array_parallelism"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)!r}")
        for key in ("gpus_per_node", "signal_delay_s", "max_num_timeout", "nproc_per_node", "save_wait_s", "startup_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)!r}")
        self._check_strings()
        if self.mem_gb <= 0:
            raise ConfigError(f"mem_gb: must be > 0, got {self.mem_gb!r}")
        if self.signal_delay_s >= self.time_min * 60:
            raise ConfigError(
                f"signal_delay_s: {self.signal_delay_s} s is not shorter than time_min ({self.time_min} min)"
            )
        try:
            check_signal_delay(self.signal_delay_s, self.save_wait_s)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _check_strings(self) -> None:
        """Every value that reaches the job script, by bonehpc.shellsafe's rules (one line naming the key)."""
        for key in ("partition", "account", "qos", "constraint"):
            shellsafe.check_slurm_word(key, getattr(self, key))
        for i, line in enumerate(self.setup):
            shellsafe.check_shell_line(f"setup[{i}]", line)
        shellsafe.check_python("python", self.python)
        shellsafe.check_additional("", self.additional, self.additional_override)

    def sbatch_additional(self) -> dict[str, Any]:
        """`additional` keyed as submitit keys sbatch options (so a replaced option is not written twice)."""
        return shellsafe.check_additional("", self.additional, self.additional_override)


JOB_KINDS = ("train", "evaluate", "tune", "pack", "submit")
# First lines of every batch script. Sites signal the batch shell too (`scancel --full`, `--signal=B:`,
# some preemption setups); bash dies of USR2 by default, and the job then ends FAILED 0:12 instead of
# being requeued. The shell only waits: the task (submitit, TrainTask, the trainers) handles the signal.
BATCH_SHELL_SHIELD = (
    "trap 'echo \"bonehpc: batch shell got USR2; the job step handles it\" >&2' USR2",
    "trap 'echo \"bonehpc: batch shell got TERM; the job step handles it\" >&2' TERM",
)


@dataclass(kw_only=True)
class ClusterProfile(ResourceSpec):
    """A cluster profile (slurm/clusters/<name>.yaml): resources plus per-job-kind overrides."""

    name: str = "dev"
    """Profile name (the file name without .yaml)."""
    per_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Overrides of the resource keys for one job kind (train, evaluate, tune, pack)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for kind, over in self.per_kind.items():
            if kind not in JOB_KINDS:
                raise ConfigError(f"per_kind.{kind}: unknown job kind (valid: {', '.join(JOB_KINDS)})")
            self.for_kind(kind)  # validates the keys and values now, naming them
            del over

    def for_kind(self, kind: str) -> ResourceSpec:
        """The resources of one job kind: the profile, the kind's defaults, then its per_kind overrides.

        Defaults: a tune trial (one training process) gets 1 GPU and its per-GPU share of the train
        resources' CPUs and memory (all of them on a CPU-only profile), on one node; pack gets no GPU, and
        on a partition of its own neither the profile's `constraint` nor its `additional` options; submit
        (a job that only submits others) one CPU, no GPU, at most 2 GB.
        """
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(ResourceSpec)}
        if kind == "tune":
            train = self.for_kind("train")
            share = max(1, train.gpus_per_node)
            base.update(
                gpus_per_node=min(1, train.gpus_per_node),
                cpus_per_task=max(1, train.cpus_per_task // share),
                mem_gb=round(train.mem_gb / share, 3),
                nodes=1,
                nproc_per_node=1,
            )
        elif kind == "submit":  # a job that only submits others (submit all's last one): one core, no GPU
            base.update(gpus_per_node=0, nodes=1, cpus_per_task=1, mem_gb=min(2.0, base["mem_gb"]), nproc_per_node=1)
        over = self.per_kind.get(kind, {})
        if kind == "pack":
            base.update(gpus_per_node=0, nodes=1)
            if over.get("partition", self.partition) != self.partition:
                # another partition (CPU nodes): the GPU nodes' feature and placement options
                # (--constraint, additional: hint, ...) would match no node there
                base.update(constraint="", additional={})
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
    data = read_yaml(path)  # the config's loader: no repeated keys, bounded aliases and nesting, one-line errors
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
    params["slurm_setup"] = [
        *BATCH_SHELL_SHIELD,
        # Slurm >= 22.05: srun does not inherit --cpus-per-task; derived inside the job so that it can
        # never conflict with the allocation
        "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK",
        f"export BONEHPC_SAVE_WAIT_S={spec.save_wait_s}",
        *spec.setup,
    ]
    # requeue explicitly (sites may default to JobRequeue=0): a timed-out or preempted job comes back
    extra = spec.sbatch_additional()
    params["slurm_additional_parameters"] = {**({} if "no_requeue" in extra else {"requeue": True}), **extra}
    return params


def make_executor(
    spec: ResourceSpec, folder: str | Path, mode: str, name: str, dependency: str = ""
) -> submitit.AutoExecutor:
    """A submitit executor for one job: Slurm, local (subprocesses) or debug (in-process)."""
    kwargs: dict[str, Any] = {}
    if mode == "slurm":
        kwargs["slurm_max_num_timeout"] = spec.max_num_timeout
        if spec.python:
            kwargs["slurm_python"] = shellsafe.quote_python(spec.python)  # submitit pastes it unquoted
    executor = submitit.AutoExecutor(folder=str(folder), cluster=mode, **kwargs)
    params = executor_parameters(spec, name, mode)
    if mode == "slurm" and dependency:
        params["slurm_dependency"] = shellsafe.check_dependency("dependency", dependency)  # ids from jobs.json
        extra = dict(params.get("slurm_additional_parameters", {}))
        # a task whose dependency can never be met is cancelled, so the afterany evaluation still runs
        extra.setdefault("kill_on_invalid_dep", "yes")
        params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor


def render_sbatch(
    spec: ResourceSpec, folder: str, name: str, dependency: str = "", command: str | None = "CMD", array: int = 0
) -> str:
    """The sbatch script submitit writes for a job of this spec (`array`: tasks of an array job; 0: one job;
    `command` None: the command submitit runs, exactly as it submits it).

    submitit has no public API for the script text; this calls its private `_make_submission_file_text`
    (pinned by the golden test tests/golden/sbatch_profiles.txt, which fails when submitit changes it).
    """
    executor = make_executor(spec, folder, "slurm", name, dependency)
    inner = executor._executor
    if array:
        inner.parameters["map_count"] = array  # what submitit's map_array sets: #SBATCH --array=0-N%P
    if command is None:
        command = inner._submitit_command_str  # type: ignore[attr-defined]
    return inner._make_submission_file_text(command, "UID")  # type: ignore[attr-defined,no-any-return]


# ----------------------------------------------------------------------------------------------
# Dry run: every job of a graph rendered, nothing submitted

_DRY_RUN: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("bonehpc_dry_run", default=None)


@contextlib.contextmanager
def dry_run() -> Iterator[list[str]]:
    """Inside this block `submit` submits and runs nothing: it appends each job's sbatch script (Slurm) or
    what it would run (local/debug) to the yielded list, and gives the jobs ids DRY1, DRY2, ... so the
    dependency graph reads as it would be submitted. Builders record nothing in jobs.json."""
    token = _DRY_RUN.set([])
    try:
        out = _DRY_RUN.get()
        assert out is not None
        yield out
    finally:
        _DRY_RUN.reset(token)


def is_dry_run() -> bool:
    """True inside `dry_run()`."""
    return _DRY_RUN.get() is not None


def _dry_submit(
    ctx: SubmitContext,
    spec: ResourceSpec,
    kind: str,
    name: str,
    items: Sequence[Any] | None,
    role: str,
    dependency: str,
    label: Callable[[Any], str] | None,
) -> dict[str, Any]:
    """`submit` under dry_run(): the record a submission would produce, and its script in the dry-run list."""
    out = _DRY_RUN.get()
    assert out is not None
    job_id = f"DRY{sum(1 for line in out if line.startswith('#####')) + 1}"
    record: dict[str, Any] = {"kind": kind, "role": role, "dependency": dependency, "job_id": job_id, "tasks": []}
    for i, item in enumerate(items if items is not None else [None]):
        task_id = f"{job_id}_{i}" if items is not None else job_id
        entry = {"index": i} if items is not None else {}
        record["tasks"].append({**entry, **_label(label, item), "task_id": task_id})
    head = f"##### {kind} {role} job {job_id}".replace("  ", " ")
    if items is not None:
        head += f": array of {len(items)} ({', '.join(t.get('fold', str(t['index'])) for t in record['tasks'])})"
    if ctx.mode == "slurm":
        folder = ctx.paths.submitit / "%j"
        out.append(f"{head}\n{render_sbatch(spec, str(folder), name, dependency, None, len(items or []))}")
    else:
        after = f" when {dependency}" if dependency and ctx.mode == "local" else ""
        where = "the local graph (tasks at once as the machine allows)" if ctx.mode == "local" else "in-process"
        out.append(f"{head}: would run in {where}{after}")
    ctx.jobs.append(record)
    return record


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
    graph: localgraph.LocalGraph | None = None
    """mode local: the job graph of this submission (bonehpc.localgraph)."""
    deferred: bool = False
    """After `defer_local(ctx)`: local jobs wait for `run_local(ctx)`."""

    def __post_init__(self) -> None:
        # the folder's absolute path is written into every job script (log paths, submitit's job folder)
        shellsafe.check_script_path("experiment folder", str(Path(self.paths.root).absolute()), absolute=True)


def submit(
    ctx: SubmitContext,
    kind: str,
    task: Callable[..., Any],
    items: Sequence[Any] | None = None,
    *,
    role: str = "",
    dependency: str = "",
    run_if: Callable[[Any], bool] | None = None,
    label: Callable[[Any], str] | None = None,
) -> dict[str, Any]:
    """THE submit path of every job kind: one job, or an array over `items`; records it in ctx.jobs.

    Slurm: returns at once (the scheduler orders jobs by `dependency`). Local: the job joins the local graph
    (bonehpc.localgraph) with synthetic ids and the same `dependency` string; after `defer_local(ctx)` the
    graph runs at `run_local(ctx)`, otherwise now (tasks concurrently as far as the machine allows). Debug:
    runs the tasks now, in this process, one after another. Local and debug skip an item whose
    `run_if(item)` is false when it would start (its dependency failed).
    `label(item)` names each task in the registry (its "fold" key: fold0, final, shard3, finalize) and in
    the log; a single job (items None) gets `label(None)`.
    """
    spec = ctx.profile.for_kind(kind)
    name = f"{ctx.cfg.name}-{role or kind}"
    if _DRY_RUN.get() is not None:
        return _dry_submit(ctx, spec, kind, name, items, role, dependency, label)
    executor = make_executor(spec, ctx.paths.submitit / "%j", ctx.mode, name, dependency)
    record: dict[str, Any] = {"kind": kind, "role": role, "dependency": dependency, "tasks": []}
    if ctx.mode == "slurm":
        if items is None:
            job = executor.submit(task)
            record["job_id"] = job.job_id
            record["tasks"].append({**_label(label, None), "task_id": job.job_id})
        else:
            jobs = executor.map_array(task, list(items))
            record["job_id"] = jobs[0].job_id.split("_")[0]
            for i, (item, job) in enumerate(zip(items, jobs, strict=True)):
                record["tasks"].append({"index": i, **_label(label, item), "task_id": job.job_id})
        log.info("submitted %s %s as job %s%s", kind, role, record["job_id"], f" ({dependency})" if dependency else "")
    elif ctx.mode == "local":
        _local_submit(ctx, spec, executor, kind, role, task, items, record, dependency, run_if, label)
    else:
        _debug_submit(ctx, executor, kind, role, task, items, record, run_if, label)
    ctx.jobs.append(record)
    return record


def cancel(task_ids: Sequence[str], why: str) -> None:
    """scancel these Slurm tasks (ones that already ended are left as they are); logs why."""
    ids: list[str] = []
    odd: list[str] = []
    for t in (str(t) for t in task_ids if str(t)):
        (ids if shellsafe.SLURM_JOB_ID_RE.fullmatch(t) else odd).append(t)
    if odd:  # jobs.json is checked when read; an id that is no Slurm id would be an scancel option (--user=...)
        log.warning("not cancelling %s: not Slurm job ids", ", ".join(map(repr, odd)))
    if not ids:
        return
    log.info("cancelling %s: %s", ", ".join(ids), why)
    res = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        log.warning("scancel %s exited %d: %s", " ".join(ids), res.returncode, res.stderr.strip()[:300])


def _label(label: Callable[[Any], str] | None, item: Any) -> dict[str, str]:
    return {"fold": label(item)} if label is not None else {}


def _what(kind: str, role: str, index: int | None, entry: dict[str, Any]) -> str:
    """'train teacher fold0', 'tune task 3', 'evaluate': how the console names a task."""
    item_label = entry.get("fold", "") or (f"task {index}" if index is not None else "")
    return " ".join(str(x) for x in dict.fromkeys((kind, role, item_label)) if x)


def local_share(ctx: SubmitContext) -> localgraph.Share:
    """How this machine is shared out between local tasks (cluster.local_parallel, cores, GPUs, memory)."""
    train = ctx.profile.for_kind("train")
    return localgraph.plan_share(
        ctx.cfg.cluster.local_parallel,
        cores=len(os.sched_getaffinity(0)),
        gpus=localgraph.visible_gpus(),
        gpus_per_task=ctx.cfg.cluster.nproc_per_node or train.nproc_per_node or 1,
        workers=ctx.cfg.data.num_workers,
        mem_gb=train.mem_gb,
        mem_total_gb=localgraph.total_memory_gb(),
        user_threads=bool(os.environ.get("OMP_NUM_THREADS", "").strip()),
    )


def defer_local(ctx: SubmitContext) -> None:
    """Local mode: the jobs submitted from now on wait for `run_local(ctx)` and then run together (a student
    starts as soon as its teacher is done, whatever was submitted after it). Elsewhere a no-op."""
    ctx.deferred = ctx.mode == "local" and not is_dry_run()


def run_local(ctx: SubmitContext) -> None:
    """Run the deferred local graph of `ctx` until every task ended (no-op outside local mode).

    Raises:
        KeyboardInterrupt: Ctrl-C; the running tasks were stopped (they save last.pt) and every task that
            did not finish is marked CANCELLED in ctx.jobs, so the caller can still record them.
    """
    ctx.deferred = False
    if ctx.graph is not None:
        ctx.graph.run()


def _local_submit(
    ctx: SubmitContext,
    spec: ResourceSpec,
    executor: submitit.AutoExecutor,
    kind: str,
    role: str,
    task: Callable[..., Any],
    items: Sequence[Any] | None,
    record: dict[str, Any],
    dependency: str,
    run_if: Callable[[Any], bool] | None,
    label: Callable[[Any], str] | None,
) -> None:
    if ctx.graph is None:
        ctx.graph = localgraph.LocalGraph(local_share(ctx), ctx.paths.submitit)
    ctx.graph.add(
        executor,
        task,
        items,
        record,
        what=lambda index, entry: _what(kind, role, index, entry),
        dependency=dependency,
        run_if=run_if,
        parallelism=spec.array_parallelism if items is not None else 0,
        label=lambda item: _label(label, item),
    )
    if not ctx.deferred:
        ctx.graph.run()


def _debug_submit(
    ctx: SubmitContext,
    executor: submitit.AutoExecutor,
    kind: str,
    role: str,
    task: Callable[..., Any],
    items: Sequence[Any] | None,
    record: dict[str, Any],
    run_if: Callable[[Any], bool] | None,
    label: Callable[[Any], str] | None,
) -> None:
    """cluster.mode debug: each task now, in this process, one after another."""
    for i, item in enumerate(items if items is not None else [None]):
        entry: dict[str, Any] = {"index": i} if items is not None else {}
        entry.update(_label(label, item))
        if run_if is not None and not run_if(item):
            entry.update(task_id=f"skipped-{kind}-{role}-{i}", state="CANCELLED", reason="dependency failed")
            record["tasks"].append(entry)
            continue
        t0 = time.monotonic()
        job = executor.submit(task) if items is None else executor.submit(task, item)
        entry["task_id"] = str(job.job_id)
        what = _what(kind, role, i if items is not None else None, entry)
        log.info("running %s (job %s)", what, job.job_id)
        try:
            job.result()
            entry.update(state="COMPLETED", exit_code=0)
            log.info("%s COMPLETED in %.0f s", what, time.monotonic() - t0)
        except Exception as err:  # noqa: BLE001 - a failed job is recorded, the graph goes on
            text = str(err).strip()
            line = last_error_line(text) or (text.splitlines() or ["(no message)"])[0][:500]
            log.error("%s FAILED: %s", what, line)
            entry.update(state="FAILED", exit_code=1, error=line)
        entry["elapsed_s"] = round(time.monotonic() - t0)
        record["tasks"].append(entry)
    record["job_id"] = record["tasks"][0]["task_id"] if record["tasks"] else ""
