"""The official MURA-v1.1 CSVs -> one manifest row per image (build_manifest), with strict input checks.

The four CSVs are the truth: the tree is never walked, so stray files (``._image1.png``,
``.DS_Store``) cannot sneak in. Every image listed must exist; images are not decoded here (packing
does that).

Labeled studies that have no image rows are logged as a warning by default (they add nothing to a
per-image manifest, and a deliberately trimmed image list is a valid way to use a subset); pass
``strict=True`` to make them an error.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from bonehpc.fsio import atomic_write_csv, read_bytes_bounded

log = logging.getLogger(__name__)

MURA_DIR = "MURA-v1.1"
SPLITS = ("train", "valid")
MANIFEST_COLUMNS = ("image_id", "path", "split", "body_part", "patient", "study", "view", "label")
INT_COLUMNS = ("image_id", "view", "label")
STR_COLUMNS = ("path", "split", "body_part", "patient", "study")
MAX_LISTED = 20

MURA_BODY_PARTS = ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
"""The seven body parts of MURA; other XR_<PART> folders are packed too, with a warning naming them."""

_STUDY = (
    r"MURA-v1\.1/(?P<split>[^/]+)/XR_(?P<part>[A-Za-z0-9][A-Za-z0-9_-]*)/patient(?P<patient>\d+)/"
    r"study\d+_(?P<suffix>positive|negative)/"
)
IMAGE_RE = re.compile(rf"^{_STUDY}image(?P<view>\d+)\.png$")
STUDY_RE = re.compile(rf"^{_STUDY}$")
IMAGE_PATTERN = (
    "MURA-v1.1/<split>/XR_<PART>/patient<digits>/study<digits>_(positive|negative)/image<digits>.png "
    "(ASCII; PART letters, digits, _ or -)"
)
STUDY_PATTERN = "MURA-v1.1/<split>/XR_<PART>/patient<digits>/study<digits>_(positive|negative)/"


class ManifestError(ValueError):
    """The MURA CSVs or files are missing or inconsistent; the message names the file, line or path."""


def _listing(items: list[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return shown + more


def locate(mura_root: str | Path) -> Path:
    """The folder that contains MURA-v1.1/ (mura_root itself, or its parent when it is MURA-v1.1).

    Raises:
        ManifestError: When neither mura_root nor mura_root/MURA-v1.1 holds the data.
    """
    root = Path(mura_root)
    if (root / MURA_DIR).is_dir():
        return root
    if root.name == MURA_DIR and root.is_dir():
        return root.parent
    if not root.exists():
        raise ManifestError(f"MURA root {root} does not exist")
    raise ManifestError(
        f"no {MURA_DIR}/ folder in {root} (give the folder that contains {MURA_DIR}/, or {MURA_DIR} itself)"
    )


def decode_utf8(data: bytes, name: str | Path) -> str:
    """`data` as UTF-8 text (a leading BOM dropped); ManifestError naming the file and line otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ManifestError(f"{name} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x})") from None


def _read_csv(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank row; malformed column counts are left to the caller."""
    try:
        text = decode_utf8(read_bytes_bounded(path), path)
    except OSError as err:
        raise ManifestError(f"{path}: cannot read ({err.strerror or err})") from None
    rows = []
    for line_no, fields in enumerate(csv.reader(text.splitlines()), start=1):
        fields = [f.strip() for f in fields]
        if not any(fields):
            continue
        rows.append((line_no, fields))
    return rows


def _check_rows(
    rows: Iterable[tuple[int, list[str]]], name: str, split: str, labeled: bool, problems: list[str]
) -> list[tuple[int, str, int, re.Match[str]]]:
    """Parsed (line, path, label, match) rows of one CSV; malformed rows are added to problems."""
    good = []
    want = 2 if labeled else 1
    regex, pattern = (STUDY_RE, STUDY_PATTERN) if labeled else (IMAGE_RE, IMAGE_PATTERN)
    for line_no, fields in rows:
        where = f"{name} line {line_no}"
        if line_no == 1 and not fields[0].startswith(f"{MURA_DIR}/"):
            problems.append(
                f"{where}: {','.join(fields)!r} does not start with {MURA_DIR}/ (a header? the CSVs have none)"
            )
            continue
        if len(fields) != want:
            problems.append(f"{where}: expected {want} column(s), got {len(fields)}: {','.join(fields)!r}")
            continue
        path = fields[0]
        label = -1
        if labeled:
            if fields[1] not in ("0", "1"):
                problems.append(f"{where}: label must be 0 or 1, got {fields[1]!r}")
                continue
            label = int(fields[1])
        if not path.isascii():
            problems.append(f"{where}: path {path!r} has non-ASCII characters (MURA paths are ASCII)")
            continue
        match = regex.match(path)
        if match is None:
            problems.append(f"{where}: path {path!r} does not match {pattern}")
            continue
        if match["split"] != split:
            problems.append(f"{where}: path {path!r} is in split {match['split']!r}, but this is the {split} CSV")
            continue
        good.append((line_no, path, label, match))
    return good


def _duplicates(rows: list[tuple[int, str, int, re.Match[str]]], name: str) -> list[str]:
    first: dict[str, int] = {}
    dups = []
    for line_no, path, _, _ in rows:
        if path in first:
            dups.append(f"{path} ({name} lines {first[path]} and {line_no})")
        else:
            first[path] = line_no
    return dups


def build_manifest(
    mura_root: str | Path, *, strict: bool = False, check_files: bool = True, cross_split_patients: bool = False
) -> pd.DataFrame:
    """One row per image of the official CSVs (train first, then valid), in CSV order.

    Args:
        mura_root: The folder that contains MURA-v1.1/, or MURA-v1.1 itself.
        strict: Treat labeled studies without any image row as an error instead of a warning.
        check_files: Raise when listed image files are missing. The packer passes False: it records
            missing files in rejected.csv (with every other unusable image) instead of stopping.
        cross_split_patients: Accept a patient number in both the train and the valid split (refused
            by default: a holdout leak; see check_split_integrity).

    Returns:
        DataFrame with the columns of MANIFEST_COLUMNS (see docs/architecture.md).

    Raises:
        ManifestError: For a missing CSV, malformed or duplicate rows, a label that disagrees with its
            study folder, images without a labeled study, image files that do not exist, one file listed
            under two paths, or a patient in both splits (see check_split_integrity).
    """
    base = locate(mura_root)
    folder = base / MURA_DIR
    names = [f"{split}_{kind}.csv" for split in SPLITS for kind in ("image_paths", "labeled_studies")]
    missing_csv = [n for n in names if not (folder / n).is_file()]
    if missing_csv:
        raise ManifestError(f"missing CSV file(s) in {folder}: {', '.join(missing_csv)}")

    problems: list[str] = []
    images: dict[str, list[tuple[int, str, int, re.Match[str]]]] = {}
    studies: dict[str, list[tuple[int, str, int, re.Match[str]]]] = {}
    for split in SPLITS:
        name_i, name_s = f"{split}_image_paths.csv", f"{split}_labeled_studies.csv"
        images[split] = _check_rows(_read_csv(folder / name_i), name_i, split, False, problems)
        studies[split] = _check_rows(_read_csv(folder / name_s), name_s, split, True, problems)
    if problems:
        raise ManifestError(f"{len(problems)} malformed row(s) in {folder}: {_listing(problems, 10)}")
    if not any(images[split] for split in SPLITS):
        raise ManifestError(f"no image rows in {folder}/{{train,valid}}_image_paths.csv (the CSVs are empty)")

    dups = []
    for split in SPLITS:
        dups += _duplicates(images[split], f"{split}_image_paths.csv")
        dups += _duplicates(studies[split], f"{split}_labeled_studies.csv")
    if dups:
        raise ManifestError(f"{len(dups)} duplicate row(s): {_listing(dups)}")

    disagree = [
        f"{path} has label {label} ({split}_labeled_studies.csv line {line_no})"
        for split in SPLITS
        for line_no, path, label, match in studies[split]
        if label != (match["suffix"] == "positive")
    ]
    if disagree:
        raise ManifestError(
            f"{len(disagree)} labeled stud(ies) disagree with their folder suffix "
            f"(label 1 needs _positive, 0 needs _negative): {_listing(disagree)}"
        )

    labels = {path: label for split in SPLITS for _, path, label, _ in studies[split]}
    orphans = [
        f"{path} ({split}_image_paths.csv line {line_no})"
        for split in SPLITS
        for line_no, path, _, _ in images[split]
        if path.rsplit("/", 1)[0] + "/" not in labels
    ]
    if orphans:
        raise ManifestError(f"{len(orphans)} image(s) have no row in the labeled-studies CSV: {_listing(orphans)}")

    with_images = {path.rsplit("/", 1)[0] + "/" for split in SPLITS for _, path, _, _ in images[split]}
    empty = [path for path in labels if path not in with_images]
    if empty:
        msg = f"{len(empty)} labeled stud(ies) have no image in the image-paths CSVs: {_listing(empty)}"
        if strict:
            raise ManifestError(msg)
        log.warning("%s (ignored: a per-image manifest has no rows for them)", msg)

    absent = _absent_or_twice(base, [path for split in SPLITS for _, path, _, _ in images[split]])
    if absent and not check_files:
        log.warning("%d image file(s) listed in the CSVs are missing under %s: %s", len(absent), base, _listing(absent))
    elif absent:
        raise ManifestError(
            f"{len(absent)} image file(s) listed in the CSVs are missing under {base}: {_listing(absent)}"
        )

    df = _frame(images, labels)
    check_split_integrity(df, folder, cross_split_patients)
    warn_unknown_parts(df)
    return _typed(df)


def _frame(images: dict[str, list[tuple[int, str, int, re.Match[str]]]], labels: dict[str, int]) -> pd.DataFrame:
    """The manifest rows of the checked image rows (train first, then valid), image_id in that order."""
    records = []
    for split in SPLITS:
        for _, path, _, match in images[split]:
            study = path.rsplit("/", 1)[0] + "/"
            part, patient, view = match["part"], f"{split}/patient{match['patient']}", int(match["view"])
            records.append((path, split, part, patient, study, view, labels[study]))
    df = pd.DataFrame.from_records(records, columns=list(MANIFEST_COLUMNS[1:]))
    df.insert(0, "image_id", range(len(df)))
    return df


def _absent_or_twice(base: Path, paths: list[str]) -> list[str]:
    """The listed image files that do not exist; ManifestError when one file is listed under two paths
    (a symlinked or hard-linked folder: the same image would be counted, and maybe split, twice)."""
    absent: list[str] = []
    twice: list[str] = []
    seen: dict[tuple[int, int], str] = {}
    for path in paths:
        try:
            st = os.stat(base / path)
        except (OSError, ValueError):
            absent.append(path)
            continue
        if not stat.S_ISREG(st.st_mode):
            absent.append(path)
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            twice.append(f"{seen[key]} and {path}")
        else:
            seen[key] = path
    if twice:
        raise ManifestError(f"{len(twice)} image file(s) listed twice under two paths (one file): {_listing(twice)}")
    return absent


def check_split_integrity(df: pd.DataFrame, source: str | Path, cross_split_patients: bool = False) -> None:
    """Refuse a patient number that is in both the train and the valid split (a holdout leak: bonehpc
    prefixes patient ids with their split, so it would count them as two patients), unless
    `cross_split_patients`; and always a patient number spelled two ways (patient7 and patient00007: one
    patient as two, possibly in two folds).

    Raises:
        ManifestError: naming the source and the patients (with their body parts and splits).
    """
    parts = df["patient"].astype(str).str.extract(r"^(?P<split>[^/]+)/patient(?P<digits>\d+)$")
    if parts["digits"].isna().any():
        return  # malformed ids are check_manifest's to report
    table = pd.DataFrame(
        {
            "number": parts["digits"].str.lstrip("0"),  # the patient number, however many leading zeros
            "spelling": parts["digits"],
            "split": parts["split"],
            "part": df["body_part"].astype(str),
        }
    )
    spellings = table.groupby("number")["spelling"].unique()
    twice = [" and ".join(f"patient{v}" for v in sorted(vs)) for vs in spellings if len(vs) > 1]
    if twice:
        raise ManifestError(
            f"{source}: {len(twice)} patient number(s) spelled two ways (one patient, two ids): {_listing(twice)}"
        )
    splits = table.groupby("number")["split"].nunique()
    both = splits[splits > 1].index
    if len(both) and not cross_split_patients:
        shown = []
        for n in both[:MAX_LISTED]:
            rows = table[table["number"] == n].drop_duplicates(["split", "part"])
            where = ", ".join(f"{r.split} XR_{r.part}" for r in rows.itertuples())
            shown.append(f"patient{rows['spelling'].iloc[0]} ({where})")
        more = f", ... and {len(both) - MAX_LISTED} more" if len(both) > MAX_LISTED else ""
        raise ManifestError(
            f"{source}: {len(both)} patient(s) in both the train and the valid split (a holdout leak): "
            f"{_listing(shown)}{more}; "
            "if the data set means it, set data.cross_split_patients=true (--cross-split-patients)"
        )
    if len(both):
        log.warning(
            "%d patient(s) in both the train and the valid split (allowed by data.cross_split_patients)", len(both)
        )


def warn_unknown_parts(df: pd.DataFrame) -> list[str]:
    """Log a warning naming the body parts outside MURA's seven (they are kept); returns them."""
    extra = sorted(set(df["body_part"].astype(str)) - set(MURA_BODY_PARTS))
    if extra:
        log.warning(
            "body part(s) outside MURA's seven (%s): %s - kept, but models and reports are tuned to the seven",
            ", ".join(MURA_BODY_PARTS),
            ", ".join(f"XR_{p}" for p in extra),
        )
    return extra


def check_manifest(df: pd.DataFrame, source: str | Path, cross_split_patients: bool = False) -> None:
    """Validate a manifest that did not come from build_manifest (e.g. `pack --manifest CSV`) like the CSVs.

    Every path must match the MURA layout (so it stays inside the data root: no '..', no absolute
    path, ASCII), and split, body_part, patient, study, view and label must agree with the path;
    image_id values must be unique.

    Raises:
        ManifestError: naming the source and the data rows that fail.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{source}: missing manifest column(s) {', '.join(missing)}")
    if df.empty:
        raise ManifestError(f"{source}: no image rows")
    problems = []
    for i, r in enumerate(df.loc[:, list(MANIFEST_COLUMNS)].itertuples(index=False), start=1):
        where = f"data row {i}"
        path = str(r.path)
        m = IMAGE_RE.match(path) if path.isascii() else None
        if m is None:
            problems.append(f"{where}: path {path!r} does not match {IMAGE_PATTERN}")
            continue
        want = {
            "split": m["split"],
            "body_part": m["part"],
            "patient": f"{m['split']}/patient{m['patient']}",
            "study": path.rsplit("/", 1)[0] + "/",
            "view": int(m["view"]),
            "label": int(m["suffix"] == "positive"),
        }
        if m["split"] not in SPLITS:
            problems.append(f"{where}: split {m['split']!r} is not train or valid")
            continue
        bad = [f"{k}={getattr(r, k)!r} (path says {v!r})" for k, v in want.items() if getattr(r, k) != v]
        if bad:
            problems.append(f"{where}: {', '.join(bad)}")
    if df["image_id"].duplicated().any():
        problems.append(f"image_id {int(df.loc[df['image_id'].duplicated(), 'image_id'].iloc[0])} repeats")
    if df["path"].duplicated().any():
        problems.append(f"path {df.loc[df['path'].duplicated(), 'path'].iloc[0]!r} repeats")
    if problems:
        raise ManifestError(f"{source}: {len(problems)} bad row(s): {_listing(problems, 5)}")
    check_split_integrity(df, source, cross_split_patients)
    warn_unknown_parts(df)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """The manifest dtypes: int64 ids, views and labels; str for the rest (same after a CSV round trip)."""
    out = df.copy()
    for col in INT_COLUMNS:
        out[col] = out[col].astype("int64")
    for col in STR_COLUMNS:
        out[col] = out[col].astype(str)
    return out


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the manifest as CSV (atomically: a temporary file, then rename)."""
    return atomic_write_csv(path, df)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV written by write_manifest, with the manifest dtypes.

    Extra columns (e.g. ``fold``) are kept as pandas reads them.

    Raises:
        ManifestError: When the file is missing, lacks a manifest column or has non-integer ids, views
            or labels.
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest file not found: {p}")
    try:
        text = decode_utf8(read_bytes_bounded(p), p)
    except OSError as err:
        raise ManifestError(f"{p}: cannot read ({err.strerror or err})") from None
    if not text.strip():
        raise ManifestError(f"{p}: empty file (a manifest CSV has a header and one row per image)")
    try:
        df = pd.read_csv(io.StringIO(text), dtype={c: str for c in STR_COLUMNS})
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ManifestError(f"{p}: not a readable manifest CSV: {str(err).strip()}") from None
    if df.empty:
        raise ManifestError(f"{p}: has a header but no image rows")
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{p}: missing manifest column(s) {', '.join(missing)}")
    for col in INT_COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        if values.isna().any() or (values != values.round()).any():
            bad = int(values.isna().idxmax()) if values.isna().any() else int((values != values.round()).idxmax())
            raise ManifestError(f"{p}: column {col} must hold integers (data row {bad + 1}: {df[col].iloc[bad]!r})")
    if df[list(STR_COLUMNS)].isna().any().any():
        col = next(c for c in STR_COLUMNS if df[c].isna().any())
        raise ManifestError(f"{p}: column {col} has empty values (data row {int(df[col].isna().idxmax()) + 1})")
    return _typed(df)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Images, studies, patients and abnormal studies per split x body part, plus an ALL row per split."""
    studies = df.drop_duplicates("study")

    def counts(group: pd.DataFrame, group_studies: pd.DataFrame) -> dict[str, float]:
        n_studies = len(group_studies)
        n_abnormal = int(group_studies["label"].sum())
        return {
            "images": len(group),
            "studies": n_studies,
            "patients": group["patient"].nunique(),
            "abnormal_studies": n_abnormal,
            "abnormal_rate": round(n_abnormal / n_studies, 3) if n_studies else float("nan"),
        }

    rows = []
    splits = [s for s in SPLITS if s in set(df["split"])] + sorted(set(df["split"]) - set(SPLITS))
    for split in splits:
        in_split = df[df["split"] == split]
        split_studies = studies[studies["split"] == split]
        for part in sorted(in_split["body_part"].unique()):
            rows.append(
                {
                    "split": split,
                    "body_part": part,
                    **counts(
                        in_split[in_split["body_part"] == part], split_studies[split_studies["body_part"] == part]
                    ),
                }
            )
        rows.append({"split": split, "body_part": "ALL", **counts(in_split, split_studies)})
    columns = ["split", "body_part", "images", "studies", "patients", "abnormal_studies", "abnormal_rate"]
    return pd.DataFrame(rows, columns=columns)
