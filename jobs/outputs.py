"""OutputsTask: the teacher-outputs job of one fold (between the teacher and its students), as torchrun on a task.

Launched, signalled, requeued and failed exactly like `jobs.train.TrainTask` (it is one, with another module and
run folder): torchrun over `python -m bonehpc.cli.outputs --config C --fold k`. The job writes
runs/<exp>/<fold>/outputs/teacher_outputs.h5 (`bonehpc.teacher_outputs`) and resumes after its last finished
epoch when requeued. A fold whose cache already matches its teacher and config is not run again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from jobs.train import TrainTask, _task_logging

log = logging.getLogger(__name__)


class OutputsTask(TrainTask):
    """The outputs job of the fold given at call time (see the module docstring).

    Args:
        cfg_path: the experiment's (or tune study's) saved config.yaml.
        role: "outputs" (kept for TrainTask's requeue, which rebuilds the task from its arguments).
        workdir: working directory of the job.
        nproc_per_node: processes per node (0: one per GPU, 1 without GPUs).
    """

    module = "bonehpc.cli.outputs"

    def __init__(self, cfg_path: str, role: str = "outputs", workdir: str = "", nproc_per_node: int = 0) -> None:
        super().__init__(cfg_path, role, workdir, nproc_per_node)

    def _metrics_path(self, fold: int | str) -> Path:
        from bonehpc.config import load_config
        from bonehpc.paths import RUN_METRICS, ExperimentPaths

        return ExperimentPaths.of(load_config(self.cfg_path)).outputs_dir(fold) / RUN_METRICS

    def __call__(self, fold: int | str) -> dict[str, Any]:
        from bonehpc.config import load_config
        from bonehpc.teacher_outputs import outputs_current

        _task_logging()
        if self.workdir:
            os.chdir(self.workdir)
        metrics_path = self._metrics_path(fold)
        if outputs_current(load_config(self.cfg_path), fold) and metrics_path.is_file():
            log.info("teacher outputs of %s are current; nothing to do", fold)
            return dict(json.loads(metrics_path.read_text()))
        # metrics.json of an earlier teacher or config (this job wrote it): the job runs again and rewrites it
        metrics_path.unlink(missing_ok=True)
        return super().__call__(fold)
