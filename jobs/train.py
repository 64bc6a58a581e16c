"""TrainTask: one fold x role of an experiment, as torchrun DDP on the node(s) of a Slurm task."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 3  # bonehpc.train exits 3 after saving last.pt on SIGUSR2/SIGTERM
SAVE_WAIT_S = 90.0  # upper bound on how long checkpoint() waits for the trainers to save


def _ignore_usr2() -> None:
    # Slurm signals every process of the job step. torchrun's agent has no SIGUSR2 handler, and the
    # default action would kill it; ignoring it here is inherited through exec. The trainers install
    # their own handler (bonehpc.dist.StopFlag), which replaces the inherited SIG_IGN.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (from /proc, so no extra dependency)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def nproc_for_node(configured: int) -> int:
    """Training processes on this node: the configured number, else one per visible GPU, else 1."""
    if configured > 0:
        return configured
    import torch

    return torch.cuda.device_count() or 1


def first_node() -> str:
    """Host name of the allocation's first node (the rendezvous host of multi-node runs)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    return out[0]


def torchrun_command(
    cfg_path: str, fold: int | str, role: str, nproc: int, python: str, module: str = "bonehpc.train"
) -> list[str]:
    """torchrun over `python -m bonehpc.train` for this node (standalone, or c10d rendezvous across nodes)."""
    nnodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--max_restarts=0"]
    if nnodes > 1:
        job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "0"))
        task = os.environ.get("SLURM_ARRAY_TASK_ID", "0")
        port = 20000 + (int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
        cmd += [
            f"--nnodes={nnodes}",
            f"--node_rank={os.environ.get('SLURM_NODEID', '0')}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={first_node()}:{port}",
            f"--rdzv_id={job}_{task}",
        ]
    else:
        cmd.append("--standalone")
    return [*cmd, "-m", module, "--config", cfg_path, "--fold", str(fold), "--role", role]


class TrainTask(submitit.helpers.Checkpointable):
    """Train `role` on the fold given at call time; requeues itself from last.pt on timeout/preemption.

    Args:
        cfg_path: the experiment's saved config.yaml.
        role: teacher or student.
        workdir: working directory of the job (relative config paths resolve there).
        nproc_per_node: training processes per node (0: one per GPU, 1 without GPUs).
    """

    module = "bonehpc.train"
    """The training module torchrun starts (`python -m <module> --config C --fold k --role r`)."""

    def __init__(self, cfg_path: str, role: str, workdir: str = "", nproc_per_node: int = 0) -> None:
        self.cfg_path = cfg_path
        self.role = role
        self.workdir = workdir
        self.nproc_per_node = nproc_per_node
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False

    def _metrics_path(self, fold: int | str) -> Path:
        from bonehpc.config import load_config
        from bonehpc.paths import ExperimentPaths

        return ExperimentPaths.of(load_config(self.cfg_path)).role_dir(fold, self.role) / "metrics.json"

    def __call__(self, fold: int | str) -> dict[str, Any]:
        if self.workdir:
            os.chdir(self.workdir)
        metrics_path = self._metrics_path(fold)
        if metrics_path.is_file() and json.loads(metrics_path.read_text()).get("status") == "completed":
            log.info("%s of %s already completed; nothing to do", self.role, fold)
            return json.loads(metrics_path.read_text())
        nproc = nproc_for_node(self.nproc_per_node)
        cmd = torchrun_command(self.cfg_path, fold, self.role, nproc, sys.executable, self.module)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        log.info("starting: %s", " ".join(cmd))
        self._proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_ignore_usr2)
        # poll, not wait(): wait() holds Popen's lock while blocked, and checkpoint() (run by submitit's
        # signal handler in this thread) must be able to wait for the same process
        while (rc := self._proc.poll()) is None:
            time.sleep(0.5)
        if rc != 0:
            raise RuntimeError(f"training {self.role} of {fold} failed: torchrun exited with {rc} (log above)")
        return json.loads(metrics_path.read_text())

    def checkpoint(self, fold: int | str) -> submitit.helpers.DelayedSubmission:
        """Ask the trainers to save (SIGUSR2), wait for them, and requeue a fresh task that resumes."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            trainers = child_pids(proc.pid)
            log.info("forwarding SIGUSR2 to trainers %s of torchrun %d", trainers, proc.pid)
            for pid in trainers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR2)
            try:
                rc = proc.wait(timeout=SAVE_WAIT_S)
                log.info("torchrun exited with %d after the stop request", rc)
            except subprocess.TimeoutExpired:
                log.warning(
                    "trainers did not exit within %.0f s; killing them (resume from the last save)", SAVE_WAIT_S
                )
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return submitit.helpers.DelayedSubmission(
            type(self)(self.cfg_path, self.role, self.workdir, self.nproc_per_node), fold
        )
