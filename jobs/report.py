"""ReportTask: build the aggregated report of an experiment (runs/<exp>/report/) inside a job."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


class ReportTask:
    """Call bonehpc.report.build_report on the experiment of a saved config; returns the report path."""

    def __init__(self, cfg_path: str, workdir: str = "") -> None:
        self.cfg_path = cfg_path
        self.workdir = workdir

    def __call__(self) -> str:
        from bonehpc.config import load_config
        from bonehpc.paths import ExperimentPaths
        from bonehpc.report import build_report

        if self.workdir:
            os.chdir(self.workdir)
        paths = ExperimentPaths.of(load_config(self.cfg_path))
        out = build_report(paths.root)
        log.info("report written: %s", out)
        return str(out)
