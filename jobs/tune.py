"""TuneTask: one task of the Optuna array job; runs trials of the experiment's study until its share is done."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import submitit

log = logging.getLogger(__name__)


class TuneTask(submitit.helpers.Checkpointable):
    """Array task `index` of `bonehpc submit tune`: bonehpc.tune.run_task on the saved tune config.

    Training runs in this process (one trial = one process; parallelism comes from the array). When it
    is stopped by SIGUSR2 (Slurm's time-limit warning or a preemption), train.run saves last.pt and
    raises Preempted, bonehpc.tune fails the trial and enqueues its retry, and the signal is handed to
    submitit's handler (restored when train.run returned), which checkpoints this task and requeues it.
    The requeued task, or whichever task asks first, resumes the retried trial from last.pt. On SIGTERM
    (scontrol requeue, scancel, preemption without a user signal) Slurm requeues or ends the job itself.

    Args:
        cfg_path: runs/<exp>/tune/config.yaml written by `submit tune`.
        workdir: working directory of the job (relative config paths resolve there).
    """

    def __init__(self, cfg_path: str, workdir: str = "") -> None:
        self.cfg_path = cfg_path
        self.workdir = workdir

    def __call__(self, index: int) -> list[dict[str, Any]]:
        from bonehpc.resources import asked_cpus, asked_gpus, check_task

        # the start-of-task line (a trial is one process); fails in one line on a CPU or GPU shortfall
        line = check_task(cpus=asked_cpus(), gpus=asked_gpus(), nproc=1)
        print(f"jobs.tune INFO - {line}", file=sys.stderr, flush=True)
        if self.workdir:
            os.chdir(self.workdir)
        from bonehpc.config import load_config
        from bonehpc.train import Preempted
        from bonehpc.tune import run_task

        cfg = load_config(self.cfg_path)
        try:
            return run_task(cfg, index)
        except Preempted as err:
            handler = signal.getsignal(signal.SIGUSR2)
            if err.signum == signal.SIGUSR2 and callable(handler):
                log.info("trial stopped by SIGUSR2 and re-enqueued; requeueing task %d", index)
                handler(signal.SIGUSR2, None)  # submitit: checkpoint() + requeue + exit
            raise

    def checkpoint(self, index: int) -> submitit.helpers.DelayedSubmission:
        """A fresh task with the same index: its state is in the study and tune/tasks/<index>.json."""
        return submitit.helpers.DelayedSubmission(type(self)(self.cfg_path, self.workdir), index)
