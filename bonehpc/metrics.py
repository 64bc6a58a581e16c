"""Image- and study-level metrics of binary abnormality predictions, overall and per body part (MURA protocol),
and their patient-grouped bootstrap confidence intervals.

The unit of the official MURA metric is the **study** (one examination of one body part of one patient,
one or more images/views). `study_table` is the one image -> study aggregation of bonehpc (metrics, report
and predict all call it): a study's probability is the arithmetic mean of its images' probabilities, it is
called abnormal when that mean is > THRESHOLD (0.5, `bonehpc.constants`), and its label is the study's
label, which every one of its images carries (MURA labels studies, not images); images of one study that
disagree on label or body part are an error, never resolved by max or first. An image is called abnormal
when its own probability is > 0.5.

Degenerate cases never raise: when the labels hold one class only, AUROC is NaN; Cohen's kappa is NaN when
both the labels and the predictions are one and the same class (agreement by chance is then 1 and kappa is
0/0; scikit-learn's ``replace_undefined_by`` is set to NaN), otherwise scikit-learn's value (e.g. 0.0 when
the predictions are constant but the labels are not). Precision, recall and F1 are 0.0 when undefined (no
predicted / no actual positives).

Confidence intervals (`bootstrap_weights`, `weighted_metrics`, `ci_table`, `paired_diff_table`): percentile
95 % intervals of B (default 1,000) bootstrap resamples of **patients** (a patient's studies are drawn
together: MURA has several studies per patient, and they are not independent). A resample is a row of
multiplicities (how often each patient was drawn), so every metric of every resample comes out of a few
matrix products, with no Python loop over resamples. The same seeded resamples serve every model and every
body part, which makes teacher-vs-student differences a paired bootstrap. Resamples in which a metric is
undefined (e.g. no abnormal study of a small body part drawn) are left out of its interval, and no interval
is given (NaN) when that is more than half of them.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from bonehpc.constants import PRED_COLUMNS, THRESHOLD
from bonehpc.fsio import atomic_write_json
from bonehpc.paths import RUN_METRICS, RUN_PREDICTIONS, ExperimentPaths, read_json, run_completed

REQUIRED_COLUMNS = PRED_COLUMNS
LEVELS = ("image", "study")
STUDY_UNIT = (
    "study: probability = mean of its images' probabilities, abnormal when > 0.5; label = the study's label "
    "(shared by all its images)"
)
# Bootstrap defaults: resamples, seed, interval level, and the metrics that get an interval.
N_BOOT = 1000
BOOT_SEED = 0
CI_LEVEL = 0.95
CI_METRICS = ("kappa", "auroc", "f1", "accuracy")
# Temperature-scaling record at the experiment root: written by `bonehpc evaluate`, read by report and predict.
CALIBRATION_FILE = "calibration.json"
# What a calibration file may hold (fit_calibration keeps T in the first; its bias search spans the second).
TEMPERATURE_RANGE = (0.05, 20.0)
BIAS_RANGE = (-50.0, 50.0)
# Largest resamples x studies block held in memory at once (float64: 8 bytes each).
_BLOCK = 4_000_000


def _check(df: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing} (need {list(REQUIRED_COLUMNS)})")
    if len(df) == 0:
        raise ValueError("predictions are empty")
    labels = set(pd.unique(df["label"]).tolist())
    if not labels <= {0, 1}:
        raise ValueError(f"predictions: label must be 0 or 1, got {sorted(labels, key=str)[:5]}")
    _check_prob(df)
    dup = df["image_id"].duplicated()
    if dup.any():
        raise ValueError(f"predictions: image_id repeated: {df.loc[dup, 'image_id'].tolist()[:5]}")


def _check_prob(df: pd.DataFrame) -> None:
    prob = pd.to_numeric(df["prob"], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(prob) | (prob < 0) | (prob > 1)
    if bad.any():
        where = df.loc[bad, "image_id" if "image_id" in df else "study"].tolist()[:5]
        raise ValueError(f"predictions: prob must be a number in [0, 1]; {int(bad.sum())} bad rows, e.g. {where}")


def study_table(df: pd.DataFrame, threshold: float = THRESHOLD) -> pd.DataFrame:
    """The image -> study aggregation (see the module docstring): one row per study, sorted by study.

    Args:
        df: one row per image with columns study and prob, optionally label and body_part (carried over
            when present; predict's new images have neither).
        threshold: a study is called abnormal when its probability is > threshold (0.5: MURA protocol; the
            out-of-fold operating point: `choose_threshold`).

    Returns:
        study, [body_part], [label], prob (mean of its images' probabilities), n_images, pred (prob > 0.5).

    Raises:
        ValueError: no study/prob column, no rows, a probability outside [0, 1], or a study whose images
            disagree on label or body part (names the studies).
    """
    for col in ("study", "prob"):
        if col not in df.columns:
            raise ValueError(f"predictions lack column {col!r}")
    if len(df) == 0:
        raise ValueError("predictions are empty")
    _check_prob(df)
    carried = [c for c in ("body_part", "label") if c in df.columns]
    g = df.groupby("study", sort=True)
    aggs: dict[str, tuple[str, str]] = {c: (c, "first") for c in carried}
    aggs |= {f"_n_{c}": (c, "nunique") for c in carried}
    table = g.agg(prob=("prob", "mean"), n_images=("prob", "size"), **aggs).reset_index()
    disagree = np.zeros(len(table), dtype=bool)
    for c in carried:
        disagree |= table[f"_n_{c}"].to_numpy() > 1
    if disagree.any():
        raise ValueError(
            f"studies whose images disagree on {' or '.join(carried)}: {table.loc[disagree, 'study'].tolist()[:5]}"
        )
    if "label" in carried:
        table["label"] = table["label"].astype(np.int64)
    table["prob"] = table["prob"].astype(float)
    table["pred"] = (table["prob"] > threshold).astype(np.int64)
    return table[["study", *carried, "prob", "n_images", "pred"]]


def _binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    y = y.astype(np.int64)
    pred = (p > threshold).astype(np.int64)
    one_class = len(np.unique(y)) < 2
    with warnings.catch_warnings():
        # Undefined cases are documented and mapped to NaN / 0; sklearn's warnings would only repeat that.
        warnings.simplefilter("ignore")
        kappa = float(cohen_kappa_score(y, pred, labels=[0, 1], replace_undefined_by=np.nan))
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, labels=[0, 1], zero_division=0)),
        "recall": float(recall_score(y, pred, labels=[0, 1], zero_division=0)),
        "f1": float(f1_score(y, pred, labels=[0, 1], zero_division=0)),
        "auroc": math.nan if one_class else float(roc_auc_score(y, p)),
        "kappa": kappa,
        "n": int(len(y)),
        "n_pos": int(y.sum()),
    }


def evaluate_predictions(df: pd.DataFrame, threshold: float = THRESHOLD) -> dict[str, float]:
    """Metrics of a predictions table (columns image_id, study, body_part, label, prob; one row per image).

    Images and studies are called abnormal when their probability is > threshold (0.5: MURA protocol).

    Returns:
        ``image_{m}`` and ``study_{m}`` for m in accuracy, precision, recall, f1, auroc, kappa, n, n_pos, and per
        body part ``study_kappa/{PART}``, ``study_auroc/{PART}``, ``study_accuracy/{PART}``, ``study_n/{PART}``.
        n and n_pos are ints; undefined values are NaN (see the module docstring).

    Raises:
        ValueError: Missing columns, empty table, labels other than 0/1, probabilities outside [0, 1],
            repeated image ids or studies whose images disagree on label or body part.
    """
    _check(df)
    studies = study_table(df, threshold)
    out: dict[str, float] = {}
    for level, table in (("image", df), ("study", studies)):
        y = table["label"].to_numpy()
        p = table["prob"].to_numpy(dtype=float)
        for key, value in _binary_metrics(y, p, threshold).items():
            out[f"{level}_{key}"] = value
    for part, sub in studies.groupby("body_part", sort=True):
        m = _binary_metrics(sub["label"].to_numpy(), sub["prob"].to_numpy(dtype=float), threshold)
        for key in ("kappa", "auroc", "accuracy", "n"):
            out[f"study_{key}/{part}"] = m[key]
    return out


def confusion(df: pd.DataFrame, level: str = "study") -> dict[str, int]:
    """Counts tp, fp, tn, fn at image or study level (positive: prob > 0.5)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    _check(df)
    table = study_table(df) if level == "study" else df
    y = table["label"].to_numpy().astype(np.int64)
    pred = (table["prob"].to_numpy(dtype=float) > THRESHOLD).astype(np.int64)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


# ----------------------------------------------------------------------------------------------
# Calibration.


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """ECE: sum over equal-width probability bins of (bin share) x |fraction positive - mean probability|.

    The bins are those of the reliability diagram (`bonehpc.report.plots.calibration_figure`, uniform, 10); NaN for
    no rows.
    """
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    if len(y) == 0:
        return math.nan
    # bin i holds [i/n, (i+1)/n); p = 1 goes to the last bin
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(float)
    gap = np.abs(np.bincount(idx, weights=y, minlength=n_bins) - np.bincount(idx, weights=p, minlength=n_bins))
    return float(gap.sum() / count.sum())


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """Temperature T > 0 minimising the log loss of sigmoid(logit(p) / T) (a 1-D search on log T).

    Fit it on out-of-fold predictions only (never on the holdout). T > 1 softens over-confident outputs.
    """
    y = np.asarray(y, dtype=float)
    z = _logit(np.asarray(p, dtype=float))
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 401))
    q = 1.0 / (1.0 + np.exp(-z[None, :] / grid[:, None]))
    q = np.clip(q, 1e-12, 1 - 1e-12)
    nll = -(y * np.log(q) + (1 - y) * np.log(1 - q)).mean(axis=1)
    return float(grid[int(np.argmin(nll))])


def fit_calibration(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(T, b) of the logistic recalibration p -> sigmoid(logit(p) / T + b), maximum likelihood (unpenalised
    scikit-learn LogisticRegression on logit(p)).

    Fit it on out-of-fold predictions only (never on the holdout). The bias b absorbs what the class-weight logit
    shift leaves over (a small net that overfits its train folds is over-confident, so the fixed log(w1/w0) shift
    over-corrects); at the optimum the mean recalibrated probability equals the prevalence of the rows it was fitted
    on. T is kept in TEMPERATURE_RANGE (then b is refitted alone), and one class only gives (1, 0).
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y, dtype=int)
    z = _logit(np.asarray(p, dtype=float))
    if len(np.unique(y)) < 2:
        return 1.0, 0.0
    lr = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000).fit(z[:, None], y)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    low, high = TEMPERATURE_RANGE
    if not low <= (1.0 / a if a > 0 else math.inf) <= high:
        # the slope left the range (e.g. a net with no signal): clamp T and refit the bias with z / T as offset
        t = min(max(1.0 / a, low), high) if a > 0 else high
        b = _fit_bias(y, z / t)
        return t, b
    return 1.0 / a, b


def _fit_bias(y: np.ndarray, offset: np.ndarray) -> float:
    """The intercept b maximising the likelihood of sigmoid(offset + b) (a 1-D convex problem, scipy brentq on
    its score: mean(sigmoid(offset + b)) = mean(y))."""
    from scipy.optimize import brentq

    target = float(np.mean(y))
    return float(brentq(lambda b: float(np.mean(1.0 / (1.0 + np.exp(-(offset + b))))) - target, *BIAS_RANGE))


def read_thresholds(exp_root: str | Path) -> dict[str, dict[str, Any]]:
    """role -> its out-of-fold operating point (`fit_operating_point`) from CALIBRATION_FILE (empty when none)."""
    doc = read_json(Path(exp_root) / CALIBRATION_FILE) or {}
    roles = doc.get("roles")
    if not isinstance(roles, dict):
        return {}
    return {str(r): dict(v["threshold"]) for r, v in roles.items() if isinstance(v, dict) and "threshold" in v}


def read_temperatures(exp_root: str | Path) -> dict[str, float]:
    """role -> temperature from the experiment's CALIBRATION_FILE (empty when there is none)."""
    return {r: t for r, (t, _) in read_calibration(exp_root).items()}


def read_calibration(exp_root: str | Path) -> dict[str, tuple[float, float]]:
    """role -> (temperature, bias) from the experiment's CALIBRATION_FILE (empty when there is none); a file from
    before the bias was fitted (temperature only) reads as bias 0."""
    doc = read_json(Path(exp_root) / CALIBRATION_FILE) or {}
    roles = doc.get("roles")
    if not isinstance(roles, dict):
        return {}
    return {
        str(r): (float(v["temperature"]), float(v.get("bias", 0.0)))
        for r, v in roles.items()
        if isinstance(v, dict) and "temperature" in v
    }


def out_of_fold(exp_root: str | Path, role: str, num_folds: int) -> tuple[pd.DataFrame | None, list[int], list[Any]]:
    """(pooled out-of-fold image predictions of a role with a fold column, the folds used, the probability
    correction each fold run recorded in its metrics.json: None for a run from before the record)."""
    paths = ExperimentPaths(Path(exp_root))
    frames, folds, corrections = [], [], []
    for k in range(num_folds):
        d = paths.role_dir(k, role)
        if run_completed(d) and (d / RUN_PREDICTIONS).is_file():
            frames.append(pd.read_csv(d / RUN_PREDICTIONS).assign(fold=k))
            folds.append(k)
            corrections.append((read_json(d / RUN_METRICS) or {}).get("prob_correction"))
    return (pd.concat(frames, ignore_index=True) if frames else None), folds, corrections


def fit_operating_point(
    studies: pd.DataFrame, temperature: float = 1.0, calibrated: pd.DataFrame | None = None, bias: float = 0.0
) -> dict[str, Any]:
    """The operating point of a role from its pooled OUT-OF-FOLD study table (study_table rows plus a fold
    column; never holdout studies): the kappa-optimal cut (the one applied), Youden's J cut (named option), both
    also on the temperature-scaled scale (chosen on `calibrated`, the study table of the temperature-scaled
    images, when given: a study is a mean of images, so the scaled cut is not the scaled number), and the
    cross-fitted cut of each fold (`cross_fitted_thresholds`)."""
    y, p = studies["label"].to_numpy(), studies["prob"].to_numpy(dtype=float)
    kt, ks = choose_threshold(y, p, "kappa")
    yt, ys = choose_threshold(y, p, "youden")
    if calibrated is not None:
        yc, pc = calibrated["label"].to_numpy(), calibrated["prob"].to_numpy(dtype=float)
        kc, jc = choose_threshold(yc, pc, "kappa")[0], choose_threshold(yc, pc, "youden")[0]
    else:
        kc, jc = (float(apply_temperature(np.array([t]), temperature, bias)[0]) for t in (kt, yt))
    return {
        "method": "kappa",
        "value": kt,
        "kappa": ks,
        "value_calibrated": kc,
        "youden": {
            "value": yt,
            "j": ys,
            "value_calibrated": jc,
        },
        "cross_fitted": {str(k): v for k, v in cross_fitted_thresholds(studies).items()},
        "n_studies": len(studies),
        "fitted_on": "pooled out-of-fold study probabilities (mean of views), fold runs only, never the holdout",
    }


def write_calibration(exp_root: str | Path, roles: tuple[str, ...] | list[str], num_folds: int) -> dict[str, Any]:
    """Fit one recalibration (temperature and bias, `fit_calibration`) and one operating point per role on the
    out-of-fold predictions of its completed fold runs (each train image predicted by the fold model that did not
    see it; never the holdout) and write CALIBRATION_FILE.

    The predictions are already corrected for class weighting (training writes prob after `correct_prior`);
    the correction each run recorded is copied here.

    Returns:
        The document written: {"method", "fitted_on", "roles": {role: {"temperature", "bias", "n_images",
        "folds", "ece_before", "ece_after", "mean_prob", "mean_prob_calibrated", "prevalence", "prob_correction",
        "threshold"}}} (image level ECE, mean probability and prevalence; threshold: `fit_operating_point`);
        roles without a completed fold are left out, and nothing is written when no role has one.
    """
    paths = ExperimentPaths(Path(exp_root))
    out: dict[str, Any] = {}
    for role in roles:
        oof, folds, corrections = out_of_fold(exp_root, role, num_folds)
        if oof is None:
            continue
        y, p = oof["label"].to_numpy(), oof["prob"].to_numpy(dtype=float)
        t, b = fit_calibration(y, p)
        cal = apply_temperature(p, t, b)
        # the class-weighted model's own probabilities, for the record: each fold's correction undone
        shifts = {k: float((c or {}).get("logit_shift", 0.0)) for k, c in zip(folds, corrections, strict=True)}
        shift = oof["fold"].map(shifts)
        raw = correct_prior(p, -shift.to_numpy(float)) if shift.any() else p
        studies = pd.concat(
            [study_table(g).assign(fold=k) for k, g in oof.groupby("fold", sort=True)], ignore_index=True
        )
        out[role] = {
            "temperature": t,
            "bias": b,
            "n_images": len(oof),
            "folds": folds,
            "ece_before": expected_calibration_error(y, p),
            "ece_after": expected_calibration_error(y, cal),
            "mean_prob": float(p.mean()),
            "mean_prob_calibrated": float(cal.mean()),
            "prevalence": float(y.mean()),
            "mean_prob_uncorrected": float(raw.mean()),
            "ece_uncorrected": expected_calibration_error(y, raw),
            "prob_correction": dict(zip(map(str, folds), corrections, strict=True)),
            "threshold": fit_operating_point(studies, t, study_table(oof.assign(prob=cal)), b),
        }
    doc = {
        "method": "logistic recalibration (temperature and bias): p -> sigmoid(logit(p) / T + b), (T, b) minimising "
        "the log loss of the pooled out-of-fold images; operating point: "
        "the study-probability cut maximising study kappa (Youden's J cut also given)",
        "fitted_on": "out-of-fold image predictions of the fold models (predictions_val.csv), never the holdout",
        "roles": out,
    }
    if out:
        atomic_write_json(paths.root / CALIBRATION_FILE, doc)
    return doc


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def apply_temperature(p: np.ndarray, temperature: float, bias: float = 0.0) -> np.ndarray:
    """sigmoid(logit(p) / T + b): the calibrated probability (T = 1, b = 0 leave p unchanged up to clipping at
    1e-7)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return 1.0 / (1.0 + np.exp(-(_logit(np.asarray(p, dtype=float)) / temperature + bias)))


# ----------------------------------------------------------------------------------------------
# Patient-grouped bootstrap.

_PATIENT = re.compile(r"(?:^|/)(?P<split>[^/]+)/XR_[^/]+/(?P<patient>patient\d+)/")


def patient_of(study: str) -> str:
    """The patient of a study path: ``<split>/patientNNNNN`` for MURA's layout (a patient's studies of several
    body parts share it, as in the manifest), else the study's parent folder."""
    m = _PATIENT.search(str(study))
    if m:
        return f"{m['split']}/{m['patient']}"
    return str(study).rstrip("/").rsplit("/", 1)[0]


def bootstrap_weights(groups: np.ndarray | list[str], n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """(n_boot, n_items) multiplicities of a patient-grouped bootstrap: each resample draws as many patients as
    there are, with replacement, and an item counts as often as its patient was drawn.

    Args:
        groups: one group (patient) label per item (study).
    """
    codes, uniq = pd.factorize(pd.Series(list(groups), dtype=str), sort=True)
    g = len(uniq)
    rng = np.random.default_rng(seed)
    per_patient = rng.multinomial(g, np.full(g, 1.0 / g), size=n_boot)
    return per_patient[:, codes].astype(np.float64)


def weighted_metrics(
    y: np.ndarray, p: np.ndarray, w: np.ndarray, threshold: float | np.ndarray = THRESHOLD
) -> dict[str, np.ndarray]:
    """kappa, auroc, f1, accuracy of every row of multiplicities `w` (shape (B, N)) at once.

    With ``w = np.ones((1, N))`` these are the plain metrics (the same numbers as `evaluate_predictions`);
    undefined values are NaN (kappa, AUROC) or 0 (F1), as there. `threshold` is one cut for every item or one
    per item (the cross-fitted out-of-fold operating point: each fold's studies cut where the other folds chose).
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=float)
    w = np.atleast_2d(np.asarray(w, dtype=float))
    pred = p > np.asarray(threshold, dtype=float)
    tp, fp = w @ (y & pred), w @ (~y & pred)
    fn, tn = w @ (y & ~pred), w @ (~y & ~pred)
    n = tp + fp + fn + tn
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (tp + tn) / n
        pe = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / n**2
        kappa = np.where(np.isclose(pe, 1.0), np.nan, (acc - pe) / (1.0 - pe))
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    return {"kappa": kappa, "auroc": _weighted_auroc(y, p, w), "f1": f1, "accuracy": acc}


def _weighted_auroc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """P(score of a positive > score of a negative) + 0.5 P(tie), items weighted by `w` (rows: resamples)."""
    order = np.argsort(p, kind="stable")
    ps, ys = p[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]  # last index of each group of equal scores
    out = np.empty(w.shape[0])
    rows = max(1, _BLOCK // max(1, len(p)))
    for s in range(0, w.shape[0], rows):  # blocks of resamples bound the memory; each block is one array op
        ws = w[s : s + rows][:, order]
        cneg = np.cumsum(ws * ~ys, axis=1)[:, ends]  # negative weight at or below each score group
        cpos = np.cumsum(ws * ys, axis=1)[:, ends]
        neg_g = np.diff(cneg, axis=1, prepend=0.0)
        pos_g = np.diff(cpos, axis=1, prepend=0.0)
        below = cneg - neg_g
        wpos, wneg = cpos[:, -1], cneg[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (pos_g * (below + 0.5 * neg_g)).sum(axis=1) / (wpos * wneg)
        out[s : s + rows] = np.where((wpos > 0) & (wneg > 0), auc, np.nan)
    return out


def _interval(boot: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    vals = boot[np.isfinite(boot)]
    if len(vals) < 0.5 * len(boot) or len(vals) == 0:  # mostly undefined: no honest interval
        return math.nan, math.nan
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(vals, [a, 1.0 - a])
    return float(lo), float(hi)


def _aligned(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The studies every table has (inner join on study): label, body_part, patient, prob_<name> per table."""
    base: pd.DataFrame | None = None
    for name, t in tables.items():
        cols = t[["study", "label", "body_part", "prob"]].rename(columns={"prob": f"prob_{name}"})
        base = cols if base is None else base.merge(cols[["study", f"prob_{name}"]], on="study", how="inner")
    if base is None or base.empty:
        raise ValueError("no study in common to bootstrap")
    return base.assign(patient=base["study"].map(patient_of)).reset_index(drop=True)


def ci_table(
    tables: Mapping[str, pd.DataFrame],
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
    by_part: bool = True,
    level: float = CI_LEVEL,
) -> pd.DataFrame:
    """Study-level estimate and patient-grouped bootstrap CI per model, metric and body part.

    Args:
        tables: model name -> `study_table` output (study, body_part, label, prob, optionally threshold: the
            cut of each study, else 0.5). Each table is resampled on its own studies; models with the same
            studies get the same resamples (same seed, same patients).
        by_part: also one row per body part (the resamples restricted to that part's studies).

    Returns:
        Rows model, body_part (ALL or the part), metric, estimate, ci_low, ci_high, n_studies, n_patients,
        n_boot.
    """
    rows = []
    for name, t in tables.items():
        d = _aligned({name: t})
        cut = t.set_index("study")["threshold"].reindex(d["study"]).to_numpy(float) if "threshold" in t else None
        w = bootstrap_weights(d["patient"], n_boot, seed)
        parts = [("ALL", np.ones(len(d), dtype=bool))]
        if by_part:
            parts += [(str(bp), (d["body_part"] == bp).to_numpy()) for bp in sorted(d["body_part"].unique())]
        for part, mask in parts:
            y, p = d["label"].to_numpy()[mask], d[f"prob_{name}"].to_numpy()[mask]
            th = THRESHOLD if cut is None else cut[mask]
            point = weighted_metrics(y, p, np.ones((1, int(mask.sum()))), th)
            boot = weighted_metrics(y, p, w[:, mask], th)
            for metric in CI_METRICS:
                lo, hi = _interval(boot[metric], level)
                rows.append(
                    {
                        "model": name,
                        "body_part": part,
                        "metric": metric,
                        "estimate": float(point[metric][0]),
                        "ci_low": lo,
                        "ci_high": hi,
                        "n_studies": int(mask.sum()),
                        "n_patients": int(d.loc[mask, "patient"].nunique()),
                        "n_boot": n_boot,
                    }
                )
    return pd.DataFrame(rows)


def paired_diff_table(
    a_name: str,
    a: pd.DataFrame,
    b_name: str,
    b: pd.DataFrame,
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
    level: float = CI_LEVEL,
) -> pd.DataFrame:
    """Paired bootstrap of ``metric(a) - metric(b)`` on the studies both have, same resamples for both.

    Returns:
        Rows comparison ("a − b"), metric, estimate, ci_low, ci_high, n_studies, n_patients, n_boot; an
        interval that excludes 0 means the difference is unlikely to be resampling noise at that level.
    """
    d = _aligned({"a": a, "b": b})
    w = bootstrap_weights(d["patient"], n_boot, seed)
    y = d["label"].to_numpy()
    ones = np.ones((1, len(d)))
    pa, pb = d["prob_a"].to_numpy(), d["prob_b"].to_numpy()
    point_a, point_b = weighted_metrics(y, pa, ones), weighted_metrics(y, pb, ones)
    boot_a, boot_b = weighted_metrics(y, pa, w), weighted_metrics(y, pb, w)
    rows = []
    for metric in CI_METRICS:
        lo, hi = _interval(boot_a[metric] - boot_b[metric], level)
        rows.append(
            {
                "comparison": f"{a_name} − {b_name}",
                "metric": metric,
                "estimate": float(point_a[metric][0] - point_b[metric][0]),
                "ci_low": lo,
                "ci_high": hi,
                "n_studies": len(d),
                "n_patients": int(d["patient"].nunique()),
                "n_boot": n_boot,
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Prior correction (class-weighted training) and the out-of-fold operating point.

THRESHOLD_METHODS = ("kappa", "youden")
"""Operating points chosen on pooled out-of-fold study probabilities: the cut maximising study Cohen's kappa
(the default) and the one maximising Youden's J (sensitivity + specificity - 1)."""


def logit_shift(class_weights: Any) -> float:
    """log(w_abnormal / w_normal) of a class-weighted loss (0.0 for None: an unweighted loss).

    With class weights w the minimiser of the weighted cross-entropy is the probability of the reweighted
    priors: logit_w(x) = logit(x) + log(w1 / w0). Subtracting the shift gives back probabilities on the
    training set's own prevalence, before any calibration.
    """
    if class_weights is None:
        return 0.0
    w = [float(x) for x in class_weights]
    if len(w) != 2 or not all(x > 0 and math.isfinite(x) for x in w):
        raise ValueError(f"class weights must be two positive numbers, got {class_weights!r}")
    return math.log(w[1] / w[0])


def prob_correction_record(class_weights: Any) -> dict[str, Any]:
    """What a run records (metrics.json "prob_correction", and in its checkpoints) so that every consumer of
    its probabilities applies the same correction: the class weights of its loss and their `logit_shift`."""
    return {
        "method": "logit shift: p -> sigmoid(logit(p) - log(w_abnormal / w_normal))",
        "class_weights": None if class_weights is None else [float(x) for x in class_weights],
        "logit_shift": logit_shift(class_weights),
    }


def checkpoint_logit_shift(state: Mapping[str, Any]) -> float | None:
    """The logit shift a checkpoint's probabilities need (None: a checkpoint from before the record, whose
    probabilities cannot be corrected)."""
    rec = state.get("prob_correction")
    if not isinstance(rec, Mapping) or "logit_shift" not in rec:
        return None
    return float(rec["logit_shift"])


def correct_prior(p: np.ndarray, shift: float | np.ndarray) -> np.ndarray:
    """sigmoid(logit(p) - shift): a class-weighted model's probability on the unweighted prior (`logit_shift`);
    `shift` is one number or one per row."""
    if np.isscalar(shift) and shift == 0.0:
        return np.asarray(p, dtype=float)
    return 1.0 / (1.0 + np.exp(-(_logit(np.asarray(p, dtype=float)) - shift)))


def _cut_scores(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, kappa, Youden's J) of every cut between two distinct probabilities (call: p > threshold)."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=float)
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]  # last index of each group of equal probabilities
    if len(last) < 2:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    tp = np.cumsum(ys)[last[:-1]].astype(float)
    fp = np.cumsum(~ys)[last[:-1]].astype(float)
    thresholds = (ps[last[:-1]] + ps[last[:-1] + 1]) / 2.0
    n, pos = float(len(y)), float(ys.sum())
    neg = n - pos
    fn, tn = pos - tp, neg - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        po = (tp + tn) / n
        pe = ((tp + fp) * pos + (fn + tn) * neg) / n**2
        kappa = np.where(np.isclose(pe, 1.0), np.nan, (po - pe) / (1.0 - pe))
        youden = tp / pos + tn / neg - 1.0 if pos and neg else np.full(len(tp), np.nan)
    return thresholds, kappa, youden


def choose_threshold(y: np.ndarray, p: np.ndarray, method: str = "kappa") -> tuple[float, float]:
    """(threshold, score): the cut of study probabilities maximising study kappa (method "kappa") or Youden's J
    ("youden") on these rows; a plateau of equal scores gives its middle cut. Call it on out-of-fold rows only.

    Returns:
        (0.5, NaN) when no cut is defined (one class only, or one distinct probability).
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {method!r}")
    if len(np.unique(np.asarray(y))) < 2:  # one class: every cut is as good as any other
        return THRESHOLD, math.nan
    thresholds, kappa, youden = _cut_scores(y, p)
    score = kappa if method == "kappa" else youden
    if len(score) == 0 or not np.isfinite(score).any():
        return THRESHOLD, math.nan
    best = np.flatnonzero(score == np.nanmax(score))
    i = int(best[len(best) // 2])
    return float(thresholds[i]), float(score[i])


def cross_fitted_thresholds(studies: pd.DataFrame, method: str = "kappa") -> dict[int, float]:
    """fold -> the threshold chosen (`choose_threshold`) on the out-of-fold studies of the OTHER folds: cutting
    each fold at it scores the operating point on studies that did not choose it (an honest CV estimate)."""
    out = {}
    for fold in sorted(studies["fold"].unique()):
        rest = studies[studies["fold"] != fold]
        out[int(fold)] = choose_threshold(rest["label"].to_numpy(), rest["prob"].to_numpy(dtype=float), method)[0]
    return out
