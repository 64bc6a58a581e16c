"""torch.distributed set-up and the few collectives the trainer needs (works with 1 process too).

torchrun (and a Slurm task started by submitit) sets RANK, LOCAL_RANK and WORLD_SIZE; without
them the trainer runs as a single process and every helper here degrades to a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by the torchrun environment (env://), or run alone.

    The backend is NCCL when CUDA is available and gloo otherwise; the device is cuda:local_rank or
    cpu. Calling it again returns the current group.

    Raises:
        RuntimeError: more trainers on this node than GPUs it sees (two trainers would share a GPU
            and run at half speed each, or run out of memory, without a word).
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            raise RuntimeError(
                f"local rank {local_rank} has no GPU of its own: torch sees {count} "
                f"(CUDA_VISIBLE_DEVICES={visible}); start at most {count} trainers per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds NCCL to this GPU early, avoids guessing in barrier()
        tdist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
        log.info(
            "process group: backend=%s rank=%d/%d local_rank=%d device=%s",
            backend,
            rank,
            world_size,
            local_rank,
            device,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def is_dist() -> bool:
    """True inside an initialised process group of more than one process."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def get_rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """The picklable `obj` of every rank, in rank order ([obj] in a single process)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (one tiny all-reduce; a host sync)."""
    if not is_dist():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


class StopFlag:
    """Set by SIGUSR2/SIGTERM (preemption, Slurm time limit); the training loop acts at a step boundary.

    The handler only records the signal: acting inside a handler could interrupt a collective or a
    checkpoint write half-way. `agreed()` combines the flag of every rank so that all ranks stop at
    the same step.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.signal: int | None = None
        self.stopped = False
        self._previous: dict[int, Any] = {}

    def set(self, signum: int = 0) -> None:
        self.signal = signum

    @property
    def is_set(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.signal = signum

    def install(self, signals: tuple[int, ...] = PREEMPT_SIGNALS) -> StopFlag:
        """Install the handlers (main thread only; a no-op elsewhere, e.g. under a test runner thread)."""
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread of the interpreter
                log.warning("cannot install a handler for signal %d outside the main thread", s)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def agreed(self) -> bool:
        """True on every rank when any rank got a stop signal; remembered in `stopped`."""
        if any_rank(self.is_set, self.device):
            self.stopped = True
        return self.stopped

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


# Helper processes (loader workers) -----------------------------------------------------------------
# Slurm sends the preemption signal to every process of the step, loader workers included. Only the
# rank process acts on it (StopFlag, at a step boundary); a worker that died of it would crash the run
# before the rank saves.


def ignore_preempt_signals() -> None:
    """Ignore SIGUSR2/SIGTERM in this process (call at the start of a loader worker).

    A worker that ignores TERM cannot be stopped with TERM either: its owner shuts it down through its
    own channel (the loaders' ``close``), and SIGKILL still works.
    """
    for s in PREEMPT_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def preempt_signals_blocked() -> Iterator[None]:
    """Block SIGUSR2/SIGTERM in this thread while it starts helper processes; restore the mask after.

    A child inherits the signal mask over fork and exec (fork, spawn and forkserver start methods
    alike, and the fork server's own children), so workers that libraries start for us (DALI's
    Python workers, the multiprocessing fork server) never receive these signals, even before their
    own code runs. Nothing is lost in this process: a signal that arrives meanwhile goes to another
    thread or stays pending until the mask is restored, and then reaches the StopFlag handler.

    The multiprocessing resource tracker (also a process of the step) is started here, inside the
    mask; starting it unblocks SIGTERM in the calling thread (CPython's
    ``resource_tracker.ensure_running``), so the mask is applied again afterwards: otherwise the fork
    server, started after the tracker, would die of TERM.
    """
    from multiprocessing import resource_tracker

    old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
