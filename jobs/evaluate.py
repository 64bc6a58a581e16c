"""EvaluateTask: after the fold graph (also when folds failed): outcome of every run, holdout, report."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class EvaluateTask:
    """Record which fold/role runs completed or failed, evaluate the holdout when the final models exist,
    then build the report.

    Writes runs/<exp>/holdout/outcome.json: {"status", "completed": [...], "failed": [...], "holdout": ...}.
    Fails (non-zero exit) only when the holdout evaluation or the report itself fails.
    """

    def __init__(self, cfg_path: str, workdir: str = "") -> None:
        self.cfg_path = cfg_path
        self.workdir = workdir

    def __call__(self) -> dict[str, Any]:
        from bonehpc.config import load_config
        from bonehpc.lease import RunLease
        from bonehpc.paths import ExperimentPaths

        if self.workdir:
            os.chdir(self.workdir)
        cfg = load_config(self.cfg_path)
        paths = ExperimentPaths.of(cfg)
        paths.holdout.mkdir(parents=True, exist_ok=True)
        # one evaluation at a time writes holdout/ and the report (a second one exits naming the first)
        with RunLease(paths.holdout, what="evaluating this experiment"):
            return self._evaluate(cfg, paths)

    def _evaluate(self, cfg: Any, paths: Any) -> dict[str, Any]:
        from bonehpc.fsio import atomic_write_json
        from bonehpc.paths import CORE_ROLES, experiment_roles, fold_keys, fold_name

        outcome: dict[str, Any] = {"status": "completed", "completed": [], "failed": []}
        for fold in fold_keys(cfg.data.num_folds):
            for role in experiment_roles(cfg):
                done = paths.role_completed(fold, role)
                outcome["completed" if done else "failed"].append(f"{fold_name(fold)}/{role}")
        if outcome["failed"]:
            log.warning("runs without a completed metrics.json (marked failed): %s", ", ".join(outcome["failed"]))
        error: Exception | None = None
        if all(paths.role_completed("final", r) for r in CORE_ROLES):  # a failed baseline is left out
            from bonehpc.evaluate import evaluate_holdout

            try:
                outcome["holdout"] = evaluate_holdout(cfg)
            except Exception as err:  # noqa: BLE001 - recorded in outcome.json, re-raised below
                log.exception("holdout evaluation failed")
                outcome["holdout"] = f"failed: {err}"
                error = err
        else:
            outcome["holdout"] = "skipped: the final teacher or student did not complete"
        paths.holdout.mkdir(parents=True, exist_ok=True)
        atomic_write_json(paths.holdout / "outcome.json", outcome, indent=1)
        from bonehpc.report import build_report

        outcome["report"] = str(build_report(paths.root))
        log.info("report written: %s", outcome["report"])
        atomic_write_json(paths.holdout / "outcome.json", outcome, indent=1)
        if error is not None:
            raise RuntimeError(f"holdout evaluation failed: {error}") from error
        return outcome
