"""Patient-grouped K folds of the official train split, stratified by body part x label (make_folds).

MURA has several studies per patient, so a fold boundary must never split a patient. The official
valid split never enters a fold: it is the holdout test set (fold -1 in apply_folds).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from bonehpc.fsio import atomic_write_csv

log = logging.getLogger(__name__)

HOLDOUT_FOLD = -1


class FoldError(ValueError):
    """Folds cannot be made, read or applied; the message says why."""


def make_folds(manifest: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """Assign every train-split patient to one of k folds.

    Studies are the samples (so a patient with many views does not dominate), grouped by patient and
    stratified by body part x label with scikit-learn's StratifiedGroupKFold (shuffled by seed). The
    result does not depend on the row order of the manifest.

    Args:
        manifest: The manifest (build_manifest / read_manifest).
        k: Number of folds (at least 2).
        seed: Seed of the shuffle; the same manifest, k and seed give the same folds.

    Returns:
        DataFrame with columns patient (str) and fold (int64, 0..k-1), one row per train patient,
        sorted by patient.

    Raises:
        FoldError: When k < 2, or there are fewer train patients than k.
    """
    if k < 2:
        raise FoldError(f"k: need at least 2 folds, got {k}")
    train = manifest[manifest["split"] == "train"]
    studies = train.drop_duplicates("study").sort_values("study", kind="stable").reset_index(drop=True)
    n_patients = studies["patient"].nunique()
    if n_patients < k:
        raise FoldError(f"only {n_patients} train patient(s) for {k} folds: need at least one patient per fold")
    strata = studies["body_part"].astype(str) + "/" + studies["label"].astype(str)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of: dict[str, int] = {}
    with warnings.catch_warnings():
        # Rare strata (a body part with fewer abnormal studies than k) are normal in small sets;
        # sklearn warns about them, and the grouping still holds.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, test_idx) in enumerate(splitter.split(studies, strata, groups=studies["patient"])):
            for patient in studies["patient"].iloc[test_idx]:
                fold_of[patient] = fold
    folds = pd.DataFrame({"patient": sorted(fold_of)})
    folds["patient"] = folds["patient"].astype(str)
    folds["fold"] = folds["patient"].map(fold_of).astype("int64")
    empty = sorted(set(range(k)) - set(folds["fold"]))
    if empty:
        raise FoldError(f"fold(s) {empty} got no patient ({n_patients} train patients, k={k}); use fewer folds")
    return folds


def apply_folds(manifest: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """The manifest with an int64 column fold (HOLDOUT_FOLD = -1 for valid-split images), rows in order.

    Raises:
        FoldError: When a train patient has no fold, a fold patient is not a train patient of this
            manifest, or a patient has two folds.
    """
    dup = folds["patient"][folds["patient"].duplicated()]
    if len(dup):
        raise FoldError(f"patient {dup.iloc[0]} has more than one fold")
    train_patients = set(manifest.loc[manifest["split"] == "train", "patient"])
    fold_patients = set(folds["patient"])
    unassigned = sorted(train_patients - fold_patients)
    if unassigned:
        raise FoldError(
            f"{len(unassigned)} train patient(s) have no fold (folds made for another manifest?): "
            f"{', '.join(unassigned[:5])}"
        )
    foreign = sorted(fold_patients - train_patients)
    if foreign:
        raise FoldError(
            f"{len(foreign)} fold patient(s) are not train patients of this manifest "
            f"(the valid split is the holdout and never in a fold): {', '.join(foreign[:5])}"
        )
    mapping = dict(zip(folds["patient"], folds["fold"], strict=True))
    out = manifest.copy()
    out["fold"] = out["patient"].map(mapping).fillna(HOLDOUT_FOLD).astype("int64")
    return out


def write_folds(folds: pd.DataFrame, path: str | Path) -> Path:
    """Write folds (patient, fold) as CSV, atomically."""
    return atomic_write_csv(path, folds[["patient", "fold"]])


def read_folds(path: str | Path) -> pd.DataFrame:
    """Read a folds CSV (patient str, fold int64).

    Raises:
        FoldError: When the file is missing, lacks a column, or has a non-integer or negative fold.
    """
    p = Path(path)
    if not p.is_file():
        raise FoldError(f"folds file not found: {p}")
    try:
        df = pd.read_csv(p, dtype={"patient": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise FoldError(f"{p}: not a readable folds CSV: {err}") from None
    missing = [c for c in ("patient", "fold") if c not in df.columns]
    if missing:
        raise FoldError(f"{p}: missing column(s) {', '.join(missing)}")
    fold = pd.to_numeric(df["fold"], errors="coerce")
    bad = fold.isna() | (fold < 0) | (fold != fold.round())
    if bad.any():
        row = int(bad.idxmax())
        raise FoldError(f"{p}: fold must be an integer >= 0 (data row {row + 1}: {df['fold'].iloc[row]!r})")
    out = df[["patient", "fold"]].copy()
    out["patient"] = out["patient"].astype(str)
    out["fold"] = fold.astype("int64")
    return out


def fold_summary(manifest: pd.DataFrame) -> pd.DataFrame:
    """Patients, studies, images and abnormal-study rate per fold (the holdout as fold -1, split valid)."""
    if "fold" not in manifest.columns:
        raise FoldError("fold_summary needs a manifest with a fold column (apply_folds)")
    rows = []
    for fold, group in sorted(manifest.groupby("fold"), key=lambda kv: (kv[0] == HOLDOUT_FOLD, kv[0])):
        studies = group.drop_duplicates("study")
        rows.append(
            {
                "fold": int(fold),
                "split": "valid" if fold == HOLDOUT_FOLD else "train",
                "patients": group["patient"].nunique(),
                "studies": len(studies),
                "images": len(group),
                "abnormal_rate": round(float(studies["label"].mean()), 3),
            }
        )
    return pd.DataFrame(rows, columns=["fold", "split", "patients", "studies", "images", "abnormal_rate"])
