"""One writer per run folder (bonehpc.lease): the run lease, its takeover rules, and parent death."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bonehpc.config import apply_overrides, save_config
from bonehpc.constants import INPUT_ERROR_EXIT_CODE
from bonehpc.lease import LEASE_FILE, LeaseHeldError, LeaseLostError, RunLease, read_lease

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
HOLD = (
    "import sys, time; from bonehpc.lease import RunLease; l = RunLease(sys.argv[1], heartbeat_s=0.2).acquire(); "
    "print('held', flush=True); time.sleep(60)"
)


def _holder(run_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(LeaseHeldError, match=f"pid {proc.pid} on host {os.uname().nodename}"):
            RunLease(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    # the holder died without releasing: same host, process gone -> taken over at once
    lease = RunLease(tmp_path).acquire()
    assert read_lease(tmp_path / LEASE_FILE)["pid"] == os.getpid()  # type: ignore[index]
    lease.release()
    assert not (tmp_path / LEASE_FILE).exists()


def _foreign(path: Path, **extra: object) -> None:
    doc = {"host": "other-node", "pid": 4242, "start": "1", "job": "77_1", "since": "x", "beat": 0, **extra}
    path.write_text(json.dumps(doc))


def test_other_host_holder_is_stale_only_without_heartbeat(tmp_path: Path, monkeypatch) -> None:
    lease_file = tmp_path / LEASE_FILE
    _foreign(lease_file)
    lease = RunLease(tmp_path, stale_s=0.6).acquire()  # no heartbeat for 0.6 s: gone
    assert read_lease(lease_file)["pid"] == os.getpid()  # type: ignore[index]
    lease.release()

    # a holder whose heartbeat moves is alive, wherever it runs
    _foreign(lease_file)
    import threading

    def beat() -> None:
        time.sleep(0.3)
        _foreign(lease_file, beat=1)

    threading.Thread(target=beat).start()
    with pytest.raises(LeaseHeldError, match="other-node"):
        RunLease(tmp_path, stale_s=3).acquire()

    # a requeued run of the same Slurm job takes over at once (Slurm ended the earlier run)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    t0 = time.monotonic()
    RunLease(tmp_path, stale_s=30).acquire().release()
    assert time.monotonic() - t0 < 5


def test_a_lease_taken_over_stops_the_writer(tmp_path: Path) -> None:
    lease = RunLease(tmp_path, heartbeat_s=0.1).acquire()
    _foreign(tmp_path / LEASE_FILE)
    with pytest.raises(LeaseLostError, match="other-node"):
        lease.check()
    lease.release()
    assert read_lease(tmp_path / LEASE_FILE)["host"] == "other-node"  # type: ignore[index]  # not ours: kept


def _procs_with(text: str) -> list[str]:
    out = subprocess.run(["ps", "-e", "ww", "-o", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -e" not in line]


def test_two_trainers_one_run_folder_and_kill9(tiny_cfg, tmp_path: Path) -> None:
    """Drill 3 in local mode: a second `bonehpc train` of the same fold/role exits 2 naming the first; the
    first, killed with SIGKILL, leaves no DALI worker behind; the epochs on disk stay strictly increasing."""
    cfg = apply_overrides(
        tiny_cfg, {"teacher.epochs": 40, "data.backend": "dali", "data.num_workers": 1, "name": "twotrainers"}
    )
    cfg_path = tmp_path / "twotrainers.yaml"
    save_config(cfg, cfg_path)
    cmd = [sys.executable, "-m", "bonehpc", "train", "--config", str(cfg_path), "--fold", "0", "--role", "teacher"]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = Path(cfg.run_root) / cfg.name / "fold0" / "teacher"
    history = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    # the first trainer holds the run and its DALI worker runs (no need to wait for a whole epoch)
    while not ((run_dir / LEASE_FILE).is_file() and len(_procs_with(str(cfg_path))) >= 2):
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        assert time.monotonic() < deadline, "the first trainer never started its loader workers"
        time.sleep(0.2)
    try:
        second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
        assert second.returncode == INPUT_ERROR_EXIT_CODE, second.stderr[-2000:]
        assert f"pid {first.pid} on host" in second.stderr and "another process is writing this run" in second.stderr
        assert len(_procs_with(str(cfg_path))) >= 2  # the trainer and its DALI worker
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    deadline = time.monotonic() + 5
    while _procs_with(str(cfg_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _procs_with(str(cfg_path)) == []
    epochs = [json.loads(line)["epoch"] for line in history.read_text().splitlines()] if history.is_file() else []
    assert epochs == list(range(len(epochs)))  # one writer: never a repeated or interleaved epoch


PARENT = """
import os, subprocess, sys, time
from jobs.train import _torchrun_preexec
parent = os.getpid()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                         preexec_fn=lambda: _torchrun_preexec(parent))
print(child.pid, flush=True)
time.sleep(60)
"""


def test_torchrun_dies_with_its_task_process() -> None:
    """TrainTask starts torchrun in its own session (so a signal to the task's group misses it); when the task
    process is killed with SIGKILL (scancel after KillWait, OOM killer), torchrun must not live on."""
    task = subprocess.Popen([sys.executable, "-c", PARENT], env=ENV, stdout=subprocess.PIPE, text=True)
    assert task.stdout is not None
    child = int(task.stdout.readline())
    task.send_signal(signal.SIGKILL)
    task.wait()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}").exists() else "gone"
    assert state in ("gone", "Z"), state  # a zombie waits for init to reap it: it runs nothing
