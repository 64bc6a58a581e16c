"""Image- and study-level metrics of binary abnormality predictions, overall and per body part (MURA protocol).

A study's probability is the mean of its images' probabilities and the study is called abnormal when it is
> 0.5 (as is an image). Degenerate cases never raise: when the labels hold one class only, AUROC is NaN; Cohen's
kappa is NaN when both the labels and the predictions are one and the same class (agreement by chance is then
1 and kappa is 0/0; scikit-learn's ``replace_undefined_by`` is set to NaN), otherwise scikit-learn's value
(e.g. 0.0 when the predictions are constant but the labels are not). Precision, recall and F1 are 0.0 when
undefined (no predicted / no actual positives).
"""

from __future__ import annotations

import math
import warnings

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

THRESHOLD = 0.5
REQUIRED_COLUMNS = ("image_id", "study", "body_part", "label", "prob")
LEVELS = ("image", "study")


def _check(df: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing} (need {list(REQUIRED_COLUMNS)})")
    if len(df) == 0:
        raise ValueError("predictions are empty")
    labels = set(pd.unique(df["label"]).tolist())
    if not labels <= {0, 1}:
        raise ValueError(f"predictions: label must be 0 or 1, got {sorted(labels, key=str)[:5]}")
    prob = pd.to_numeric(df["prob"], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(prob) | (prob < 0) | (prob > 1)
    if bad.any():
        rows = df.loc[bad, "image_id"].tolist()[:5]
        raise ValueError(f"predictions: prob must be a number in [0, 1]; {int(bad.sum())} bad rows, image_id {rows}")
    dup = df["image_id"].duplicated()
    if dup.any():
        raise ValueError(f"predictions: image_id repeated: {df.loc[dup, 'image_id'].tolist()[:5]}")


def study_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per study: study, body_part, label, prob (mean of its images), n_images; sorted by study.

    Raises:
        ValueError: A study's images disagree on label or body part (names the studies).
    """
    _check(df)
    g = df.groupby("study", sort=True)
    table = g.agg(
        body_part=("body_part", "first"),
        label=("label", "first"),
        prob=("prob", "mean"),
        n_images=("image_id", "size"),
        n_labels=("label", "nunique"),
        n_parts=("body_part", "nunique"),
    ).reset_index()
    bad = table.loc[(table["n_labels"] > 1) | (table["n_parts"] > 1), "study"].tolist()
    if bad:
        raise ValueError(f"studies whose images disagree on label or body part: {bad[:5]}")
    table["label"] = table["label"].astype(np.int64)
    table["prob"] = table["prob"].astype(float)
    return table[["study", "body_part", "label", "prob", "n_images"]]


def _binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    y = y.astype(np.int64)
    pred = (p > THRESHOLD).astype(np.int64)
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


def evaluate_predictions(df: pd.DataFrame) -> dict[str, float]:
    """Metrics of a predictions table (columns image_id, study, body_part, label, prob; one row per image).

    Returns:
        ``image_{m}`` and ``study_{m}`` for m in accuracy, precision, recall, f1, auroc, kappa, n, n_pos, and per
        body part ``study_kappa/{PART}``, ``study_auroc/{PART}``, ``study_accuracy/{PART}``, ``study_n/{PART}``.
        n and n_pos are ints; undefined values are NaN (see the module docstring).

    Raises:
        ValueError: Missing columns, empty table, labels other than 0/1, probabilities outside [0, 1],
            repeated image ids or studies whose images disagree on label or body part.
    """
    studies = study_table(df)
    out: dict[str, float] = {}
    for level, table in (("image", df), ("study", studies)):
        y = table["label"].to_numpy()
        p = table["prob"].to_numpy(dtype=float)
        for key, value in _binary_metrics(y, p).items():
            out[f"{level}_{key}"] = value
    for part, sub in studies.groupby("body_part", sort=True):
        m = _binary_metrics(sub["label"].to_numpy(), sub["prob"].to_numpy(dtype=float))
        for key in ("kappa", "auroc", "accuracy", "n"):
            out[f"study_{key}/{part}"] = m[key]
    return out


def confusion(df: pd.DataFrame, level: str = "study") -> dict[str, int]:
    """Counts tp, fp, tn, fn at image or study level (positive: prob > 0.5)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if level == "study":
        table = study_table(df)
    else:
        _check(df)
        table = df
    y = table["label"].to_numpy().astype(np.int64)
    pred = (table["prob"].to_numpy(dtype=float) > THRESHOLD).astype(np.int64)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}
