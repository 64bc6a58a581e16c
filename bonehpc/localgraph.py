"""The local executor's job graph: ready tasks run at once, with Slurm's dependency rules, within the machine.

`bonehpc.slurm.submit` in cluster.mode local queues each job here with its Slurm-style dependency string
(`aftercorr:<job>`, `afterok:<job or task>:...`, `afterany:...`, `afternotok:...`; `,` = all of them) and
synthetic ids (`L<pid>.<n>` for a job, `<job>_<index>` for its array tasks). `LocalGraph.run` then starts
every task whose dependencies are met, as submitit local jobs (subprocesses), as many at once as the share
allows (`plan_share`): one task per visible GPU (`CUDA_VISIBLE_DEVICES` per task), OpenMP threads shared
out so that tasks x threads <= cores (with GPUs the loader workers' cores first), a job's
`array_parallelism` respected. A task whose dependency can never be met (its teacher failed) is
cancelled, as `--kill-on-invalid-dep=yes` does on Slurm; the rest of the graph goes on.

Ctrl-C: the tasks are started with SIGINT ignored, so the terminal's Ctrl-C reaches only this process,
which sends SIGTERM to every running task (a training task asks its trainers to save last.pt and exits)
and waits for them; running again resumes from the last checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonehpc.config import ConfigError
from bonehpc.resources import DEFAULT_SAVE_WAIT_S, SIGNAL_MARGIN_S, last_error_line, task_failure_line

log = logging.getLogger(__name__)

DEPENDENCY_TYPES = ("afterok", "afterany", "afternotok", "aftercorr")
DONE_STATES = ("COMPLETED", "FAILED", "CANCELLED")
POLL_S = 0.5
START_TRIES = 3
"""Starts of a task whose submitit controller exited before the task began (a race in submitit)."""
STOP_WAIT_S = float(DEFAULT_SAVE_WAIT_S + SIGNAL_MARGIN_S)
"""How long Ctrl-C waits for the stopped tasks to save and exit before killing them (a training task waits
save_wait_s for its trainers; other tasks ignore SIGTERM under submitit and are killed at the end)."""


def parse_dependency(text: str) -> list[tuple[str, list[str]]]:
    """'aftercorr:L1.1,afterok:L1.2_0:L1.2_1' -> [('aftercorr', ['L1.1']), ('afterok', ['L1.2_0', 'L1.2_1'])].

    Raises:
        ConfigError: a type other than DEPENDENCY_TYPES, or '?' (any-of), which the local graph does not run.
    """
    if not text.strip():
        return []
    if "?" in text:
        raise ConfigError(f"dependency {text!r}: '?' (any of) is not supported by the local graph")
    out = []
    for part in text.split(","):
        kind, _, ids = part.strip().partition(":")
        targets = [i for i in ids.split(":") if i]
        if kind not in DEPENDENCY_TYPES or not targets:
            raise ConfigError(f"dependency {part!r}: expected <{'|'.join(DEPENDENCY_TYPES)}>:<job id>[:<job id>...]")
        out.append((kind, targets))
    return out


# ----------------------------------------------------------------------------------------------
# The machine, shared out


@dataclass(frozen=True)
class Share:
    """How the local machine is shared between the tasks running at once."""

    slots: int
    """Tasks at once."""
    threads: int
    """OpenMP threads per task (0: the user's OMP_NUM_THREADS is kept)."""
    gpus: tuple[tuple[int, ...], ...] = ()
    """GPU ids of each slot (empty: CPU only)."""
    cores: int = 1
    workers: int = 0
    """Loader workers per task (counted against the cores)."""

    def describe(self) -> str:
        """One line for the console."""
        threads = f"{self.threads} OpenMP thread(s)" if self.threads else "OMP_NUM_THREADS as set"
        where = f"GPUs {'; '.join(','.join(map(str, g)) for g in self.gpus)}" if self.gpus else "no GPU"
        return (
            f"{self.slots} task(s) at once on {self.cores} core(s), {where}: {threads} + {self.workers} "
            "loader worker(s) per task"
        )


def visible_gpus(env: dict[str, str] | None = None, count: Callable[[], int] | None = None) -> list[int]:
    """GPU ids this process may hand out: CUDA_VISIBLE_DEVICES when set, else 0..N-1 (torch's count).

    Raises:
        ConfigError: CUDA_VISIBLE_DEVICES holds something other than indices (e.g. UUIDs).
    """
    env = dict(os.environ) if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is not None:
        ids = [x.strip() for x in raw.split(",") if x.strip()]
        if not all(x.isdigit() for x in ids):
            raise ConfigError(f"CUDA_VISIBLE_DEVICES={raw!r}: local mode shares GPUs out by index (e.g. 0,1,3)")
        return [int(x) for x in ids]
    if count is None:
        from bonehpc.resources import cuda_device_count

        count = cuda_device_count
    return list(range(count()))


def total_memory_gb() -> float:
    """Physical memory of the machine in GB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def plan_share(
    setting: int | str,
    *,
    cores: int,
    gpus: Sequence[int],
    gpus_per_task: int = 1,
    workers: int = 0,
    mem_gb: float = 0.0,
    mem_total_gb: float = 0.0,
    user_threads: bool = False,
) -> Share:
    """Tasks at once and what each gets.

    auto: one task per `gpus_per_task` visible GPUs; without GPUs one per core; at most as many as the
    memory holds (`mem_gb` per task, the profile's). An integer N is taken as is, but never more tasks than
    GPU groups when there are GPUs. Threads per task: cores // tasks, at least 1, so tasks x threads <= cores;
    with GPUs the loader workers are counted as busy cores first: (cores - tasks x workers) // tasks.
    """
    gpus_per_task = max(1, gpus_per_task)
    groups = [tuple(gpus[i : i + gpus_per_task]) for i in range(0, len(gpus) - gpus_per_task + 1, gpus_per_task)]
    if setting == "auto":
        slots = len(groups) if groups else cores
        if mem_gb > 0 and mem_total_gb > 0:
            slots = min(slots, int(mem_total_gb // mem_gb))
    else:
        slots = int(setting)
        if groups and slots > len(groups):
            log.warning("cluster.local_parallel=%d: only %d GPU group(s) visible", slots, len(groups))
            slots = len(groups)
    slots = max(1, slots)
    # A worker feeding a GPU decodes and augments all the time: it gets a core. Beside CPU training it idles
    # (the project's 2-core VM: the loader alone ~4,800 img/s, training ~40): the trainers keep the cores
    # (one task with 2 threads was 1.29x faster than with 1 there, the worker running beside them).
    busy_workers = workers if groups else 0
    threads = 0 if user_threads else max(1, (cores - slots * busy_workers) // slots)
    return Share(slots, threads, tuple(groups[:slots]), cores, workers)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc; torchrun runs in its own session, so not its process group)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        kids = [p for p, pp in parent.items() if pp == todo[0]]
        out += kids
        todo = todo[1:] + kids
    return out


# ----------------------------------------------------------------------------------------------
# The graph


@dataclass(eq=False)
class _Task:
    key: str
    job: _Job
    index: int | None
    item: Any
    entry: dict[str, Any]
    what: str
    state: str = "PENDING"
    handle: Any = None
    slot: int = -1
    t0: float = 0.0
    starts: int = 0
    result: Any = None
    """What the task returned (kept for the caller; not in the registry)."""


@dataclass(eq=False)
class _Job:
    job_id: str
    executor: Any
    fn: Callable[..., Any]
    deps: list[tuple[str, list[str]]]
    run_if: Callable[[Any], bool] | None
    parallelism: int
    tasks: list[_Task] = field(default_factory=list)


@contextlib.contextmanager
def _child_env(threads: int) -> Iterator[None]:
    """Around a task's start: SIGINT ignored (inherited by the task and its children: Ctrl-C reaches only
    the graph, which stops the tasks in order) and OMP_NUM_THREADS set to the task's share."""
    saved = os.environ.get("OMP_NUM_THREADS")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
        signal.signal(signal.SIGINT, previous)


class LocalGraph:
    """Jobs queued by `add`, run by `run` (which returns when every task ended, or raises KeyboardInterrupt).

    Args:
        share: the machine's share-out (plan_share).
        submitit_dir: the folder of the submitit logs (runs/<exp>/submitit), for the failure lines.
    """

    def __init__(self, share: Share, submitit_dir: str | Path) -> None:
        self.share = share
        self.submitit_dir = Path(submitit_dir)
        self.jobs: dict[str, _Job] = {}
        self.tasks: dict[str, _Task] = {}
        self._count = 0

    def add(
        self,
        executor: Any,
        fn: Callable[..., Any],
        items: Sequence[Any] | None,
        record: dict[str, Any],
        *,
        what: Callable[[int | None, dict[str, Any]], str],
        dependency: str = "",
        run_if: Callable[[Any], bool] | None = None,
        parallelism: int = 0,
        label: Callable[[Any], dict[str, str]] = lambda _: {},
    ) -> str:
        """Queue one job (an array over `items`, or one task); fills `record` (job_id, tasks) and returns the id.

        `record["tasks"]` entries get their state, exit_code, elapsed_s and error when the task ends.
        """
        deps = parse_dependency(dependency)
        self._count += 1
        job = _Job(f"L{os.getpid()}.{self._count}", executor, fn, deps, run_if, parallelism or 1 << 30)
        record["job_id"] = job.job_id
        for i, item in enumerate(items if items is not None else [None]):
            index = i if items is not None else None
            key = f"{job.job_id}_{i}" if items is not None else job.job_id
            entry: dict[str, Any] = {"index": i} if items is not None else {}
            entry.update(label(item))
            entry["task_id"] = key
            record["tasks"].append(entry)
            task = _Task(key, job, index, item, entry, what(index, entry))
            job.tasks.append(task)
            self.tasks[key] = task
        self.jobs[job.job_id] = job
        return job.job_id

    # -- dependencies

    def _targets(self, kind: str, ident: str, task: _Task) -> list[_Task]:
        if ident in self.jobs:
            tasks = self.jobs[ident].tasks
            if kind == "aftercorr":
                return [t for t in tasks if t.index == task.index]
            return list(tasks)
        if ident in self.tasks:
            return [self.tasks[ident]]
        return []  # not of this graph: a job that ended before (Slurm drops finished jobs from dependencies too)

    def _dependency(self, task: _Task) -> tuple[str, str]:
        """('ok' | 'wait' | 'never', why) for a pending task."""
        waiting = False
        for kind, ids in task.job.deps:
            targets = [t for ident in ids for t in self._targets(kind, ident, task)]
            states = [t.state for t in targets]
            if kind in ("afterok", "aftercorr"):
                bad = [t for t in targets if t.state in ("FAILED", "CANCELLED")]
                if bad:
                    return "never", f"dependency never satisfied: {bad[0].what} {bad[0].state}"
                waiting |= any(s != "COMPLETED" for s in states)
            elif kind == "afternotok":
                good = [t for t in targets if t.state == "COMPLETED"]
                if good:
                    return "never", f"dependency never satisfied: {good[0].what} COMPLETED ({kind})"
                waiting |= any(s not in DONE_STATES for s in states)
            else:  # afterany
                waiting |= any(s not in DONE_STATES for s in states)
        return ("wait", "") if waiting else ("ok", "")

    # -- running

    def _free_slot(self, running: list[_Task]) -> int:
        used = {t.slot for t in running}
        return next((s for s in range(self.share.slots) if s not in used), -1)

    def _start(self, task: _Task, slot: int) -> None:
        job = task.job
        gpus = self.share.gpus[slot] if self.share.gpus else ()
        if gpus:
            # submitit's AutoExecutor does not pass visible_gpus through; its LocalExecutor sets CUDA_VISIBLE_DEVICES
            inner = getattr(job.executor, "_executor", job.executor)
            inner.update_parameters(gpus_per_node=len(gpus), visible_gpus=tuple(gpus))
        with _child_env(self.share.threads):
            task.handle = job.executor.submit(job.fn) if task.index is None else job.executor.submit(job.fn, task.item)
        task.state, task.slot, task.t0, task.starts = "RUNNING", slot, time.monotonic(), task.starts + 1
        task.entry.update(pid=str(task.handle.job_id), start=round(time.time(), 3))
        where = f"GPU {','.join(map(str, gpus))}" if gpus else f"{self.share.threads or 'OMP'} thread(s)"
        log.info("start  %s (task %s, %s; log %s)", task.what, task.key, where, task.handle.paths.stderr)

    def _finish(self, task: _Task) -> None:
        elapsed = time.monotonic() - task.t0
        if not task.handle.paths.stderr.exists() and task.starts < START_TRIES:
            # submitit's controller opens the task's log in the job folder that the submitting process creates
            # just after starting it; on a loaded machine the controller can be first and exit at once
            log.warning("restart %s: its submitit controller exited before the task started", task.what)
            task.state, task.slot = "PENDING", -1
            return
        task.entry["elapsed_s"] = round(elapsed)
        try:
            task.result = task.handle.result()
        except Exception as err:  # noqa: BLE001 - a failed task is recorded, the graph goes on
            # the exception line of the task's own log, not only the wrapper's message
            text = str(err).strip()
            line = task_failure_line(self.submitit_dir, str(task.handle.job_id)) or last_error_line(text)
            line = line or (text.splitlines() or ["(no message)"])[0][:500]
            task.state = "FAILED"
            task.entry.update(state="FAILED", exit_code=1, error=line, end=round(time.time(), 3))
            log.error("FAILED %s after %.0f s: %s (log %s)", task.what, elapsed, line, task.handle.paths.stderr)
            return
        task.state = "COMPLETED"
        task.entry.update(state="COMPLETED", exit_code=0, end=round(time.time(), 3))
        log.info("done   %s COMPLETED in %.0f s", task.what, elapsed)

    def _cancel(self, task: _Task, reason: str) -> None:
        task.state = "CANCELLED"
        task.entry.update(state="CANCELLED", reason=reason)
        log.warning("cancel %s: %s", task.what, reason)

    def _step(self) -> tuple[int, int]:
        """Reap ended tasks, cancel the never-runnable, start what fits; (running, pending) afterwards."""
        running = [t for t in self.tasks.values() if t.state == "RUNNING"]
        for task in running:
            if task.handle.done():
                self._finish(task)
        running = [t for t in running if t.state == "RUNNING"]
        for task in [t for t in self.tasks.values() if t.state == "PENDING"]:
            verdict, why = self._dependency(task)
            if verdict == "never":
                self._cancel(task, why)
                continue
            if verdict == "wait":
                continue
            if task.job.run_if is not None and not task.job.run_if(task.item):
                self._cancel(task, "dependency failed")
                continue
            slot = self._free_slot(running)
            if slot < 0 or sum(t.job is task.job for t in running) >= task.job.parallelism:
                continue  # in submission order: a later task starts only when an earlier ready one cannot
            self._start(task, slot)
            running.append(task)
        pending = sum(t.state == "PENDING" for t in self.tasks.values())
        return len(running), pending

    def run(self) -> None:
        """Run every queued task; returns when all ended. Ctrl-C: stop the running tasks, then re-raise."""
        pending = sum(t.state == "PENDING" for t in self.tasks.values())
        if not pending:
            return
        log.info("local graph: %d task(s); %s", pending, self.share.describe())
        try:
            while True:
                running, pending = self._step()
                if not running:
                    if pending:  # nothing runs and nothing can start: only unknown waits are left
                        for task in [t for t in self.tasks.values() if t.state == "PENDING"]:
                            self._cancel(task, "dependency never satisfied")
                    return
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            self.stop()
            raise

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """SIGTERM to every running task, wait for them (a second Ctrl-C or `wait_s` kills), mark them cancelled."""
        running = [t for t in self.tasks.values() if t.state == "RUNNING"]
        log.warning(
            "interrupted: stopping %d running task(s) (trainers save last.pt; up to %.0f s, Ctrl-C again to kill "
            "them now); run the same command again to resume",
            len(running),
            wait_s,
        )
        for task in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(task.handle.job_id), signal.SIGTERM)  # submitit's controller forwards it to the task
        deadline = time.monotonic() + wait_s
        try:
            while any(not t.handle.done() for t in running) and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            log.warning("second Ctrl-C: killing the tasks")
        for task in running:
            if not task.handle.done():
                for pid in [int(task.handle.job_id), *descendants(int(task.handle.job_id))]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            task.entry["elapsed_s"] = round(time.monotonic() - task.t0)
            self._cancel(task, "interrupted (Ctrl-C); a re-run resumes from last.pt")
        for task in [t for t in self.tasks.values() if t.state == "PENDING"]:
            self._cancel(task, "interrupted (Ctrl-C) before it started")
