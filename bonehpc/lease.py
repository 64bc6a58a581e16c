"""One writer per run folder: an exclusive run lease with a heartbeat, and processes that die with their parent.

The lease is a file in the run folder (`.lease`), created with O_CREAT|O_EXCL (atomic on local file systems
and NFSv3+), stamped with host, pid (and its start time), Slurm job and a heartbeat counter that a thread of
the holder bumps every `HEARTBEAT_S`. A second writer finds it and either

- takes it over when the holder is provably gone: same host and that process no longer exists, or the
  same Slurm job (a requeued run: Slurm ended the previous one), or a holder on another host whose
  heartbeat did not move for `STALE_S` (watched here, so clocks of different hosts never matter);
- or stops with LeaseHeldError (one line naming the holder; the CLI exits 2).

The holder re-reads the file on every beat and before each checkpoint (`check`): when the file no longer
names it (taken over as stale after a stall), the run stops instead of writing as a second writer.

`die_with_parent` (PR_SET_PDEATHSIG) makes torchrun, the trainers and loader workers die with the
process that started them, so that nothing of a Slurm step survives its end (Slurm's linuxproc tracking
loses a process once it is re-parented).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bonehpc.config import ConfigError

log = logging.getLogger(__name__)

LEASE_FILE = ".lease"
HEARTBEAT_S = 10.0
"""How often the holder bumps its heartbeat."""
STALE_S = 45.0
"""A lease of another host whose heartbeat did not move for this long is stale (the holder is gone)."""
PR_SET_PDEATHSIG = 1


class LeaseHeldError(ConfigError):
    """Another live process holds the run folder; the message names it (one line)."""


class LeaseLostError(RuntimeError):
    """This process held the lease, but the file now names another holder: stop writing."""


def _proc_start(pid: int) -> str:
    """Start time of a process (clock ticks since boot; '' when it does not exist): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def slurm_task_id(env: dict[str, str] | None = None) -> str:
    """`<array job>_<task>` or `<job>` of the Slurm task this process belongs to; '' outside Slurm."""
    env = dict(os.environ) if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def identity() -> dict[str, Any]:
    """Who this process is, as a lease records it."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start(pid), "job": slurm_task_id()}


def describe(holder: dict[str, Any]) -> str:
    """`pid 123 on host n1 (Slurm job 45_0, since 2026-12-06T21:00:00)`."""
    job = f"Slurm job {holder['job']}" if holder.get("job") else "not a Slurm job"
    return f"pid {holder.get('pid')} on host {holder.get('host')} ({job}, since {holder.get('since', '?')})"


def _same_process(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("host", "pid", "start"))


def _alive_here(holder: dict[str, Any]) -> bool:
    """The holder runs on this host and is still that process (pid not reused)."""
    pid = int(holder.get("pid") or 0)
    return pid > 0 and _proc_start(pid) == holder.get("start")


def read_lease(path: Path) -> dict[str, Any] | None:
    """The lease file's content; None when there is none; {} while it is being written."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


class RunLease:
    """The exclusive lease of one run folder; `acquire()` before the first write, `release()` at the end.

    Args:
        run_dir: the run folder (exists).
        stale_s: heartbeat silence after which a holder on another host counts as gone.
        heartbeat_s: how often the holder bumps the heartbeat.
    """

    def __init__(
        self,
        run_dir: str | Path,
        stale_s: float = STALE_S,
        heartbeat_s: float = HEARTBEAT_S,
        name: str = LEASE_FILE,
        what: str = "writing this run",
    ) -> None:
        self.path = Path(run_dir) / name
        self.what = what
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.me = identity()
        self.lost: dict[str, Any] | None = None
        self._beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquiring ---------------------------------------------------------------------------------
    def acquire(self) -> RunLease:
        """Take the lease (taking over a provably gone holder); LeaseHeldError names a live one."""
        for _ in range(20):
            if self._create():
                self._start_heartbeat()
                return self
            holder = read_lease(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            if not holder:  # being written right now
                time.sleep(0.2)
                continue
            if _same_process(holder, self.me):
                self._start_heartbeat()
                return self
            why = self._gone(holder)
            if not why:
                raise LeaseHeldError(
                    f"{self.path.parent}: another process is {self.what}: {describe(holder)}; "
                    "wait for it or stop it (one writer at a time)"
                )
            log.warning("%s: taking over the lease of %s (%s)", self.path.parent, describe(holder), why)
            self._break(holder)
        raise LeaseHeldError(f"{self.path.parent}: could not take the run lease {self.path} (contended)")

    def _create(self) -> bool:
        self._beat = 0
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self._doc()))
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _doc(self) -> dict[str, Any]:
        since = getattr(self, "_since", None) or time.strftime("%Y-%m-%dT%H:%M:%S")
        self._since = since
        return {**self.me, "since": since, "beat": self._beat}

    def _gone(self, holder: dict[str, Any]) -> str:
        """Why the holder can be taken over ('' when it may be alive)."""
        if holder.get("host") == self.me["host"]:
            return "" if _alive_here(holder) else "that process no longer exists"
        if self.me["job"] and holder.get("job") == self.me["job"]:
            return "an earlier run of this Slurm job, which Slurm ended before requeueing it"
        first = holder.get("beat")
        log.info("%s: held by %s on another host; watching its heartbeat", self.path, describe(holder))
        deadline = time.monotonic() + self.stale_s
        while time.monotonic() < deadline:
            time.sleep(min(2.0, self.stale_s))
            now = read_lease(self.path)
            if now is None:
                return "released"
            if now and (now.get("beat") != first or not _same_process(now, holder)):
                return ""
        return f"no heartbeat for {self.stale_s:.0f} s"

    def _break(self, holder: dict[str, Any]) -> None:
        """Move a gone holder's lease aside (only if it is still the same content) so that O_EXCL can win."""
        now = read_lease(self.path)
        if now is None or not now or not _same_process(now, holder):
            return
        aside = self.path.with_name(f"{self.path.name}.stale.{self.me['host']}.{self.me['pid']}")
        try:
            os.replace(self.path, aside)
            aside.unlink()
        except FileNotFoundError:
            pass

    # -- holding -------------------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._heartbeat, name="run-lease", daemon=True)
            self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._still_mine():
                return
            self._beat += 1
            tmp = self.path.with_name(f"{self.path.name}.{self.me['pid']}.tmp")
            try:
                tmp.write_text(json.dumps(self._doc()))
                os.replace(tmp, self.path)
            except OSError as err:
                log.warning("run lease heartbeat failed: %s", err)

    def _still_mine(self) -> bool:
        holder = read_lease(self.path)
        if holder == {}:
            return True  # mid-write (only ever by us while we hold it)
        if holder is None or not _same_process(holder, self.me):
            self.lost = holder or {"pid": "?", "host": "?"}
            return False
        return True

    def check(self) -> None:
        """LeaseLostError when another process took the lease over (call before writing results)."""
        if self.lost is not None or not self._still_mine():
            assert self.lost is not None
            raise LeaseLostError(f"{self.path.parent}: the run lease was taken over by {describe(self.lost)}; stopping")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file when it still names this process."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = read_lease(self.path)
        if holder is not None and _same_process(holder, self.me):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Ask the kernel to send `sig` to this process when its parent exits (PR_SET_PDEATHSIG; Linux only).

    Called in the child (a Popen preexec_fn, a loader worker's init). When the parent is already gone (this
    process was re-parented before the call) the signal is sent now.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    ppid = os.getppid()
    if (parent is not None and ppid != parent) or ppid == 1:
        os.kill(os.getpid(), sig)


SUBMIT_LOCK_FILE = ".submit.lease"
_HELD_LOCKS: dict[Path, tuple[RunLease, int]] = {}


@contextlib.contextmanager
def submit_lock(folder: str | Path) -> Iterator[RunLease]:
    """The experiment's submit lock (a lease file in `folder`, created when missing) for one submission.

    Concurrent submits of one experiment: the first holds it while it plans, submits and records (in
    local mode: while its jobs run); the others stop with LeaseHeldError naming it. Re-entrant in one
    process (resubmit plans and submits the fold graph under the same lock).
    """
    path = Path(folder).resolve()
    held = _HELD_LOCKS.get(path)
    if held is not None:
        _HELD_LOCKS[path] = (held[0], held[1] + 1)
        try:
            yield held[0]
        finally:
            lease, count = _HELD_LOCKS[path]
            _HELD_LOCKS[path] = (lease, count - 1)
        return
    path.mkdir(parents=True, exist_ok=True)
    lease = RunLease(path, name=SUBMIT_LOCK_FILE, what="submitting to this experiment")
    lease.acquire()
    _HELD_LOCKS[path] = (lease, 1)
    try:
        yield lease
    finally:
        del _HELD_LOCKS[path]
        lease.release()
