"""Where every file of an experiment lives (one place, so jobs, reports and tests agree)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bonehpc.config import ExperimentConfig

ROLES = ("teacher", "student")
HOLDOUT_MODELS = ("final_teacher", "final_student", "ensemble_teacher", "ensemble_student")


def fold_name(fold: int | str) -> str:
    """'fold3' for 3, 'final' for 'final'."""
    if fold == "final":
        return "final"
    if isinstance(fold, int) and not isinstance(fold, bool) and fold >= 0:
        return f"fold{fold}"
    raise ValueError(f"fold must be a non-negative int or 'final', got {fold!r}")


@dataclass(frozen=True)
class ExperimentPaths:
    """Paths of one experiment: runs/<name>/..."""

    root: Path

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> ExperimentPaths:
        return cls(Path(cfg.run_root) / cfg.name)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs.json"

    @property
    def submitit(self) -> Path:
        return self.root / "submitit"

    @property
    def holdout(self) -> Path:
        return self.root / "holdout"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def role_dir(self, fold: int | str, role: str) -> Path:
        if role not in ROLES:
            raise ValueError(f"role must be teacher or student, got {role!r}")
        return self.root / fold_name(fold) / role

    def holdout_dir(self, model: str) -> Path:
        if model not in HOLDOUT_MODELS:
            raise ValueError(f"holdout model must be one of {HOLDOUT_MODELS}, got {model!r}")
        return self.holdout / model
