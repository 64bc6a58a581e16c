"""TrainTask: one fold x role of an experiment, as torchrun DDP on the node(s) of a Slurm task.

Signals (see slurm/README.md): Slurm sends USR2 `signal_delay_s` before the time limit, and on preemption
USR2 too where the site sets `PreemptParameters=send_user_signal` (the dev cluster: preempt_send_user_signal),
otherwise SIGTERM (then SIGKILL after KillWait/GraceTime). Both reach every process of the step:
- USR2: submitit calls `checkpoint()`, which asks the trainers to save, waits, and requeues the task.
- TERM: the trainers save last.pt and exit (bonehpc.dist.StopFlag). When Slurm is ending the job (scancel,
  preemption, scontrol requeue: the job is no longer RUNNING) this task exits with PREEMPTED_EXIT_CODE and
  Slurm requeues the job or ends it; a TERM to a RUNNING job (scancel --signal=TERM) is handled like USR2.
  The next run resumes from last.pt either way; a cancelled task stays cancelled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import submitit

from bonehpc.constants import PREEMPTED_EXIT_CODE
from bonehpc.lease import die_with_parent
from bonehpc.paths import run_completed
from bonehpc.resources import (
    DEFAULT_SAVE_WAIT_S,
    asked_cpus,
    asked_gpus,
    check_task,
    cpu_affinity,
    last_error_line,
    rendezvous_port,
    thread_env,
)

log = logging.getLogger(__name__)


def save_wait_s() -> float:
    """Upper bound on how long checkpoint() waits for the trainers to save (the profile's save_wait_s)."""
    return float(os.environ.get("BONEHPC_SAVE_WAIT_S", "") or DEFAULT_SAVE_WAIT_S)


def own_job_state(timeout_s: float = 10.0) -> str:
    """This Slurm task's state as the controller holds it now (RUNNING, COMPLETING, ...); '' when unknown.

    A job that Slurm is ending (scancel, preemption, requeue, time limit) is already out of RUNNING when its
    processes get SIGTERM: the controller changes the state before it asks the node to signal them.
    """
    job = os.environ.get("SLURM_JOB_ID", "")
    if not job.isdigit() or not shutil.which("squeue"):
        return ""
    try:
        res = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = res.stdout.split()
    return lines[0].strip().upper() if res.returncode == 0 and lines else ""


def _ignore_usr2() -> None:
    # Slurm signals every process of the job step. torchrun's agent has no SIGUSR2 handler, and the
    # default action would kill it; ignoring it here is inherited through exec. The trainers install
    # their own handler (bonehpc.dist.StopFlag), which replaces the inherited SIG_IGN.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _torchrun_preexec(parent: int) -> None:
    """In the torchrun child before exec: ignore USR2, and die with this task (torchrun runs in its own
    session, so nothing else would end it once the task process is killed)."""
    _ignore_usr2()
    die_with_parent(signal.SIGKILL, parent)


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


def first_node(env: Mapping[str, str] | None = None) -> str:
    """Host name of the allocation's first node (the rendezvous host of multi-node runs)."""
    nodelist = (os.environ if env is None else env).get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    return out[0]


def torchrun_command(
    cfg_path: str,
    fold: int | str,
    role: str,
    nproc: int,
    python: str,
    module: str = "bonehpc.cli.train",
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """torchrun over `python -m bonehpc.cli.train` for this node (standalone, or c10d rendezvous across nodes).

    `env` (default os.environ) is the Slurm environment of the task: SLURM_JOB_NUM_NODES, SLURM_NODEID,
    SLURM_JOB_ID (the rendezvous port), SLURM_JOB_NODELIST (the rendezvous host: the first node).
    """
    env = os.environ if env is None else env
    nnodes = int(env.get("SLURM_JOB_NUM_NODES", "1"))
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--max_restarts=0"]
    if nnodes > 1:
        job = env.get("SLURM_ARRAY_JOB_ID", env.get("SLURM_JOB_ID", "0"))
        task = env.get("SLURM_ARRAY_TASK_ID", "0")
        # every array task has its own SLURM_JOB_ID: tasks running side by side get different ports
        port = rendezvous_port(env.get("SLURM_JOB_ID", "0"))
        cmd += [
            f"--nnodes={nnodes}",
            f"--node_rank={env.get('SLURM_NODEID', '0')}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={first_node(env)}:{port}",
            f"--rdzv_id={job}_{task}",
        ]
    else:
        cmd.append("--standalone")
    # --config=PATH: a path that starts with '-' (run_root=-x) stays the option's value, not an option
    return [*cmd, "-m", module, f"--config={cfg_path}", "--fold", str(fold), "--role", role]


def _task_logging() -> None:
    """This module's lines (the start-of-task line above all) into the task's stderr log: submitit sets up
    only its own logger in the job process."""
    if os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local") and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s (%(asctime)s) - %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _own_log_error() -> str:
    """The last exception line in this task's own stderr log (torchrun and the trainers write there)."""
    sys.stderr.flush()
    try:
        path = submitit.JobEnvironment().paths.stderr
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 2_000_000))
            return last_error_line(fh.read().decode(errors="replace"))
    except (OSError, RuntimeError, KeyError):
        return ""


class TrainTask(submitit.helpers.Checkpointable):
    """Train `role` on the fold given at call time; requeues itself from last.pt on timeout/preemption.

    Args:
        cfg_path: the experiment's saved config.yaml.
        role: teacher or student.
        workdir: working directory of the job (relative config paths resolve there).
        nproc_per_node: training processes per node (0: one per GPU, 1 without GPUs).
    """

    module = "bonehpc.cli.train"
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
        from bonehpc.paths import RUN_METRICS, ExperimentPaths

        return ExperimentPaths.of(load_config(self.cfg_path)).role_dir(fold, self.role) / RUN_METRICS

    def _launch_env(self, nproc: int) -> dict[str, str]:
        """The trainers' environment: OpenMP threads = this task's CPUs / processes (unless set by the user)."""
        from bonehpc.config import load_config

        threads = load_config(self.cfg_path).train.num_threads
        return {**os.environ, **thread_env(len(cpu_affinity()), nproc, os.environ, threads)}

    def __call__(self, fold: int | str) -> dict[str, Any]:
        _task_logging()
        if self.workdir:
            os.chdir(self.workdir)
        metrics_path = self._metrics_path(fold)
        if run_completed(metrics_path.parent):
            log.info("%s of %s already completed; nothing to do", self.role, fold)
            return json.loads(metrics_path.read_text())
        gpus = asked_gpus()
        nproc = self.nproc_per_node or gpus or nproc_for_node(0)
        # fails in one line when the step got fewer CPUs or usable GPUs than the profile asked for
        log.info(
            check_task(
                cpus=asked_cpus(), gpus=gpus, nproc=nproc, nnodes=int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
            )
        )
        cmd = torchrun_command(self.cfg_path, fold, self.role, nproc, sys.executable, self.module)
        env = self._launch_env(nproc)
        omp = " ".join(f"{k}={env[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in env)
        log.info("starting (%s): %s", omp, " ".join(cmd))
        parent = os.getpid()
        self._proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, preexec_fn=lambda: _torchrun_preexec(parent)
        )
        previous_term = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            # poll, not wait(): wait() holds Popen's lock while blocked, and checkpoint() (run by submitit's
            # signal handler in this thread) must be able to wait for the same process
            while (rc := self._proc.poll()) is None:
                time.sleep(0.5)
        finally:
            signal.signal(signal.SIGTERM, previous_term)
        if rc != 0 and self._stopping:
            log.warning("torchrun exited with %d after a stop signal; exiting as preempted (resume from last.pt)", rc)
            raise SystemExit(PREEMPTED_EXIT_CODE)
        if rc != 0:
            cause = _own_log_error()
            raise RuntimeError(
                f"training {self.role} of {fold} failed (torchrun exited with {rc})" + (f": {cause}" if cause else "")
            )
        return json.loads(metrics_path.read_text())

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """SIGTERM (preemption without a user signal, scontrol requeue, scancel): stop like on USR2.

        A TERM to a job that is still RUNNING (`scancel --signal=TERM`, a site's preemption script) goes to
        submitit's USR2 handler, which checkpoints and requeues. A job that Slurm itself is ending (scancel,
        preemption, scontrol requeue) only saves: Slurm requeues it or ends it. Outside Slurm the trainers
        are asked to save and this task exits as preempted.
        """
        if self._stopping:
            return
        log.warning("SIGTERM: asking the trainers to save last.pt and stop")
        usr2 = signal.getsignal(signal.SIGUSR2)
        if callable(usr2) and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            state = own_job_state()
            if state in ("", "RUNNING"):  # a bare TERM (a site's preemption script): requeue ourselves
                usr2(signal.SIGUSR2, frame)  # submitit: checkpoint() + scontrol requeue + exit
                return
            # Slurm itself is ending the job (scancel, preemption with requeue, scontrol requeue, the hard time
            # limit): it decides what comes next. Requeueing here would undo a user's scancel, because
            # `scontrol requeue` also takes a job that has just been cancelled.
            log.warning("the job is %s: saving without requeueing it (Slurm decides what comes next)", state)
        self._stop_trainers()

    def _stop_trainers(self) -> None:
        """Forward SIGUSR2 to the trainers and wait (save_wait_s at most) for torchrun to exit."""
        self._stopping = True
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        trainers = child_pids(proc.pid)
        log.info("forwarding SIGUSR2 to trainers %s of torchrun %d", trainers, proc.pid)
        for pid in trainers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR2)
        wait = save_wait_s()
        try:
            rc = proc.wait(timeout=wait)
            log.info("torchrun exited with %d after the stop request", rc)
        except subprocess.TimeoutExpired:
            log.warning("trainers did not exit within %.0f s; killing them (resume from the last save)", wait)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def checkpoint(self, fold: int | str) -> submitit.helpers.DelayedSubmission:
        """Ask the trainers to save (SIGUSR2), wait for them, and requeue a fresh task that resumes."""
        self._stop_trainers()
        return submitit.helpers.DelayedSubmission(
            type(self)(self.cfg_path, self.role, self.workdir, self.nproc_per_node), fold
        )
