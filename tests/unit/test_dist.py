"""bonehpc.dist in one process: the stop flag, and how helper processes are kept out of preemption signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from bonehpc import dist

READ_MASK = """
for line in open("/proc/self/status"):
    if line.startswith(("SigBlk", "SigIgn")):
        print(line.split()[1])
"""


def _bits(hex_mask: str) -> set[int]:
    value = int(hex_mask, 16)
    return {s for s in range(1, 65) if value >> (s - 1) & 1}


def test_single_process_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = dist.init_distributed()
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert not dist.is_dist() and dist.all_gather_object(3) == [3] and dist.broadcast_object("x") == "x"
    assert dist.any_rank(True, torch.device("cpu")) and not dist.any_rank(False, torch.device("cpu"))
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two' is not an integer"):
        dist.init_distributed()


def test_a_local_rank_without_its_own_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(
        RuntimeError, match=r"local rank 2 has no GPU of its own: torch sees 2 \(CUDA_VISIBLE_DEVICES=4,5\)"
    ):
        dist.init_distributed()


def test_stop_flag_records_the_signal_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    with dist.StopFlag() as stop:
        assert not stop.is_set and not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.is_set and stop.signal == signal.SIGUSR2
        assert stop.agreed() and stop.stopped
    assert signal.getsignal(signal.SIGUSR2) is before


def test_signals_blocked_meanwhile_reach_the_flag_afterwards() -> None:
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with dist.StopFlag() as stop:
        with dist.preempt_signals_blocked():
            assert {signal.SIGUSR2, signal.SIGTERM} <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # to this thread, which blocks it
        assert stop.signal == signal.SIGTERM  # pending while blocked, delivered when the mask is restored
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


def test_children_started_inside_the_block_inherit_it() -> None:
    """fork + exec keeps the mask: a helper started meanwhile never receives USR2/TERM."""
    with dist.preempt_signals_blocked():
        out = subprocess.run([sys.executable, "-c", READ_MASK], capture_output=True, text=True, check=True).stdout
    blocked, _ignored = (_bits(x) for x in out.split())
    assert {signal.SIGUSR2, signal.SIGTERM} <= blocked
    out = subprocess.run([sys.executable, "-c", READ_MASK], capture_output=True, text=True, check=True).stdout
    assert not {signal.SIGUSR2, signal.SIGTERM} & _bits(out.split()[0])  # and only those


def test_a_worker_that_ignores_the_signals_survives_them() -> None:
    code = (
        "import os, signal\nfrom bonehpc import dist\ndist.ignore_preempt_signals()\n"
        "os.kill(os.getpid(), signal.SIGUSR2)\nos.kill(os.getpid(), signal.SIGTERM)\nprint('alive')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "alive", res.stderr
    res = subprocess.run(
        [sys.executable, "-c", "import os, signal\nos.kill(os.getpid(), signal.SIGUSR2)\nprint('alive')"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == -signal.SIGUSR2  # without it, USR2's default action ends the process
