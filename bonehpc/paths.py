"""Where every file of an experiment lives (one place, so jobs, reports and tests agree)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bonehpc.fsio import load_json_bounded

if TYPE_CHECKING:
    from bonehpc.config import ExperimentConfig

CORE_ROLES = ("teacher", "student")
ROLES = (*CORE_ROLES, "baseline")
"""Training roles: the teacher, the KD student and the optional baseline (the student trained without KD,
when distill.baseline is set; see experiment_roles)."""
HOLDOUT_MODELS = (
    "final_teacher",
    "final_student",
    "ensemble_teacher",
    "ensemble_student",
    "final_baseline",
    "ensemble_baseline",
)

# Files of one training run (ExperimentPaths.role_dir(fold, role)); see docs/architecture.md.
RUN_CONFIG = "config.yaml"
RUN_METRICS = "metrics.json"  # written last: its presence with status "completed" means the run is done
RUN_EPOCHS = "metrics.jsonl"
RUN_PREDICTIONS = "predictions_val.csv"
RUN_LOG = "train.log"
LAST_CKPT = "last.pt"
BEST_CKPT = "best.pt"
# The teacher-outputs stage of a fold (bonehpc.teacher_outputs): runs/<exp>/<fold>/outputs/, beside the teacher.
OUTPUTS_ROLE = "outputs"
OUTPUTS_FILE = "teacher_outputs.h5"
# Files of one holdout model (ExperimentPaths.holdout_dir(model)).
HOLDOUT_PREDICTIONS = "predictions.csv"
HOLDOUT_METRICS = "metrics.json"
# Files of an experiment folder.
REPORT_INDEX = "index.html"
REPORT_MARKDOWN = "report.md"
BEST_PARAMS = "best_params.yaml"
JOBS_REGISTRY = "jobs.json"  # bonehpc.registry: every submission of the experiment (and of its tuning study)
TUNE_JOURNAL = "journal.log"

STATUS_COMPLETED = "completed"


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing or unreadable (a half-written file cannot
    exist: bonehpc writes atomically)."""
    try:
        obj = load_json_bounded(path)  # ValueError also for a file too large or nested too deep
    except (OSError, ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
        return None
    return obj if isinstance(obj, dict) else None


def run_status(run_dir: Path) -> str:
    """State of one training (or holdout) run folder: "completed", "incomplete" (started, no final
    metrics) or "missing" (no folder). The one definition of "is this run done?"."""
    run_dir = Path(run_dir)
    doc = read_json(run_dir / RUN_METRICS)
    if doc is not None:
        return STATUS_COMPLETED if doc.get("status", STATUS_COMPLETED) == STATUS_COMPLETED else "incomplete"
    return "incomplete" if run_dir.is_dir() else "missing"


def run_completed(run_dir: Path) -> bool:
    return run_status(run_dir) == STATUS_COMPLETED


def fold_name(fold: int | str) -> str:
    """'fold3' for 3, 'final' for 'final'."""
    if fold == "final":
        return "final"
    if isinstance(fold, int) and not isinstance(fold, bool) and fold >= 0:
        return f"fold{fold}"
    raise ValueError(f"fold must be a non-negative int or 'final', got {fold!r}")


def parse_fold(text: str) -> int | str:
    """'final' or a non-negative int, from a command line (ValueError otherwise)."""
    if text == "final":
        return "final"
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"--fold must be a fold number or 'final', got {text!r}") from None
    fold_name(k)
    return k


def experiment_roles(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The roles an experiment trains per fold: teacher and student, plus baseline when distill.baseline."""
    return ROLES if cfg.distill.baseline else CORE_ROLES


def fold_keys(num_folds: int) -> list[int | str]:
    """Array order of the fold graph: 0..K-1, then "final"."""
    return [*range(num_folds), "final"]


@dataclass(frozen=True)
class ExperimentPaths:
    """Paths of one experiment: runs/<name>/..."""

    root: Path

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> ExperimentPaths:
        """Paths of the experiment `cfg` describes (run_root/name)."""
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
        return self.root / JOBS_REGISTRY

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
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return self.root / fold_name(fold) / role

    def outputs_dir(self, fold: int | str) -> Path:
        """The teacher-outputs folder of a fold (OUTPUTS_FILE, metrics.json, outputs.log)."""
        return self.root / fold_name(fold) / OUTPUTS_ROLE

    def holdout_dir(self, model: str) -> Path:
        if model not in HOLDOUT_MODELS:
            raise ValueError(f"holdout model must be one of {HOLDOUT_MODELS}, got {model!r}")
        return self.holdout / model

    def role_completed(self, fold: int | str, role: str) -> bool:
        return run_completed(self.role_dir(fold, role))

    def holdout_completed(self, roles: tuple[str, ...] = CORE_ROLES) -> bool:
        """Every holdout model of these roles (final_<role>, ensemble_<role>) has its metrics and the report
        exists."""
        models = [m for m in HOLDOUT_MODELS if m.split("_", 1)[1] in roles]
        return (
            all((self.holdout_dir(m) / HOLDOUT_METRICS).is_file() for m in models)
            and (self.report / REPORT_INDEX).is_file()
        )

    @property
    def best_params(self) -> Path:
        return self.tune / BEST_PARAMS

    @property
    def tune_journal(self) -> Path:
        return self.tune / TUNE_JOURNAL

    def study_dir(self, study: str = "") -> Path:
        """Files of one Optuna study (config.yaml, best_params.yaml, tasks/, trials/): tune/ for the
        experiment's own study (study ""), tune/studies/<study>/ for another; the journal file is shared."""
        return self.tune / "studies" / study if study else self.tune

    def trial_dir(self, number: int, study: str = "") -> Path:
        return self.study_dir(study) / "trials" / str(number)
