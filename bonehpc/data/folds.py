"""The experiment's split, in one place: K patient-grouped folds, the final models' selection slice, the sides.

MURA has several studies per patient, so a fold boundary must never split a patient (make_folds, stratified
by body part x label). The official valid split never enters a fold: it is the holdout test set (fold -1 in
apply_folds). An experiment's folds.csv is written by `ensure_folds` only (from the packed images), checked
by it against the packed patients and data.num_folds, and cut into the two sides of a run by `split`.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from bonehpc.fsio import atomic_write_csv, read_bytes_bounded

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
        df = pd.read_csv(io.BytesIO(read_bytes_bounded(p)), dtype={"patient": str})
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


# ----------------------------------------------------------------------------------------------
# The experiment's split: folds.csv (one writer), the packed patients, the two sides of a run


def packed_folds(folds: pd.DataFrame, frame: pd.DataFrame, warn: bool = True) -> pd.DataFrame:
    """The rows of `folds` whose patient has a packed train image in `frame` (the shard index or the packed
    manifest): the one packed-patient filter. Patients lost in packing are in no side of any run."""
    packed = set(frame.loc[frame["split"] == "train", "patient"].astype(str))
    keep = folds["patient"].isin(packed)
    lost = folds.loc[~keep, "patient"]
    if warn and len(lost):
        log.warning("%d fold patient(s) have no packed image (lost in packing): %s", len(lost), ", ".join(lost[:5]))
    return folds[keep]


def check_folds(folds: pd.DataFrame, frame: pd.DataFrame, num_folds: int, source: str | Path) -> pd.DataFrame:
    """`folds` (read from `source`) fits the packed images in `frame` and data.num_folds; returns its packed rows.

    Raises:
        FoldError: a packed train patient without a fold, a patient with two folds, another number of
            folds than num_folds, or no fold patient among the packed ones (folds of other shards).
    """
    packed = packed_folds(folds, frame, warn=False)
    try:
        apply_folds(frame, packed)
    except FoldError as err:
        raise FoldError(f"{source}: {err}") from None
    k = int(folds["fold"].max()) + 1 if len(folds) else 0
    if k != num_folds:
        raise FoldError(
            f"{source} has {k} folds but data.num_folds={num_folds}: delete it or use a new experiment name"
        )
    if packed.empty:
        raise FoldError(f"{source}: none of its patients is in the shards")
    return packed


def ensure_folds(path: str | Path, frame: pd.DataFrame, num_folds: int, seed: int, create: bool = True) -> pd.DataFrame:
    """The experiment's folds.csv at `path`, written from `frame` (the packed images) when it is missing, read
    and checked (`check_folds`). The only writer of an experiment's folds.csv: an existing one is never
    rewritten (the folds of an experiment do not change between submissions).

    Args:
        path: the experiment's folds.csv (ExperimentPaths.folds).
        frame: the shard index or the packed manifest (split, patient, study, body_part, label).
        num_folds: data.num_folds.
        seed: data.fold_seed.
        create: False to check only (a preflight): returns an empty frame when the file is missing.

    Raises:
        FoldError: the folds cannot be made, written, read, or do not fit the packed images.
    """
    p = Path(path)
    if not p.is_file():
        if not create:
            return pd.DataFrame({"patient": pd.Series(dtype=str), "fold": pd.Series(dtype="int64")})
        folds = make_folds(frame, num_folds, seed)
        try:
            write_folds(folds, p)
        except OSError as err:
            raise FoldError(f"{p}: cannot write ({err.strerror or err})") from None
        log.info("wrote %s (%d folds of %d packed train patients)", p, num_folds, len(folds))
    folds = read_folds(p)
    check_folds(folds, frame, num_folds, p)
    return folds


def final_selection(train: pd.DataFrame, frac: float, seed: int) -> tuple[set[str], int]:
    """Patients of the final models' selection slice and k: part 0 of k = round(1/frac) patient-grouped
    parts of the train images, stratified by body part x label (make_folds, seeded). A small set gets
    fewer, larger parts (k is at most the patients and the studies of the largest stratum)."""
    studies = train.drop_duplicates("study")
    largest = int(studies.groupby(["body_part", "label"]).size().max())
    n = train["patient"].nunique()
    if n < 2 or largest < 2:
        raise FoldError(f"final: {n} train patient(s); selection on held-out train patients needs at least 2")
    k = min(max(2, round(1 / frac)), n, largest)
    parts = make_folds(train, k, seed)
    return set(parts.loc[parts["fold"] == 0, "patient"]), k


@dataclass
class Split:
    """The two sides of one run: train rows, validation rows (image rows of the shard index) and the record
    of how the validation side was chosen (metrics.json "selection")."""

    train: pd.DataFrame
    val: pd.DataFrame
    selection: dict[str, Any] = field(default_factory=dict)

    def ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(train image ids, validation image ids)."""
        return self.train["image_id"].to_numpy(np.int64), self.val["image_id"].to_numpy(np.int64)


def split(
    index: pd.DataFrame, folds: pd.DataFrame, fold: int | str, num_folds: int, final_val_frac: float, seed: int
) -> Split:
    """The sides of `fold`; neither holds a valid-split image.

    A fold validates on its fold of the train split; "final" on `final_selection` of the train patients.
    Fold patients without a packed image (lost in packing) are left out (`packed_folds`).

    Raises:
        FoldError: `fold` is not 0..num_folds-1 or "final", or a side is empty.
    """
    if not (fold == "final" or (isinstance(fold, int) and not isinstance(fold, bool) and 0 <= fold < num_folds)):
        raise FoldError(f"fold {fold!r} is not in 0..{num_folds - 1} (data.num_folds={num_folds}) or 'final'")
    df = apply_folds(index, packed_folds(folds, index))
    train_split = df[df["split"] == "train"]
    if fold == "final":
        held, k = final_selection(train_split, final_val_frac, seed)
        in_val = train_split["patient"].isin(held)
        train, val = train_split[~in_val], train_split[in_val]
        selection: dict[str, Any] = {
            "method": "held-out train patients (patient-grouped, stratified by body part x label)",
            "val_frac": final_val_frac,
            "parts": k,
            "seed": seed,
        }
    else:
        train, val = train_split[train_split["fold"] != fold], train_split[train_split["fold"] == fold]
        selection = {"method": "cross-validation fold", "fold": fold}
    if train.empty or val.empty:
        name = "final" if fold == "final" else f"fold{fold}"
        raise FoldError(f"{name}: empty {'training' if train.empty else 'validation'} set")
    selection.update(patients=int(val["patient"].nunique()), studies=int(val["study"].nunique()), images=len(val))
    return Split(train, val, selection)


def split_ids(
    index: pd.DataFrame,
    folds: pd.DataFrame,
    fold: int | str,
    num_folds: int,
    *,
    final_val_frac: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(train image ids, validation image ids) of `fold` (`split`; seed = data.fold_seed)."""
    return split(index, folds, fold, num_folds, final_val_frac, seed).ids()
