"""Reading an experiment folder for the report (runs, holdout models, config, sacct), through bonehpc.paths only."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bonehpc import metrics as M
from bonehpc.config import ExperimentConfig, from_dict, read_yaml
from bonehpc.constants import PRED_COLUMNS
from bonehpc.fsio import read_bytes_bounded, read_text_bounded
from bonehpc.paths import (
    CORE_ROLES,
    HOLDOUT_METRICS,
    HOLDOUT_MODELS,
    HOLDOUT_PREDICTIONS,
    ROLES,
    RUN_CONFIG,
    RUN_EPOCHS,
    RUN_METRICS,
    RUN_PREDICTIONS,
    ExperimentPaths,
    experiment_roles,
)

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One fold/role training run as found on disk."""

    fold: str  # fold0 ... | final
    role: str
    path: Path
    state: str  # completed | incomplete | missing
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)  # metrics.json
    history: pd.DataFrame | None = None  # metrics.jsonl
    preds: pd.DataFrame | None = None  # predictions_val.csv
    metrics: dict[str, float] = field(default_factory=dict)  # recomputed

    @property
    def label(self) -> str:
        return f"{self.fold} {self.role}"


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(read_text_bounded(path))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    for i, line in enumerate(read_text_bounded(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # a job killed mid-write leaves a torn last line; the earlier epochs are still valid
            log.warning("%s:%d: skipping an unparsable line", path, i)
    return pd.DataFrame(rows)


def read_predictions(path: Path) -> pd.DataFrame:
    """A predictions CSV (image_id, study, body_part, label, prob); names the file and the missing columns."""
    df = pd.read_csv(io.BytesIO(read_bytes_bounded(path)))
    missing = [c for c in PRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    if df.empty:
        raise ValueError(f"{path}: no rows")
    return df


def study_level(df: pd.DataFrame) -> pd.DataFrame:
    """One row per study (`bonehpc.metrics.study_table`, the one aggregation: unit and label rule there)."""
    return M.study_table(df)


def _evaluate(df: pd.DataFrame) -> dict[str, float]:
    from bonehpc.metrics import evaluate_predictions

    return {k: float(v) for k, v in evaluate_predictions(df).items()}


def load_experiment_config(exp_dir: Path) -> tuple[ExperimentConfig | None, dict[str, Any], str]:
    """(config or None, raw dict, problem) of runs/<exp>/config.yaml."""
    path = ExperimentPaths(exp_dir).config
    if not path.is_file():
        # experiments run without `bonehpc submit` have no top-level copy; every run saved its resolved config
        runs = sorted(exp_dir.glob(f"*/*/{RUN_CONFIG}"))
        if not runs:
            return None, {}, f"{path} not found"
        log.info("%s not found; using %s", path, runs[0])
        path = runs[0]
    try:
        raw = read_yaml(path)
    except Exception as err:  # noqa: BLE001 - reported in the document
        return None, {}, str(err)
    try:
        return from_dict(raw), raw, ""
    except Exception as err:  # noqa: BLE001
        return None, raw, f"{path}: {err}"


def _sacct_states(acct: pd.DataFrame | None) -> dict[tuple[str, str], str]:
    """(fold name, role) -> last sacct state, from the accounting table (lenient about the fold spelling)."""
    out: dict[tuple[str, str], str] = {}
    if acct is None or acct.empty or not {"fold", "role", "state"} <= set(acct.columns):
        return out
    for _, r in acct.iterrows():
        f = str(r["fold"])
        fold = f if f.startswith("fold") or f == "final" else (f"fold{f}" if f.isdigit() else f)
        out[(fold, str(r["role"]))] = str(r["state"])
    return out


def collect_run(paths: ExperimentPaths, fold: int | str, role: str, sacct: Mapping[tuple[str, str], str]) -> Run:
    """Read one run directory; never raises for missing or broken files (the Run says what is wrong)."""
    d = paths.role_dir(fold, role)
    fname = d.parent.name
    run = Run(fold=fname, role=role, path=d, state="missing")
    sstate = sacct.get((fname, role))
    where = f" ({sstate} in sacct)" if sstate else ""
    if (d / RUN_EPOCHS).is_file():
        try:
            run.history = _read_jsonl(d / RUN_EPOCHS)
        except OSError as err:
            log.warning("%s: %s", d / RUN_EPOCHS, err)
    if not d.is_dir():
        if not where and sacct:
            where = " (no job recorded in sacct)"
        run.reason = f"missing: no run directory{where}"
        return run
    if not (d / RUN_METRICS).is_file():
        n = 0 if run.history is None else len(run.history)
        run.state = "incomplete"
        run.reason = f"missing: no metrics.json, {n} epoch(s) logged{where}"
        return run
    try:
        run.summary = _read_json(d / RUN_METRICS)
        run.preds = read_predictions(d / RUN_PREDICTIONS)
        run.metrics = _evaluate(run.preds)
    except Exception as err:  # noqa: BLE001 - a broken run is reported, the rest of the report still builds
        run.state = "incomplete"
        run.reason = f"missing: unreadable results ({err}){where}"
        return run
    status = run.summary.get("status", "completed")
    run.state = "completed" if status == "completed" else "incomplete"
    if run.state != "completed":
        run.reason = f"status {status!r} in metrics.json{where}"
    return run


@dataclass
class Experiment:
    root: Path
    name: str
    cfg: ExperimentConfig | None
    raw_cfg: dict[str, Any]
    cfg_problem: str
    folds: list[int]
    runs: dict[tuple[str, str], Run]
    holdout: dict[str, tuple[pd.DataFrame | None, dict[str, float], dict[str, Any], str]]
    acct: pd.DataFrame | None
    acct_problem: str
    roles: tuple[str, ...] = CORE_ROLES  # teacher, student, and "baseline" when this experiment has one
    cache: dict[str, Any] = field(default_factory=dict)  # bootstrap tables shared by several sections

    @property
    def has_baseline(self) -> bool:
        return "baseline" in self.roles

    def cv_runs(self, role: str) -> list[Run]:
        return [self.runs[(f"fold{k}", role)] for k in self.folds]

    @property
    def paths(self) -> ExperimentPaths:
        """Where the experiment's files are (bonehpc.paths: the report names no file itself)."""
        return ExperimentPaths(self.root)

    @property
    def early_stop_metric(self) -> str:
        return self.cfg.train.early_stop_metric if self.cfg else "val/study_kappa"


def _accounting(exp_dir: Path) -> tuple[pd.DataFrame | None, str]:
    try:
        from bonehpc.accounting import experiment_status
    except ImportError as err:
        return None, f"bonehpc.accounting is not importable ({err})"
    try:
        df = experiment_status(exp_dir)
    except Exception as err:  # noqa: BLE001 - no Slurm here is a normal case, reported as such
        return None, f"{type(err).__name__}: {err}"
    if df is None or len(df) == 0:
        return None, "sacct returned no jobs for this experiment (not run on Slurm, or accounting disabled)"
    return df, ""


def load_experiment(exp_dir: str | Path) -> Experiment:
    """Everything the report needs from runs/<exp>/ (missing parts recorded, never raised)."""
    root = Path(exp_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"experiment folder not found: {root}")
    cfg, raw, problem = load_experiment_config(root)
    paths = ExperimentPaths(root)
    k = cfg.data.num_folds if cfg else 0
    on_disk = [int(m.group(1)) for p in root.glob("fold*") if (m := re.fullmatch(r"fold(\d+)", p.name))]
    folds = sorted(set(range(k)) | set(on_disk))
    acct, acct_problem = _accounting(root)
    sacct = _sacct_states(acct)
    roles = report_roles(root, cfg)
    runs = {}
    fold_keys: list[int | str] = [*folds, "final"]
    for fold in fold_keys:
        for role in roles:
            r = collect_run(paths, fold, role, sacct)
            runs[(r.fold, role)] = r
    holdout: dict[str, tuple[pd.DataFrame | None, dict[str, float], dict[str, Any], str]] = {}
    for model in [m for m in HOLDOUT_MODELS if m.split("_", 1)[1] in roles]:
        d = paths.holdout_dir(model)
        if not (d / HOLDOUT_PREDICTIONS).is_file():
            holdout[model] = (None, {}, {}, f"missing: {d / HOLDOUT_PREDICTIONS} not found")
            continue
        try:
            preds = read_predictions(d / HOLDOUT_PREDICTIONS)
            meta = _read_json(d / HOLDOUT_METRICS) if (d / HOLDOUT_METRICS).is_file() else {}
            holdout[model] = (preds, _evaluate(preds), meta, "")
        except Exception as err:  # noqa: BLE001
            holdout[model] = (None, {}, {}, f"missing: unreadable ({err})")
    name = cfg.name if cfg else root.name
    return Experiment(root, name, cfg, raw, problem, folds, runs, holdout, acct, acct_problem, roles)


def report_roles(root: Path, cfg: ExperimentConfig | None) -> tuple[str, ...]:
    """The roles the config trains (paths.experiment_roles: the no-KD baseline when distill.baseline), plus
    any optional role of paths.ROLES that has a run or holdout folder here: an experiment without a baseline
    is not reported as missing one."""
    wanted = experiment_roles(cfg) if cfg is not None else CORE_ROLES
    return tuple(r for r in ROLES if r in wanted or any(root.glob(f"*/{r}")) or any(root.glob(f"holdout/*_{r}")))


def _cached(exp: Experiment, key: str, make: Callable[[], Any]) -> Any:
    if key not in exp.cache:
        exp.cache[key] = make()
    return exp.cache[key]


def oof_studies(exp: Experiment) -> dict[str, pd.DataFrame]:
    """role -> study table of its pooled out-of-fold predictions (roles with at least one completed fold)."""

    def make() -> dict[str, pd.DataFrame]:
        return {r: study_level(o) for r in exp.roles if (o := oof_predictions(exp, r)) is not None}

    return _cached(exp, "oof_studies", make)


def holdout_studies(exp: Experiment) -> dict[str, pd.DataFrame]:
    return _cached(
        exp, "holdout_studies", lambda: {m: study_level(p) for m, (p, *_) in exp.holdout.items() if p is not None}
    )


def oof_ci(exp: Experiment) -> pd.DataFrame:
    """Bootstrap CIs of the pooled out-of-fold study predictions per role, overall and per body part."""
    tables = oof_studies(exp)
    return _cached(exp, "oof_ci", lambda: M.ci_table(tables) if tables else pd.DataFrame())


def holdout_ci(exp: Experiment) -> pd.DataFrame:
    tables = holdout_studies(exp)
    return _cached(exp, "holdout_ci", lambda: M.ci_table(tables) if tables else pd.DataFrame())


def oof_predictions(exp: Experiment, role: str) -> pd.DataFrame | None:
    """Out-of-fold predictions of a role: every completed fold's validation images (each image once)."""
    frames = [r.preds.assign(fold=r.fold) for r in exp.cv_runs(role) if r.state == "completed" and r.preds is not None]
    return pd.concat(frames, ignore_index=True) if frames else None
