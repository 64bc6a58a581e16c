"""Aggregated experiment report: one self-contained HTML file, the same content as Markdown, every table as CSV.

`build_report(exp_dir)` reads only the files of an experiment (docs/architecture.md, "Files of one
training run" and "Experiment layout"), recomputes every metric from the saved predictions with
`bonehpc.metrics.evaluate_predictions` (so the tables always match the predictions), and writes
`<exp_dir>/report/{index.html, report.md, *.csv, *.png}`. A partial experiment (failed or running folds,
no holdout, no tuning, no Slurm) still gets a report that says what is missing and why.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from bonehpc import metrics as M
from bonehpc import report_plots as plots
from bonehpc.config import ExperimentConfig, from_dict, read_yaml
from bonehpc.constants import PRED_COLUMNS, THRESHOLD
from bonehpc.fsio import atomic_write_bytes, atomic_write_text
from bonehpc.paths import CORE_ROLES, HOLDOUT_MODELS, ROLES, ExperimentPaths, experiment_roles

log = logging.getLogger(__name__)

METRICS = ("accuracy", "precision", "recall", "f1", "auroc", "kappa")
LEVELS = ("image", "study")
# The seed project's published numbers (image level only, no kappa): quoted, never recomputed.
SEED_CV = {"accuracy": 0.822, "precision": 0.838, "recall": 0.716, "f1": 0.772}
SEED_HOLDOUT_ACCURACY = 0.8274
PACKAGES = {
    "torch": ("torch",),
    "timm": ("timm",),
    "nvidia-dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
    "optuna": ("optuna",),
    "submitit": ("submitit",),
    "albumentations": ("albumentations",),
    "h5py": ("h5py",),
    "scikit-learn": ("scikit-learn",),
    "pandas": ("pandas",),
    "numpy": ("numpy",),
    "matplotlib": ("matplotlib",),
}
UNIT_NOTE = (
    "Units: image-level metrics count every image (view) once; study-level metrics count every study once. "
    "The study probability is the mean of the abnormal probabilities of its views and a study is called abnormal "
    "when that mean is > 0.5 (MURA protocol); images use the same 0.5 threshold on their own probability. "
    "AUROC is threshold-free. Cohen's kappa is the official MURA metric (study level)."
)

# ----------------------------------------------------------------------------------------------
# A tiny document model rendered twice (HTML and Markdown).


@dataclass
class Text:
    text: str
    kind: str = "p"  # p | note | missing | pre


@dataclass
class Table:
    df: pd.DataFrame
    name: str  # CSV file stem
    caption: str = ""
    show: bool = True  # False: CSV only (machine-readable duplicates of a displayed table)


@dataclass
class Figure:
    png: bytes
    name: str  # PNG file stem
    caption: str = ""


Block = Text | Table | Figure


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)

    def p(self, text: str, kind: str = "p") -> None:
        self.blocks.append(Text(text, kind))

    def table(self, df: pd.DataFrame, name: str, caption: str = "", show: bool = True) -> None:
        self.blocks.append(Table(df, name, caption, show))

    def figure(self, fig: Any, name: str, caption: str = "") -> None:
        self.blocks.append(Figure(plots.png_bytes(fig), name, caption))


# ----------------------------------------------------------------------------------------------
# Reading the experiment.


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
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
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
    df = pd.read_csv(path)
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
    path = exp_dir / "config.yaml"
    if not path.is_file():
        # experiments run without `bonehpc submit` have no top-level copy; every run saved its resolved config
        runs = sorted(exp_dir.glob("*/*/config.yaml"))
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
    if (d / "metrics.jsonl").is_file():
        try:
            run.history = _read_jsonl(d / "metrics.jsonl")
        except OSError as err:
            log.warning("%s: %s", d / "metrics.jsonl", err)
    if not d.is_dir():
        if not where and sacct:
            where = " (no job recorded in sacct)"
        run.reason = f"missing: no run directory{where}"
        return run
    if not (d / "metrics.json").is_file():
        n = 0 if run.history is None else len(run.history)
        run.state = "incomplete"
        run.reason = f"missing: no metrics.json, {n} epoch(s) logged{where}"
        return run
    try:
        run.summary = _read_json(d / "metrics.json")
        run.preds = read_predictions(d / "predictions_val.csv")
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
        if not (d / "predictions.csv").is_file():
            holdout[model] = (None, {}, {}, f"missing: {d / 'predictions.csv'} not found")
            continue
        try:
            preds = read_predictions(d / "predictions.csv")
            meta = _read_json(d / "metrics.json") if (d / "metrics.json").is_file() else {}
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


# ----------------------------------------------------------------------------------------------
# Sections.


def _int_or_none(x: Any) -> int | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else int(x)


def _metric_row(m: Mapping[str, float], level: str) -> dict[str, Any]:
    row: dict[str, Any] = {k: _int_or_none(m.get(f"{level}_{k}")) for k in ("n", "n_pos")}
    row.update({k: m.get(f"{level}_{k}") for k in METRICS})
    return row


def cv_tables(exp: Experiment) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per fold rows, mean/std rows) of the cross-validation, both roles, both levels."""
    rows, summ = [], []
    for role in exp.roles:
        for level in LEVELS:
            vals = []
            for run in exp.cv_runs(role):
                if run.state == "completed":
                    r = _metric_row(run.metrics, level)
                    vals.append(r)
                    rows.append({"role": role, "fold": run.fold, "level": level, "status": "completed", **r})
                else:
                    rows.append({"role": role, "fold": run.fold, "level": level, "status": run.reason})
            for metric in METRICS:
                xs = np.array([v[metric] for v in vals if v[metric] is not None], dtype=float)
                summ.append(
                    {
                        "role": role,
                        "level": level,
                        "metric": metric,
                        "mean": float(np.nanmean(xs)) if xs.size and not np.isnan(xs).all() else math.nan,
                        "std": float(np.nanstd(xs)) if xs.size and not np.isnan(xs).all() else math.nan,
                        "folds": int(xs.size),
                        "of_folds": len(exp.folds),
                    }
                )
    cols = ["role", "fold", "level", "status", "n", "n_pos", *METRICS]
    return pd.DataFrame(rows).reindex(columns=cols), pd.DataFrame(summ)


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, (float, np.floating)):
        v = float(x)
        # 3 decimals for metrics; small values (learning rates) keep 3 significant digits
        return f"{v:.3g}" if 0 < abs(v) < 1e-2 else f"{v:.3f}"
    return str(x)


def _pm(mean: float, std: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _cv_display(
    per_fold: pd.DataFrame, summary: pd.DataFrame, level: str, pooled: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per-fold rows, the mean ± std row and (study level, `pooled` = oof_ci) the pooled out-of-fold row with
    its bootstrap CIs, per role."""
    out = []
    for role in dict.fromkeys(per_fold["role"]):
        sub = per_fold[(per_fold.role == role) & (per_fold.level == level)]
        for _, r in sub.iterrows():
            row = {"model": role, "fold": r["fold"]}
            if r["status"] == "completed":
                row.update({"studies" if level == "study" else "images": _fmt(int(r["n"]))})
                row.update({k: _fmt(r[k]) for k in METRICS})
            else:
                row.update({k: r["status"] if k == "accuracy" else "" for k in METRICS})
            out.append(row)
        s = summary[(summary.role == role) & (summary.level == level)].set_index("metric")
        nf = int(s["folds"].iloc[0]) if len(s) else 0
        row = {"model": role, "fold": f"mean ± std ({nf}/{len(sub)} folds)"}
        row.update({k: _pm(s.loc[k, "mean"], s.loc[k, "std"]) for k in METRICS})
        out.append(row)
        if pooled is not None and len(pooled) and level == "study":
            ci = pooled[(pooled.model == role) & (pooled.body_part == "ALL")].set_index("metric")
            if len(ci):
                row = {
                    "model": role,
                    "fold": "pooled out-of-fold [95 % CI]",
                    "studies": _fmt(int(ci["n_studies"].iloc[0])),
                }
                row.update({k: _ci(*ci.loc[k, ["estimate", "ci_low", "ci_high"]]) for k in ci.index})
                out.append(row)
    unit = "studies" if level == "study" else "images"
    return pd.DataFrame(out).reindex(columns=["model", "fold", unit, *METRICS]).fillna("")


CI_NOTE = (
    f"95 % confidence intervals [in brackets]: percentile intervals of {M.N_BOOT:,} bootstrap resamples of "
    f"patients (every study of a drawn patient comes along; seed {M.BOOT_SEED}), study level. Differences are "
    "paired: both models are scored on the same resamples of the same studies; an interval that excludes 0 is "
    "unlikely to be resampling noise."
)


def _ci(est: float, lo: float, hi: float) -> str:
    if est is None or math.isnan(est):
        return "—"
    if math.isnan(lo):
        return f"{est:.3f} [undefined]"
    return f"{est:.3f} [{lo:.3f}, {hi:.3f}]"


def ci_wide(long: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """Long CI rows (metrics.ci_table / paired_diff_table) -> one row per `index`, "metric [95 % CI]" cells."""
    d = long.assign(cell=[_ci(e, lo, hi) for e, lo, hi in zip(long.estimate, long.ci_low, long.ci_high, strict=True)])
    wide = d.pivot_table(index=[*index, "n_studies", "n_patients"], columns="metric", values="cell", aggfunc="first")
    wide = wide.reindex(columns=list(M.CI_METRICS))
    wide.columns = [f"{m} [95 % CI]" for m in wide.columns]
    order = list(dict.fromkeys(map(tuple, long[index].to_numpy().tolist())))
    wide = wide.reset_index()
    key = wide[index].apply(tuple, axis=1).map({k: i for i, k in enumerate(order)})
    return (
        wide.assign(_k=key)
        .sort_values("_k")
        .drop(columns="_k")
        .rename(columns={"n_studies": "studies", "n_patients": "patients"})
    )


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


def paired_rows(pairs: list[tuple[str, str, str, Mapping[str, pd.DataFrame]]]) -> pd.DataFrame:
    """Paired bootstrap differences for (where, a, b, tables) when both a and b exist in tables."""
    frames = []
    for where, a, b, tables in pairs:
        if a in tables and b in tables:
            d = M.paired_diff_table(a, tables[a], b, tables[b])
            frames.append(d.assign(comparison=f"{where}: " + d["comparison"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def section_cv(exp: Experiment) -> Section:
    sec = Section("Cross-validation (patient-grouped folds of the official train split)", "cv")
    per_fold, summary = cv_tables(exp)
    sec.p(
        f"{len(exp.folds)} folds; each fold's model is validated on the patients held out of its training. "
        "Every number is recomputed from the run's predictions_val.csv (best checkpoint) with "
        "bonehpc.metrics.evaluate_predictions."
    )
    sec.p(UNIT_NOTE, "note")
    for run in [*exp.cv_runs("teacher"), *exp.cv_runs("student")]:
        if run.state != "completed":
            sec.p(f"{run.label}: {run.reason}", "missing")
        else:
            stored = run.summary.get("metrics", {}).get("val/study_kappa")
            mine = run.metrics.get("study_kappa")
            if stored is not None and mine is not None and not np.isclose(stored, mine, atol=1e-6, equal_nan=True):
                sec.p(
                    f"{run.label}: metrics.json says val/study_kappa={stored:.4f} but its predictions give "
                    f"{mine:.4f} (the table uses the predictions)",
                    "missing",
                )
    for level in LEVELS:
        unit = "studies" if level == "study" else "images"
        sec.table(
            _cv_display(per_fold, summary, level, oof_ci(exp)),
            f"cv_{level}_display",
            f"{level.capitalize()}-level validation metrics per fold (unit: {unit}).",
        )
    pooled = oof_ci(exp)
    if len(pooled):
        sec.p(
            "Pooled out-of-fold: every train study predicted once, by the fold model that did not see it, all folds "
            "scored together (the mean ± std rows above weight the folds equally instead). " + CI_NOTE,
            "note",
        )
        sec.table(
            ci_wide(pooled[pooled.body_part == "ALL"].rename(columns={"model": "role"}), ["role"]),
            "cv_pooled_ci",
            "Study-level pooled out-of-fold metrics with patient-grouped bootstrap 95 % CIs.",
        )
        sec.table(
            pooled, "cv_pooled_ci_long", "Pooled out-of-fold CIs, every body part (machine-readable).", show=False
        )
    sec.table(per_fold, "cv_metrics", "All per-fold numbers (machine-readable).", show=False)
    sec.table(summary, "cv_summary", "Mean and standard deviation over the completed folds.", show=False)
    sec.p("Machine-readable: cv_metrics.csv (every fold, role and level) and cv_summary.csv (mean, std).", "note")
    return sec


HOLDOUT_PROTOCOL = (
    "Holdout protocol: the final models never see the official valid split while training; they select their "
    "epoch on a patient-grouped slice of the train patients (held out of their training), and the fold models "
    "select on their own fold. The official valid split is evaluated once, by the holdout job, after training."
)


def selection_notes(exp: Experiment) -> list[tuple[str, str]]:
    """(text, kind) per final run: the epoch-selection record of its metrics.json ("selection"), if any."""
    out = []
    for role in exp.roles:
        r = exp.runs.get(("final", role))
        if r is None or r.state != "completed":
            continue
        sel = r.summary.get("selection")
        if isinstance(sel, dict) and sel:
            desc = ", ".join(f"{k}={v}" for k, v in sel.items() if not isinstance(v, (list, dict)))
            out.append((f"final {role}: epoch selection recorded in metrics.json: {desc}.", "note"))
        else:
            out.append(
                (
                    f"final {role}: its metrics.json records no epoch selection (a run from before the holdout "
                    "protocol); its best epoch may have been chosen on the valid split, so its holdout numbers are "
                    "optimistic.",
                    "missing",
                )
            )
    return out


def section_holdout(exp: Experiment) -> Section:
    sec = Section("Holdout: the official MURA valid split", "holdout")
    sec.p(
        "final_*: one model per role trained on the train patients less a held-out selection slice. "
        "ensemble_*: the fold models of a role, "
        "their image probabilities averaged. " + HOLDOUT_PROTOCOL
    )
    for text, kind in selection_notes(exp):
        sec.p(text, kind)
    sec.p(UNIT_NOTE, "note")
    rows = []
    for model, (_, m, _, problem) in exp.holdout.items():
        for level in LEVELS:
            if problem:
                rows.append({"model": model, "level": level, "status": problem})
            else:
                rows.append({"model": model, "level": level, "status": "completed", **_metric_row(m, level)})
        if problem:
            sec.p(f"{model}: {problem}", "missing")
        elif exp.holdout[model][2].get("folds_missing"):
            meta = exp.holdout[model][2]
            sec.p(f"{model}: averages folds {meta.get('folds_used')}; folds {meta['folds_missing']} missing", "missing")
    df = pd.DataFrame(rows).reindex(columns=["model", "level", "status", "n", "n_pos", *METRICS])
    sec.table(df, "holdout_metrics", "Holdout metrics of the final models and the fold ensembles.")
    ci = holdout_ci(exp)
    if len(ci):
        sec.p(CI_NOTE, "note")
        sec.table(
            ci_wide(ci[ci.body_part == "ALL"], ["model"]),
            "holdout_ci",
            "Study-level holdout metrics with patient-grouped bootstrap 95 % CIs.",
        )
        sec.table(ci, "holdout_ci_long", "Holdout CIs, every body part (machine-readable).", show=False)
    return sec


def _part_kappas(m: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    parts = {}
    for k, v in m.items():
        if k.startswith("study_kappa/"):
            part = k.split("/", 1)[1]
            parts[part] = (v, m.get(f"study_n/{part}", math.nan))
    return parts


def oof_predictions(exp: Experiment, role: str) -> pd.DataFrame | None:
    """Out-of-fold predictions of a role: every completed fold's validation images (each image once)."""
    frames = [r.preds.assign(fold=r.fold) for r in exp.cv_runs(role) if r.state == "completed" and r.preds is not None]
    return pd.concat(frames, ignore_index=True) if frames else None


def section_body_parts(exp: Experiment) -> Section:
    sec = Section("Study-level Cohen's kappa per body part", "bodyparts")
    sec.p(
        "Shape of the MURA paper's Table 2: one row per study type, kappa at study level (mean of view "
        "probabilities, threshold 0.5). CV columns pool the out-of-fold predictions of all completed folds "
        "(every train study predicted once, by the fold model that did not see it). n = number of studies."
    )
    cols: dict[str, dict[str, tuple[float, float]]] = {}
    studies: dict[str, pd.DataFrame] = {}
    for role in exp.roles:
        oof = oof_predictions(exp, role)
        if oof is not None:
            m = _evaluate(oof)
            cols[f"CV {role} (out-of-fold)"] = {**_part_kappas(m), "ALL": (m["study_kappa"], m["study_n"])}
            studies.setdefault("CV", study_level(oof))
    for model, (preds, m, _, _problem) in exp.holdout.items():
        if preds is not None:
            cols[f"holdout {model}"] = {**_part_kappas(m), "ALL": (m["study_kappa"], m["study_n"])}
            studies.setdefault("holdout", study_level(preds))
    if not cols:
        sec.p("missing: no completed fold and no holdout predictions", "missing")
        return sec
    parts = sorted({p for c in cols.values() for p in c if p != "ALL"}) + ["ALL"]
    rows = []
    for part in parts:
        row: dict[str, Any] = {"body_part": part}
        for where, st in studies.items():
            sub = st if part == "ALL" else st[st.body_part == part]
            row[f"{where} studies (normal/abnormal)"] = f"{int((sub.label == 0).sum())}/{int((sub.label == 1).sum())}"
        for name, c in cols.items():
            row[f"kappa {name}"] = c.get(part, (math.nan, math.nan))[0]
        rows.append(row)
    sec.table(pd.DataFrame(rows), "body_part_kappa", "Study-level Cohen's kappa per body part.")
    ci = part_kappa_ci(exp, parts)
    if len(ci):
        sec.p(CI_NOTE, "note")
        sec.table(ci, "body_part_kappa_ci", "Study-level Cohen's kappa per body part with 95 % CIs.")
    return sec


def part_kappa_ci(exp: Experiment, parts: list[str]) -> pd.DataFrame:
    """Rows body part (ALL last), one "kappa [95 % CI]" column per pooled-CV role and holdout model."""
    cols: dict[str, dict[str, str]] = {}
    for prefix, ci in (("CV (out-of-fold)", oof_ci(exp)), ("holdout", holdout_ci(exp))):
        if not len(ci):
            continue
        k = ci[ci.metric == "kappa"]
        for model, sub in k.groupby("model", sort=False):
            cols[f"kappa {prefix} {model}"] = {
                r.body_part: _ci(r.estimate, r.ci_low, r.ci_high) for r in sub.itertuples(index=False)
            }
    if not cols:
        return pd.DataFrame()
    return pd.DataFrame([{"body_part": p, **{c: v.get(p, "—") for c, v in cols.items()}} for p in parts])


def section_curves(exp: Experiment) -> Section:
    sec = Section("ROC, precision-recall, confusion matrices and calibration (study level)", "curves")
    sec.p("All curves are at study level: study probability = mean of its views' probabilities.", "note")
    sets: dict[str, pd.DataFrame] = {}
    for role in exp.roles:
        done = {
            r.fold: study_level(r.preds) for r in exp.cv_runs(role) if r.state == "completed" and r.preds is not None
        }
        if done:
            sec.figure(
                plots.roc_pr_figure(done, f"{role}: cross-validation, per fold and mean (band: ± 1 std)"),
                f"roc_pr_cv_{role}",
                f"{role}: study-level ROC and precision-recall per fold and their vertical mean.",
            )
            oof = oof_predictions(exp, role)
            assert oof is not None
            sets[f"CV {role} (out-of-fold)"] = study_level(oof)
        else:
            sec.p(f"{role}: no completed fold, no CV curves", "missing")
    hold = {m: study_level(p) for m, (p, _, _, _) in exp.holdout.items() if p is not None}
    if hold:
        sec.figure(
            plots.roc_pr_figure(hold, "holdout (official valid split)", mean_label=None),
            "roc_pr_holdout",
            "Study-level ROC and precision-recall of the holdout models.",
        )
        sets.update({f"holdout {m}": d for m, d in hold.items()})
    else:
        sec.p("holdout: no predictions, no holdout curves", "missing")
    if sets:
        sec.figure(
            plots.confusion_figure(sets, THRESHOLD),
            "confusion",
            "Study-level confusion matrices (abnormal when the mean view probability > 0.5).",
        )
        sec.figure(
            plots.calibration_figure(sets),
            "calibration",
            "Reliability diagram: fraction of abnormal studies per bin of predicted study probability; the legend "
            "gives each set's expected calibration error (ECE, 10 equal-width bins).",
        )
        sec.table(calibration_table(exp, sets), "calibration_ece", "Expected calibration error (study level).")
        calib = M.read_temperatures(exp.root)
        if calib:
            sec.p(
                "Temperature scaling: one temperature T per role, fitted on the out-of-fold image predictions of the "
                "fold models (never on the holdout) by `bonehpc evaluate`, saved in "
                f"{M.CALIBRATION_FILE}; `bonehpc predict --calibrate` applies it (p -> sigmoid(logit(p) / T)). It "
                "leaves every image's call at 0.5 unchanged; study means and probabilities move.",
                "note",
            )
        else:
            sec.p(f"no temperature fitted ({M.CALIBRATION_FILE} not found: `bonehpc evaluate` writes it)", "note")
    return sec


def calibration_table(exp: Experiment, sets: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """ECE per prediction set, and for holdout models the ECE after their role's temperature."""
    temps = M.read_temperatures(exp.root)
    rows = []
    for name, st in sets.items():
        row: dict[str, Any] = {
            "predictions": name,
            "studies": len(st),
            "ECE": M.expected_calibration_error(st["label"], st["prob"]),
        }
        model = name.removeprefix("holdout ")
        role = model.split("_", 1)[-1]
        preds = exp.holdout.get(model, (None,))[0]
        if name.startswith("holdout ") and role in temps and preds is not None:
            scaled = study_level(preds.assign(prob=M.apply_temperature(preds["prob"].to_numpy(), temps[role])))
            row["temperature (fitted out-of-fold)"] = temps[role]
            row["ECE after temperature"] = M.expected_calibration_error(scaled["label"], scaled["prob"])
        rows.append(row)
    return pd.DataFrame(rows).reindex(
        columns=["predictions", "studies", "ECE", "temperature (fitted out-of-fold)", "ECE after temperature"]
    )


def section_learning(exp: Experiment) -> Section:
    sec = Section("Learning curves", "learning")
    metric = exp.early_stop_metric
    sec.p(f"Per epoch, from each run's metrics.jsonl. The early-stop metric is {metric} (higher is better).")
    for role in exp.roles:
        runs = [*exp.cv_runs(role), exp.runs[("final", role)]]
        hist = {r.fold: r.history for r in runs if r.history is not None and len(r.history) and "epoch" in r.history}
        if not hist:
            sec.p(f"{role}: no metrics.jsonl found", "missing")
            continue
        sec.figure(plots.learning_curve_figure(hist, metric, role), f"learning_{role}", f"{role}: learning curves.")
        best = []
        for r in runs:
            if r.history is not None and len(r.history):
                best.append(
                    {
                        "run": r.fold,
                        "epochs_run": len(r.history),
                        "best_epoch": r.summary.get("best_epoch"),
                        f"best {metric}": r.history[metric].max() if metric in r.history else math.nan,
                        "train time s": r.history["time_s"].sum() if "time_s" in r.history else math.nan,
                    }
                )
        sec.table(pd.DataFrame(best), f"epochs_{role}", f"{role}: epochs run and best epoch.")
    return sec


def _model_entry(exp: Experiment, role: str) -> dict[str, Any]:
    for fold in [*[f"fold{k}" for k in exp.folds], "final"]:
        r = exp.runs[(fold, role)]
        if isinstance(r.summary.get("model"), dict):
            return dict(r.summary["model"])
    return {}


def _first(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def measure_inference(exp: Experiment, role: str) -> dict[str, Any]:
    """Inference img/s of the role's first best.pt, timed here (train runs record params and GFLOPs only)."""
    import torch

    from bonehpc.checkpoint import build_model_from_checkpoint, load_checkpoint
    from bonehpc.models.info import measure_throughput

    ckpts = [exp.runs[(f, role)].path / "best.pt" for f in [*(f"fold{k}" for k in exp.folds), "final"]]
    ckpt = next((c for c in ckpts if c.is_file()), None)
    if ckpt is None:
        return {}
    model = build_model_from_checkpoint(load_checkpoint(ckpt))
    size = exp.cfg.data.image_size if exp.cfg else 224
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"{platform.node()} CPU ({os.cpu_count()} cores)"
    ips = measure_throughput(model, size, batch_size=8, device=device, steps=3, warmup=1)
    return {"img_per_s": ips, "device": f"report time, {where}, batch 8, {size} px"}


def section_teacher_student(exp: Experiment) -> Section:
    sec = Section("Teacher vs student", "kd")
    _, summary = cv_tables(exp)
    rows = []
    for role in CORE_ROLES:
        m = _model_entry(exp, role)
        if _first(m, "img_per_s", "infer_img_per_s") is None:
            try:
                m.update(measure_inference(exp, role))
            except Exception as err:  # noqa: BLE001 - a missing or unloadable checkpoint only costs this column
                sec.p(f"{role}: inference speed not measured ({type(err).__name__}: {err})", "note")
        params = _first(m, "params")
        row: dict[str, Any] = {
            "role": role,
            "model": _first(m, "name") or (exp.cfg.role(role).model if exp.cfg else None),
            "params (M)": params / 1e6 if params else math.nan,
            "GFLOPs / image": _first(m, "gflops"),
            "inference img/s": _first(m, "img_per_s", "infer_img_per_s"),
            "measured on": _first(m, "device", "machine"),
        }
        for metric in ("accuracy", "kappa", "auroc"):
            s = summary[(summary.role == role) & (summary.level == "study") & (summary.metric == metric)]
            row[f"CV study {metric} (mean)"] = float(s["mean"].iloc[0]) if len(s) else math.nan
        fm = exp.holdout[f"final_{role}"][1]
        row["holdout final study kappa"] = fm.get("study_kappa", math.nan)
        rows.append(row)
    df = pd.DataFrame(rows)
    num = df.drop(columns=["role", "model", "measured on"]).apply(pd.to_numeric, errors="coerce")
    gap = {"role": "teacher − student", "model": "", "measured on": ""}
    gap.update({c: num[c].iloc[0] - num[c].iloc[1] for c in num.columns})
    df = pd.concat([df, pd.DataFrame([gap])], ignore_index=True)
    sec.p(
        "Parameters and GFLOPs (torch's count, 2 per multiply-add, one image) from the runs' metrics.json "
        "'model' entries (bonehpc.models.info.model_info); inference img/s timed when the report was built, "
        "on the machine named in 'measured on'. "
        "The last row is what the student gives up (positive: the teacher is better or bigger)."
    )
    if df["inference img/s"].isna().iloc[:2].all():
        sec.p("inference img/s: no checkpoint to time (best.pt missing); see `bonehpc bench`", "note")
    speed = pd.to_numeric(df["inference img/s"].iloc[:2], errors="coerce")
    if speed.notna().all() and speed.iloc[0] > 0:
        sec.p(f"The student runs {speed.iloc[1] / speed.iloc[0]:.2f}x the teacher's inference img/s (same machine).")
    distill = exp.raw_cfg.get("distill", {})
    if distill:
        sec.p(f"Distillation: kind={distill.get('kind')}, alpha={distill.get('alpha')}, tau={distill.get('tau')}.")
    sec.table(df, "teacher_vs_student", "Teacher vs student: size, cost and the accuracy/kappa given up.")
    diffs = paired_rows(
        [
            ("CV pooled out-of-fold", "teacher", "student", oof_studies(exp)),
            ("holdout", "final_teacher", "final_student", holdout_studies(exp)),
            ("holdout", "ensemble_teacher", "ensemble_student", holdout_studies(exp)),
        ]
    )
    if len(diffs):
        sec.p(CI_NOTE, "note")
        sec.table(
            ci_wide(diffs, ["comparison"]),
            "teacher_minus_student_ci",
            "Teacher − student, study level, paired bootstrap 95 % CIs (positive: the teacher is better).",
        )
    return sec


def kd_gain_per_fold(exp: Experiment) -> pd.DataFrame:
    """Per fold: study kappa and AUROC of teacher, student (with KD) and baseline (student without KD)."""
    rows = []
    for k in exp.folds:
        row: dict[str, Any] = {"fold": f"fold{k}"}
        for role in ("teacher", "student", "baseline"):
            r = exp.runs.get((f"fold{k}", role))
            for metric in ("kappa", "auroc"):
                done = r is not None and r.state == "completed"
                row[f"{role} {metric}"] = r.metrics.get(f"study_{metric}", math.nan) if r and done else math.nan
        for metric in ("kappa", "auroc"):
            row[f"KD gain {metric} (student − baseline)"] = row[f"student {metric}"] - row[f"baseline {metric}"]
        rows.append(row)
    return pd.DataFrame(rows)


def section_kd_gain(exp: Experiment) -> Section:
    sec = Section("What distillation buys: student without KD vs with KD vs teacher", "kdgain")
    if not exp.has_baseline:
        sec.p(
            "No baseline in this experiment (the student architecture trained without KD, role 'baseline'), so "
            "the value of distillation is not measured here.",
            "note",
        )
        return sec
    sec.p(
        "baseline: the student's architecture and recipe trained without distillation (distill.kind=none) on the "
        "same folds; student: the same with KD from its fold's teacher. Study level."
    )
    sec.table(kd_gain_per_fold(exp), "kd_gain_folds", "Per fold: study kappa and AUROC, and the KD gain.")
    oof, hold = oof_studies(exp), holdout_studies(exp)
    gains = paired_rows(
        [
            ("CV pooled out-of-fold", "student", "baseline", oof),
            ("CV pooled out-of-fold", "teacher", "student", oof),
            ("holdout", "final_student", "final_baseline", hold),
            ("holdout", "ensemble_student", "ensemble_baseline", hold),
        ]
    )
    if len(gains):
        sec.p(CI_NOTE, "note")
        sec.table(
            ci_wide(gains, ["comparison"]),
            "kd_gain_ci",
            "KD gain (student − baseline) and what is left to the teacher (teacher − student), paired bootstrap "
            "95 % CIs.",
        )
    else:
        sec.p("no baseline predictions to compare yet (no completed baseline fold or holdout model)", "missing")
    return sec


def synthetic_marker(exp: Experiment) -> dict[str, Any] | None:
    """The `bonehpc synth` marker of the experiment's data (None: real data, or no config to tell)."""
    if exp.cfg is None:
        return None
    from bonehpc.data.synthetic import read_marker

    return read_marker(exp.cfg.data.mura_root)


def section_seed(exp: Experiment) -> Section:
    sec = Section("Comparison with the seed project", "seed")
    sec.p(
        "The seed project reported cross-validation accuracy 0.822, precision 0.838, recall 0.716, F1 0.772 and a "
        "holdout accuracy of 0.8274, all at image level and without Cohen's kappa. Those are the seed's numbers, "
        "quoted here, not recomputed; its folds, splits and data may differ from ours."
    )
    marker = synthetic_marker(exp)
    if marker is not None:
        root = exp.cfg.data.mura_root if exp.cfg else "?"
        sec.p(
            f"Not comparable: this experiment ran on synthetic data ({root} carries the `bonehpc synth` marker: "
            f"generator {marker.get('generator', '?')}, {marker.get('patients', '?')} patients, seed "
            f"{marker.get('seed', '?')}), not on MURA, so its numbers are not placed beside the seed's. They test "
            "the pipeline, not the model.",
            "note",
        )
        seed = pd.DataFrame(
            [{"metric": k, "seed project (quoted, image level, CV)": v} for k, v in SEED_CV.items()]
            + [{"metric": "holdout accuracy", "seed project (quoted, image level, CV)": SEED_HOLDOUT_ACCURACY}]
        )
        sec.table(seed, "seed_quoted", "The seed project's published numbers (quoted).")
        return sec
    sec.p("Our numbers are at both levels, side by side.")
    _, summary = cv_tables(exp)
    rows = []
    for metric in METRICS:
        row: dict[str, Any] = {"metric": metric, "seed project (quoted, image level, CV)": SEED_CV.get(metric)}
        for role in CORE_ROLES:
            for level in LEVELS:
                s = summary[(summary.role == role) & (summary.level == level) & (summary.metric == metric)]
                row[f"ours {role} CV {level}"] = _pm(float(s["mean"].iloc[0]), float(s["std"].iloc[0]))
        rows.append(row)
    sec.table(pd.DataFrame(rows), "seed_comparison_cv", "Cross-validation: the seed project's numbers vs ours.")
    hrow: dict[str, Any] = {"metric": "holdout accuracy", "seed project (quoted, image level)": SEED_HOLDOUT_ACCURACY}
    for model, (_, m, _, _) in exp.holdout.items():
        for level in LEVELS:
            hrow[f"ours {model} {level}"] = m.get(f"{level}_accuracy", math.nan)
    sec.table(pd.DataFrame([hrow]), "seed_comparison_holdout", "Holdout accuracy: the seed's vs ours.")
    return sec


def _csv_rows(path: Path) -> int | None:
    """Data rows of a CSV with a header (None when the file is missing or unreadable)."""
    try:
        return len(pd.read_csv(path))
    except pd.errors.EmptyDataError:
        return 0
    except (OSError, ValueError):
        return None


def section_data(exp: Experiment) -> Section:
    sec = Section("Data: packed, rejected and lost", "data")
    if exp.cfg is None:
        sec.p("no config: the shard folder is unknown", "missing")
        return sec
    from bonehpc.data.shards import INDEX_CSV, LOST_STUDIES_CSV, REJECTED_CSV

    shards = Path(exp.cfg.data.shards)
    rows = []
    for what, name in (
        ("images packed", INDEX_CSV),
        ("images rejected (unreadable, corrupt, too small, ...)", REJECTED_CSV),
        ("studies lost (every image rejected)", LOST_STUDIES_CSV),
    ):
        n = _csv_rows(shards / name)
        rows.append({"what": what, "count": "not found" if n is None else n, "file": str(shards / name)})
    sec.table(pd.DataFrame(rows), "data_counts", f"Counts from the shard folder {shards}.")
    rej = shards / REJECTED_CSV
    if rej.is_file():
        try:
            reasons = pd.read_csv(rej)
        except (OSError, ValueError, pd.errors.EmptyDataError):
            reasons = pd.DataFrame()
        if len(reasons) and "reason" in reasons:
            by = reasons["reason"].value_counts().rename_axis("reason").reset_index()
            sec.table(by, "data_rejected_reasons", "Rejected images by reason.")
    if synthetic_marker(exp) is not None:
        sec.p("The data are synthetic (`bonehpc synth` marker in the MURA root).", "note")
    return sec


def _load_study(exp: Experiment) -> tuple[Any, str]:
    """(optuna Study or None, reason when None)."""
    tune_dir = exp.root / "tune"
    storage_url = exp.cfg.tune.storage if exp.cfg else str(exp.raw_cfg.get("tune", {}).get("storage", ""))
    study_name = (exp.cfg.tune.study_name if exp.cfg else "") or exp.name
    journal = tune_dir / "journal.log"
    if not storage_url and not journal.is_file():
        return None, f"no tuning study ({journal} not found and tune.storage is empty)"
    import optuna  # only here: a report of an untuned experiment does not need it

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if storage_url:
            storage: Any = storage_url
        else:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            storage = JournalStorage(JournalFileBackend(str(journal), lock_obj=JournalFileOpenLock(str(journal))))
        return optuna.load_study(study_name=study_name, storage=storage), ""
    except Exception as err:  # noqa: BLE001 - an unreachable DB or unknown study is reported
        return None, f"cannot load study {study_name!r}: {type(err).__name__}: {err}"


def section_tuning(exp: Experiment) -> Section:
    sec = Section("Hyperparameter tuning (Optuna)", "tuning")
    study, problem = _load_study(exp)
    if study is None:
        sec.p(problem, "missing")
        return sec
    import matplotlib

    matplotlib.use("Agg")  # optuna's matplotlib plots go through pyplot; never open a window
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    trials = study.trials_dataframe()
    sec.p(f"Study {study.study_name!r}, direction {study.direction.name.lower()}, {len(study.trials)} trials.")
    counts = pd.Series([t.state.name for t in study.trials]).value_counts().rename_axis("state").reset_index()
    sec.table(counts, "tune_trial_states", "Trials by state.")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        bp = pd.DataFrame([{"param": k, "value": v} for k, v in best.params.items()])
        sec.p(f"Best trial #{best.number}: objective {best.value:.4f}.")
        sec.table(bp, "tune_best_params", "Best parameters.")
    else:
        sec.p("no completed trial yet: no best parameters", "missing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend
        plotters: list[tuple[str, Callable[[Any], Any], str]] = [
            ("tune_history", ovm.plot_optimization_history, "Optimisation history."),
            ("tune_importances", ovm.plot_param_importances, "Parameter importances (fANOVA)."),
        ]
        for name, fn, caption in plotters:
            try:
                ax = fn(study)
                fig = ax.figure if hasattr(ax, "figure") else np.ravel(ax)[0].figure
                fig.set_size_inches(8, 4.5)
                sec.figure(fig, name, caption)
                plt.close(fig)
            except Exception as err:  # noqa: BLE001 - e.g. importances need >= 2 completed trials
                sec.p(f"{caption} not available: {err}", "note")
    if len(trials):
        sec.table(trials, "tune_trials", "All trials.")
    return sec


def failure_lines(acct: pd.DataFrame) -> list[str]:
    """One line per failed task: fold, role, state and the last exception line of its log (bonehpc.accounting's
    "error" column, from bonehpc.resources.task_failure_line)."""
    if "error" not in acct:
        return []
    out = []
    for r in acct.itertuples(index=False):
        err = getattr(r, "error", None)
        if isinstance(err, str) and err.strip():
            out.append(f"{getattr(r, 'fold', '?')} {getattr(r, 'role', '?')} {getattr(r, 'state', '?')}: {err.strip()}")
    return out


def section_slurm(exp: Experiment) -> Section:
    sec = Section("Slurm accounting (sacct)", "slurm")
    if exp.acct is None:
        sec.p(f"Slurm accounting unavailable: {exp.acct_problem}", "missing")
    else:
        df = exp.acct
        gh = pd.to_numeric(df["gpu_hours"], errors="coerce") if "gpu_hours" in df else None
        state = df["state"].astype(str) if "state" in df else pd.Series(dtype=str)
        failed = state[~state.str.upper().str.startswith(("COMPLETED", "RUNNING", "PENDING"))]
        req = pd.to_numeric(df["requeues"], errors="coerce").sum() if "requeues" in df else math.nan
        sec.p(
            f"{len(df)} jobs; states: {', '.join(f'{k} {v}' for k, v in state.value_counts().items()) or 'n/a'}; "
            f"failures (not COMPLETED/RUNNING/PENDING): {len(failed)}; requeues: {_fmt(req)}; "
            f"GPU-hours total: {_fmt(float(gh.sum())) if gh is not None else 'n/a'}."
        )
        sec.table(df, "slurm_jobs", "Per job: state, elapsed, exit code, requeues, node, GPU-hours.")
        for line in failure_lines(df):
            sec.p(line, "missing")
    jobs = exp.root / "jobs.json"
    if jobs.is_file():
        sec.p(f"Submitted jobs (jobs.json):\n{jobs.read_text()[:20000]}", "pre")
    else:
        sec.p("jobs.json not found: nothing was submitted through bonehpc's Slurm path", "note")
    return sec


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (from package metadata: nothing heavy is imported)."""
    out = {}
    for label, dists in PACKAGES.items():
        out[label] = "not installed"
        for d in dists:
            try:
                out[label] = (
                    f"{importlib.metadata.version(d)} ({d})" if len(dists) > 1 else importlib.metadata.version(d)
                )
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "not found"


def section_repro(exp: Experiment) -> Section:
    sec = Section("Reproducibility", "repro")
    from bonehpc.registry import git_sha  # the one implementation (also recorded in jobs.json and the tuning study)

    sha = git_sha()
    recorded = sorted({str(v) for r in exp.runs.values() for k, v in r.summary.items() if k in ("git_sha", "git")})
    shards_hash, shards_dir = "unknown", ""
    if exp.cfg:
        sd = Path(exp.cfg.data.shards)
        shards_dir = str(sd)
        mj = sd / "manifest.json"
        if mj.is_file():
            try:
                shards_hash = str(_read_json(mj).get("source_manifest_sha256", "not recorded"))
            except (OSError, ValueError) as err:
                shards_hash = f"unreadable ({err})"
        else:
            shards_hash = f"{mj} not found"
    rows = [
        ("git SHA of the code that built this report (+dirty: uncommitted changes)", sha),
        ("git SHA recorded by the runs", ", ".join(recorded) or "not recorded"),
        ("config problem", exp.cfg_problem or "none"),
        ("train.seed", exp.cfg.train.seed if exp.cfg else "?"),
        ("data.fold_seed", exp.cfg.data.fold_seed if exp.cfg else "?"),
        ("tune.sampler_seed", exp.cfg.tune.sampler_seed if exp.cfg else "?"),
        ("shards folder", shards_dir),
        ("shards source manifest SHA-256 (manifest.json)", shards_hash),
        ("runs/<exp>/manifest.csv SHA-256", _sha256(exp.root / "manifest.csv")),
        ("runs/<exp>/folds.csv SHA-256", _sha256(exp.root / "folds.csv")),
        ("report machine", f"{platform.node()} | {platform.platform()} | {os.cpu_count()} CPUs"),
        ("python", platform.python_version()),
    ]
    nodes = sorted(set(exp.acct["node"].astype(str))) if exp.acct is not None and "node" in exp.acct else []
    rows.append(("training nodes (sacct)", ", ".join(nodes) or "unknown (no Slurm accounting)"))
    rows += [(f"package {k}", v) for k, v in package_versions().items()]
    sec.table(pd.DataFrame(rows, columns=["item", "value"]), "reproducibility", "Code, data, seeds, machine.")
    if (exp.root / "config.yaml").is_file():
        sec.p(f"Resolved config (config.yaml):\n{(exp.root / 'config.yaml').read_text()}", "pre")
    elif exp.raw_cfg:
        sec.p(
            f"Resolved config (config.yaml of a run; none at the top):\n{yaml.safe_dump(exp.raw_cfg, sort_keys=False)}",
            "pre",
        )
    else:
        sec.p("Resolved config: no config.yaml found", "missing")
    return sec


def section_overview(exp: Experiment) -> Section:
    sec = Section(f"Experiment {exp.name}", "overview")
    sec.p(f"Folder {exp.root.resolve()}; report built {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}.")
    rows = []
    for (fold, role), r in exp.runs.items():
        rows.append({"run": fold, "role": role, "state": r.state, "detail": r.reason, "path": str(r.path)})
    for model, (_, _, _, problem) in exp.holdout.items():
        rows.append(
            {"run": "holdout", "role": model, "state": "missing" if problem else "completed", "detail": problem}
        )
    df = pd.DataFrame(rows)
    missing = df[df.state != "completed"]
    if len(missing):
        sec.p(
            f"Partial experiment: {len(missing)} of {len(df)} expected results are missing or incomplete "
            "(listed below; the tables use what exists).",
            "missing",
        )
    sec.table(df, "runs", "Every expected run and holdout evaluation, with its state.")
    return sec


SECTIONS: tuple[Callable[[Experiment], Section], ...] = (
    section_overview,
    section_data,
    section_cv,
    section_holdout,
    section_body_parts,
    section_curves,
    section_learning,
    section_teacher_student,
    section_kd_gain,
    section_seed,
    section_tuning,
    section_slurm,
    section_repro,
)

# ----------------------------------------------------------------------------------------------
# Rendering.

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #345}h2{margin-top:2em;border-bottom:1px solid #ccc;color:#234}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#eef2f6}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0}
.note{color:#555;font-size:13px;background:#f7f7f7;padding:6px 10px;border-left:3px solid #bbb}
.missing{color:#8a1c1c;background:#fdf0f0;padding:6px 10px;border-left:3px solid #c33}
pre{background:#f5f5f5;padding:8px;overflow:auto;font-size:12px;max-height:40em}
figure{margin:1em 0}figcaption{font-size:13px;color:#444}img{max-width:100%;border:1px solid #eee}
nav ul{columns:2;font-size:14px}
"""


def _display_df(df: pd.DataFrame) -> pd.DataFrame:
    return df.map(_fmt)


def _html_block(b: Block) -> str:
    if isinstance(b, Text):
        if b.kind == "pre":
            head, _, body = b.text.partition("\n")
            return f"<p>{html.escape(head)}</p><pre>{html.escape(body)}</pre>"
        cls = f' class="{b.kind}"' if b.kind in ("note", "missing") else ""
        return f"<p{cls}>{html.escape(b.text)}</p>"
    if isinstance(b, Table):
        if not b.show:
            return ""
        t = _display_df(b.df).to_html(index=False, escape=True, border=0)
        t = t.replace("<table", f'<table id="{b.name}"', 1)
        cap = f"<caption>{html.escape(b.caption)} <small>[{b.name}.csv]</small></caption>"
        return re.sub(r"(<table[^>]*>)", lambda m: m.group(1) + cap, t, count=1)
    data = base64.b64encode(b.png).decode("ascii")
    return (
        f'<figure id="{b.name}"><img alt="{html.escape(b.caption or b.name)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(b.caption)}</figcaption></figure>"
    )


def render_html(title: str, sections: list[Section]) -> str:
    nav = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections)
    body = "".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{"".join(_html_block(b) for b in s.blocks)}</section>'
        for s in sections
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><nav><ul>{nav}</ul></nav>{body}</body></html>\n"
    )


def _md_table(df: pd.DataFrame) -> str:
    d = _display_df(df)

    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in d.columns) + " |", "|" + "---|" * len(d.columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in d.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Text):
                if b.kind == "pre":
                    head, _, body = b.text.partition("\n")
                    out += [head, "", "```", body.rstrip(), "```"]
                elif b.kind == "missing":
                    out.append(f"> **MISSING** {b.text}")
                elif b.kind == "note":
                    out.append(f"> {b.text}")
                else:
                    out.append(b.text)
            elif isinstance(b, Table):
                if not b.show:
                    continue
                out += [f"**{b.caption}** ([{b.name}.csv]({b.name}.csv))", "", _md_table(b.df)]
            else:
                out.append(f"![{b.caption or b.name}]({b.name}.png)")
            out.append("")
    return "\n".join(out)


def _write_atomic(path: Path, data: bytes | str) -> None:
    if isinstance(data, str):
        atomic_write_text(path, data)
    else:
        atomic_write_bytes(path, data)


def build_report(exp_dir: str | Path) -> Path:
    """Write runs/<exp>/report/{index.html, report.md, <table>.csv, <figure>.png}; returns the index.html path.

    Args:
        exp_dir: the experiment folder (runs/<exp>).

    Raises:
        FileNotFoundError: the experiment folder does not exist. Anything missing inside it is reported
            in the document instead.
    """
    exp = load_experiment(exp_dir)
    sections = []
    for make in SECTIONS:
        try:
            sections.append(make(exp))
        except Exception as err:  # noqa: BLE001 - one broken section must not cost the whole report
            log.exception("report section %s failed", make.__name__)
            sec = Section(make.__name__.removeprefix("section_"), make.__name__)
            sec.p(f"section failed: {type(err).__name__}: {err}", "missing")
            sections.append(sec)
    out = exp.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Table):
                _write_atomic(out / f"{b.name}.csv", b.df.to_csv(index=False, lineterminator="\n"))
            elif isinstance(b, Figure):
                _write_atomic(out / f"{b.name}.png", b.png)
    title = f"bonehpc report: {exp.name}"
    _write_atomic(out / "report.md", render_markdown(title, sections))
    index = out / "index.html"
    _write_atomic(index, render_html(title, sections))
    log.info("report written: %s", index)
    return index
