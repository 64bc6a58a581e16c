"""Parallel, resumable packing of MURA PNGs into HDF5 shards (format: bonehpc.data.shards).

Three steps, so a cluster can run the middle one as an array job:

1. `plan_pack` fixes which image goes to which shard (deterministic: manifest order, fixed shard size)
   and writes the plan to ``<out>/.pack/``.
2. `pack_shard(plan, k)` decodes, converts to 8-bit gray, resizes and writes shard k, then records
   what it did in ``<out>/.pack/shard-0000k.json``. A shard whose record and file match the plan
   (same images and settings, same SHA-256) is skipped, so a re-run only redoes what is missing,
   partial or stale. Each worker writes its own shard file: no pixels travel between processes.
3. `finalize_pack` writes index.csv, rejected.csv, lost_studies.csv and, last, manifest.json.

Images that cannot be used (missing, unreadable, empty, truncated, corrupt, not an image, unsupported
pixel format, too small) never stop the pack: they are listed in rejected.csv with the reason. When
more than `max_reject_frac` of the images are rejected the pack fails with PackError after writing
rejected.csv, and without manifest.json, so the shards are not mistaken for a good data set.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import functools
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from bonehpc import __version__
from bonehpc.data.images import FITS, RejectedImageError, fit_square, read_gray8
from bonehpc.data.shards import (
    FORMAT_VERSION,
    INDEX_CSV,
    LOST_STUDIES_CSV,
    MANIFEST_COLUMNS,
    MANIFEST_JSON,
    REJECTED_CSV,
    SHARD_GLOB,
    VERIFIED_STAMP,
    ShardWriter,
    manifest_sha256,
    now_iso,
    sha256_file,
    shard_name,
    write_manifest_json,
)
from bonehpc.fsio import TMP_SUFFIX, atomic_write_csv, atomic_write_text, load_json_bounded

log = logging.getLogger(__name__)

PLAN_DIR = ".pack"
PLAN_JSON = "plan.json"
PLAN_MANIFEST = "manifest.csv"
DEFAULT_MIN_SIDE = 32
REJECTED_COLUMNS = ("image_id", "path", "split", "patient", "study", "body_part", "label", "reason", "detail")
LOST_COLUMNS = ("study", "split", "patient", "body_part", "label", "n_images", "reasons")

MAX_PACK_SIZE = 4096
"""Largest stored side (MURA's images are at most 512 px; 20000 px would be 400 MB per image)."""
LOCK_FILE = "lock"
_OWN_NAMES = (MANIFEST_JSON, INDEX_CSV, REJECTED_CSV, LOST_STUDIES_CSV, VERIFIED_STAMP, PLAN_DIR)
_BYTES_PER_IMAGE_EXTRA = 1024  # metadata and HDF5 chunk index per image (448-584 B measured on 64 px synthetic packs)


class PackError(RuntimeError):
    """Packing failed; `counts` holds rejected images per reason (when that is why)."""

    def __init__(self, message: str, counts: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.counts = dict(counts or {})


class PackInputError(PackError, ValueError):
    """The pack cannot start: bad settings, an output folder it must not touch, a lock held, no space."""


def check_settings(pack_size: int, images_per_shard: int, max_reject_frac: float, workers: int = 1) -> None:
    """Raise PackInputError naming the first out-of-range setting."""
    if not 0 < pack_size <= MAX_PACK_SIZE:
        raise PackInputError(f"pack_size must be in 1..{MAX_PACK_SIZE}, got {pack_size}")
    if images_per_shard <= 0:
        raise PackInputError(f"images_per_shard must be > 0, got {images_per_shard}")
    if not 0 <= max_reject_frac <= 1:
        raise PackInputError(f"max_reject_frac must be in [0, 1], got {max_reject_frac}")
    if workers < 1:
        raise PackInputError(f"workers must be >= 1, got {workers}")


def _is_tmp(name: str) -> bool:
    """A temporary file of the packer: fsio's ``.<own name>.<hex>.tmp`` or an older ``.<shard>.tmp-<pid>``."""
    if not name.startswith(".") or not (name.endswith(TMP_SUFFIX) or ".tmp-" in name):
        return False
    base = name[1:]
    return any(base.startswith(f"{own}.") for own in _OWN_NAMES) or fnmatch.fnmatch(base, f"{SHARD_GLOB}.*")


def _is_own(name: str) -> bool:
    """True for the names the packer writes in its output folder (and their temporary files)."""
    return name in _OWN_NAMES or fnmatch.fnmatch(name, SHARD_GLOB) or _is_tmp(name)


def check_out_folder(out: Path) -> None:
    """Refuse an output that is a file, or a non-empty folder that is not a bonehpc shard folder.

    A shard folder is one with ``.pack/plan.json`` (a pack started there) or whose every entry is a
    name the packer writes; the packer only ever deletes its own names, so other files there are safe.
    """
    if out.exists() and not out.is_dir():
        raise PackInputError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or (out / PLAN_DIR / PLAN_JSON).is_file():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _is_own(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise PackInputError(
            f"--out {out} is a non-empty folder that is not a bonehpc shard folder (it holds {shown}); "
            "give an empty or new folder"
        )


@contextlib.contextmanager
def pack_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` for one pack (fcntl lock on <out>/.pack/lock, naming host and pid)."""
    lock_dir = out / PLAN_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise PackInputError(
                f"{out} is being packed by {holder} (lock {path}); wait for it or give another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {now_iso()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def check_free_space(out: Path, n_images: int, pack_size: int, compression: str = "none") -> None:
    """Fail early when `out` cannot hold the pack (estimate: images x pack_size^2, uncompressed).

    Shards already in `out` count as free (a re-run keeps or replaces them).
    """
    per_image = pack_size**2 + _BYTES_PER_IMAGE_EXTRA
    need = n_images * per_image * (0.6 if compression == "lzf" else 1.0)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    reusable = sum(p.stat().st_size for p in out.glob(SHARD_GLOB) if p.is_file()) if out.is_dir() else 0
    free = _free_bytes(existing) + reusable
    if need > free:
        raise PackInputError(
            f"not enough free space for --out {out}: the pack needs about {need / 1e9:.2f} GB "
            f"({n_images} images at {pack_size} px), {free / 1e9:.2f} GB are free"
        )


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _disk_full(err: BaseException) -> bool:
    text = str(err)
    return (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        "No space left" in text or "errno = 28" in text or "Disk quota exceeded" in text
    )


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class PackSettings:
    """Everything that changes the bytes of a shard."""

    pack_size: int = 256
    fit: str = "letterbox"
    compression: str = "none"
    min_side: int = DEFAULT_MIN_SIDE

    def __post_init__(self) -> None:
        if self.pack_size <= 0:
            raise ValueError(f"pack_size must be > 0, got {self.pack_size}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")
        if self.compression not in ("none", "lzf"):
            raise ValueError(f"compression must be none or lzf, got {self.compression!r}")
        if self.min_side < 0:
            raise ValueError(f"min_side must be >= 0, got {self.min_side}")


@dataclass(frozen=True)
class ShardPlan:
    """The images (manifest positions) of one shard and the key that identifies its content."""

    index: int
    name: str
    start: int
    stop: int
    key: str


@dataclass
class PackPlan:
    """Deterministic assignment of manifest rows to shards, saved under <out>/.pack/."""

    out: Path
    root: Path
    settings: PackSettings
    images_per_shard: int
    manifest: pd.DataFrame
    manifest_sha256: str
    shards: list[ShardPlan]

    @property
    def plan_dir(self) -> Path:
        return self.out / PLAN_DIR

    def record_path(self, shard_index: int) -> Path:
        """The done-record of a shard: <out>/.pack/shard-NNNNN.json."""
        return self.plan_dir / (Path(shard_name(shard_index)).stem + ".json")

    def rows(self, shard_index: int) -> pd.DataFrame:
        s = self.shards[shard_index]
        return self.manifest.iloc[s.start : s.stop]

    def save(self) -> None:
        self.plan_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_csv(self.plan_dir / PLAN_MANIFEST, self.manifest.loc[:, list(MANIFEST_COLUMNS)])
        doc = {
            "format_version": FORMAT_VERSION,
            "root": str(self.root),
            "settings": asdict(self.settings),
            "images_per_shard": self.images_per_shard,
            "manifest_sha256": self.manifest_sha256,
            "shards": [asdict(s) for s in self.shards],
        }
        atomic_write_text(self.plan_dir / PLAN_JSON, json.dumps(doc, indent=1) + "\n")


def _shard_key(settings: PackSettings, rows: pd.DataFrame) -> str:
    import hashlib

    h = hashlib.sha256(f"bonehpc-shard-v{FORMAT_VERSION}".encode())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    h.update(rows.loc[:, list(MANIFEST_COLUMNS)].astype(str).to_csv(index=False, lineterminator="\n").encode())
    return h.hexdigest()


def _manifest_of(mura_root: str | Path, cross_split_patients: bool = False) -> pd.DataFrame:
    from bonehpc.data.mura import build_manifest

    # Missing image files are the packer's to report (rejected.csv), not a reason to stop.
    return build_manifest(mura_root, check_files=False, cross_split_patients=cross_split_patients)


def check_size_change(out: Path, pack_size: int, overwrite: bool = False, **others: Any) -> None:
    """Refuse to pack into a shard folder packed with other PackSettings (pack_size, and the `others` given:
    fit, compression, min_side) unless `overwrite`: every shard would be replaced, and experiments that use
    the folder would silently get other images."""
    new = {"pack_size": pack_size, **others}
    for path in (out / PLAN_DIR / PLAN_JSON, out / MANIFEST_JSON):
        try:
            doc = load_json_bounded(path)
        except (OSError, ValueError):
            continue
        old = (doc.get("settings") or doc) if isinstance(doc, dict) else None
        if isinstance(old, dict) and old.get("pack_size") is not None:
            break
    else:
        return
    changed = [k for k, v in new.items() if old.get(k) is not None and old[k] != v]
    if changed and not overwrite:
        k = changed[0]
        was = f"at pack_size {old[k]}, not {new[k]}" if k == "pack_size" else f"with {k} {old[k]!r}, not {new[k]!r}"
        raise PackInputError(
            f"--out {out} holds images packed {was}: every shard would be "
            "replaced; pass --overwrite to repack it, or give another folder"
        )


def plan_pack(
    mura_root: str | Path,
    out: str | Path,
    *,
    manifest: pd.DataFrame | None = None,
    pack_size: int = 256,
    fit: str = "letterbox",
    compression: str = "none",
    images_per_shard: int = 2048,
    min_side: int = DEFAULT_MIN_SIDE,
    check: bool = True,
    cross_split_patients: bool = False,
    overwrite: bool = False,
) -> PackPlan:
    """Assign manifest rows to shards (in manifest order), prepare `out` and save the plan there.

    Removes what could make an unfinished pack look finished (manifest.json, index.csv, the verify
    stamp), temporary files of killed runs and shards beyond the new shard count. Complete shards
    stay; `pack_shard` decides whether they still match. A given `manifest` is checked like the CSVs
    (check_manifest) unless `check` is false (the caller did it), and so is a pack_size change
    (check_size_change; `overwrite` allows it); `cross_split_patients` as in build_manifest.
    """
    from bonehpc.data.mura import check_manifest, locate

    check_settings(pack_size, images_per_shard, 0.0)
    settings = PackSettings(pack_size=pack_size, fit=fit, compression=compression, min_side=min_side)
    out_dir = Path(out).resolve()
    check_out_folder(out_dir)
    if check:
        check_size_change(out_dir, pack_size, overwrite, fit=fit, compression=compression, min_side=min_side)
    root = locate(mura_root).resolve()
    df = _manifest_of(root, cross_split_patients) if manifest is None else manifest
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise PackInputError(f"manifest lacks columns {missing}")
    if df.empty:
        raise PackInputError(f"the manifest of {root} lists no images")
    if manifest is not None and check:
        check_manifest(
            df, "the given manifest", cross_split_patients
        )  # paths inside the root, split, labels: as from the CSVs
    if check:
        check_free_space(out_dir, len(df), pack_size, compression)
    df = df.loc[:, list(MANIFEST_COLUMNS)].reset_index(drop=True)
    n_shards = -(-len(df) // images_per_shard)
    shards = []
    for k in range(n_shards):
        start, stop = k * images_per_shard, min(len(df), (k + 1) * images_per_shard)
        shards.append(ShardPlan(k, shard_name(k), start, stop, _shard_key(settings, df.iloc[start:stop])))
    plan = PackPlan(out_dir, root, settings, images_per_shard, df, manifest_sha256(df), shards)

    plan.out.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_JSON, INDEX_CSV, VERIFIED_STAMP):
        (plan.out / name).unlink(missing_ok=True)
    for tmp in plan.out.iterdir():  # temporary files of killed runs (only the packer's own names)
        if _is_tmp(tmp.name) and tmp.is_file():
            tmp.unlink(missing_ok=True)
    wanted = {s.name for s in shards}
    for old in plan.out.glob(SHARD_GLOB):
        if old.name not in wanted:
            log.info("removing %s (not part of the new plan)", old.name)
            old.unlink()
    if plan.plan_dir.is_dir():
        for rec in plan.plan_dir.glob("shard-*.json"):
            if rec.stem + ".h5" not in wanted:
                rec.unlink()
    plan.save()
    return plan


def load_plan(out: str | Path) -> PackPlan:
    """The plan saved by plan_pack in `out` (for array tasks that each pack some shards)."""
    o = Path(out).resolve()
    pdir = o / PLAN_DIR
    try:
        doc = json.loads((pdir / PLAN_JSON).read_text())
    except (OSError, ValueError) as err:
        raise PackError(f"{pdir / PLAN_JSON}: no readable pack plan ({err}); run plan_pack first") from err
    from bonehpc.data.mura import read_manifest

    df = read_manifest(pdir / PLAN_MANIFEST).loc[:, list(MANIFEST_COLUMNS)]
    plan = PackPlan(
        out=o,
        root=Path(doc["root"]),
        settings=PackSettings(**doc["settings"]),
        images_per_shard=int(doc["images_per_shard"]),
        manifest=df,
        manifest_sha256=doc["manifest_sha256"],
        shards=[ShardPlan(**s) for s in doc["shards"]],
    )
    if manifest_sha256(df) != plan.manifest_sha256:
        raise PackError(f"{pdir}: the saved manifest does not match the plan's hash")
    return plan


# ----------------------------------------------------------------------------------------------
# One shard


@dataclass
class ShardResult:
    """What pack_shard did with one shard."""

    name: str
    planned: int
    packed: int
    rejected: list[dict[str, Any]]
    skipped: bool
    bytes: int
    sha256: str
    elapsed_s: float


def _valid_record(plan: PackPlan, k: int) -> dict[str, Any] | None:
    """The done-record of shard k when it and the shard file match the plan; None otherwise."""
    s = plan.shards[k]
    rec_path, shard_path = plan.record_path(k), plan.out / s.name
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("plan_key") != s.key:
        return None
    if not rec.get("rows"):  # every image of the shard was rejected: there is no file to match
        return None if shard_path.exists() else rec
    if not shard_path.is_file() or shard_path.stat().st_size != rec.get("bytes"):
        return None
    return rec


def pack_shard(plan: PackPlan, shard_index: int, *, check_hash: bool = True) -> ShardResult:
    """Pack shard `shard_index` of `plan` (skip it when the file on disk already matches the plan).

    Args:
        plan: from plan_pack / load_plan.
        shard_index: which shard.
        check_hash: before skipping an existing shard, compare its SHA-256 with its done-record.

    Returns:
        ShardResult (skipped=True when the existing shard was kept).
    """
    t0 = time.perf_counter()
    s = plan.shards[shard_index]
    rec = _valid_record(plan, shard_index)
    if rec is not None and (not check_hash or not rec["rows"] or sha256_file(plan.out / s.name) == rec["sha256"]):
        return ShardResult(
            s.name, s.stop - s.start, len(rec["rows"]), rec["rejected"], True, rec["bytes"], rec["sha256"], 0.0
        )
    plan.record_path(shard_index).unlink(missing_ok=True)
    rows = plan.rows(shard_index)
    st = plan.settings
    packed: list[list[int]] = []
    rejected: list[dict[str, Any]] = []
    with ShardWriter(
        plan.out / s.name,
        pack_size=st.pack_size,
        capacity=len(rows),
        fit=st.fit,
        compression=st.compression,
        source_manifest_sha256=plan.manifest_sha256,
        plan_key=s.key,
    ) as writer:
        for r in rows.itertuples(index=False):
            try:
                gray = read_gray8(plan.root / str(r.path), st.min_side, root=plan.root)
            except RejectedImageError as rej:
                rejected.append({"image_id": int(r.image_id), "reason": rej.reason, "detail": rej.detail})
                continue
            h, w = gray.shape
            meta = {**r._asdict(), "orig_h": h, "orig_w": w}
            writer.add(fit_square(gray, st.pack_size, st.fit), meta)
            packed.append([int(r.image_id), h, w])
        if not packed:
            writer.abort()
            info = None
        else:
            info = writer.close()
    if info is None:
        (plan.out / s.name).unlink(missing_ok=True)
    record: dict[str, Any] = {
        "name": s.name,
        "plan_key": s.key,
        "bytes": info.bytes if info else 0,
        "sha256": info.sha256 if info else "",
        "rows": packed,
        "rejected": rejected,
        "written_at": now_iso(),
    }
    plan.plan_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.record_path(shard_index), json.dumps(record) + "\n")
    return ShardResult(
        s.name,
        len(rows),
        len(packed),
        rejected,
        False,
        record["bytes"],
        record["sha256"],
        time.perf_counter() - t0,
    )


@contextlib.contextmanager
def _one_cv2_thread() -> Iterator[None]:
    """OpenCV single-threaded for the block, as in pool workers (restored after).

    Packing is parallel over processes; OpenCV's pool threads, which keep spinning a while after each
    resize, only take CPU from the decoding thread (decoding inside the pack ran ~10-30 % slower here).
    """
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(prev)


def _worker_init() -> None:
    # Parallelism comes from processes; OpenCV's own threads would only compete with them.
    cv2.setNumThreads(1)


@functools.lru_cache(maxsize=4)
def _cached_plan(out: str, stamp: float) -> PackPlan:
    return load_plan(out)


def _pack_shard_task(out: str, shard_index: int) -> ShardResult:
    plan_file = Path(out) / PLAN_DIR / PLAN_JSON
    return pack_shard(_cached_plan(out, plan_file.stat().st_mtime), shard_index)


def _pool(workers: int) -> ProcessPoolExecutor:
    # Not fork: a child forked after OpenCV has run its thread pool in the parent can hang in its first
    # parallel cv2 call (seen here: a pack with workers=2 after an in-process decode). The fork server
    # preloads this module, so each worker starts without re-importing cv2, h5py and pandas.
    ctx: Any
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)


# ----------------------------------------------------------------------------------------------
# Finishing


@dataclass
class PackSummary:
    """Outcome of a pack."""

    out: str
    n_planned: int
    n_packed: int
    n_rejected: int
    rejected_by_reason: dict[str, int]
    lost_studies: list[str]
    n_shards: int
    shards_written: int = 0
    shards_skipped: int = 0
    bytes: int = 0
    elapsed_s: float = 0.0
    img_per_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [
            f"packed {self.n_packed}/{self.n_planned} images into {self.n_shards} shards "
            f"({self.shards_written} written, {self.shards_skipped} kept) at {self.out}, "
            f"{self.bytes / 1e6:.1f} MB in {self.elapsed_s:.1f} s ({self.img_per_s:.0f} img/s)"
        ]
        if self.n_rejected:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected_by_reason.items()))
            out.append(f"rejected {self.n_rejected} images ({reasons}); see {Path(self.out) / REJECTED_CSV}")
        if self.lost_studies:
            shown = ", ".join(self.lost_studies[:5]) + (" ..." if len(self.lost_studies) > 5 else "")
            out.append(
                f"{len(self.lost_studies)} studies lost every image: {shown}; see {Path(self.out) / LOST_STUDIES_CSV}"
            )
        return out


def finalize_pack(plan: PackPlan, *, max_reject_frac: float = 0.01, elapsed_s: float = 0.0) -> PackSummary:
    """Write rejected.csv, lost_studies.csv, index.csv and manifest.json once every shard is packed.

    Raises:
        PackError: when a shard has not been packed (names it), or more than `max_reject_frac` of the
            images were rejected, or none could be packed (after rejected.csv and lost_studies.csv are
            written; no manifest.json).
    """
    records: list[dict[str, Any]] = []
    not_done = []
    for k, s in enumerate(plan.shards):
        rec = _valid_record(plan, k)
        if rec is None:
            not_done.append(s.name)
        else:
            records.append(rec)
    if not_done:
        raise PackError(f"{len(not_done)} shards are not packed (or stale): {', '.join(not_done[:10])}")

    m = plan.manifest.set_index("image_id", drop=False)
    rej_df = _rejected_table(m, [r for rec in records for r in rec["rejected"]])
    atomic_write_csv(plan.out / REJECTED_CSV, rej_df)
    packed_ids = [row[0] for rec in records for row in rec["rows"]]
    lost_df = _lost_studies(plan.manifest, set(m.loc[packed_ids, "study"]), rej_df)
    atomic_write_csv(plan.out / LOST_STUDIES_CSV, lost_df)

    counts = dict(Counter(rej_df["reason"]))
    n_total = len(plan.manifest)
    summary = PackSummary(
        out=str(plan.out),
        n_planned=n_total,
        n_packed=len(packed_ids),
        n_rejected=len(rej_df),
        rejected_by_reason=counts,
        lost_studies=list(lost_df["study"]),
        n_shards=sum(1 for rec in records if rec["rows"]),
        bytes=sum(int(rec["bytes"]) for rec in records),
        elapsed_s=elapsed_s,
    )
    frac = len(rej_df) / n_total
    if frac > max_reject_frac or not packed_ids:
        by_reason = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        raise PackError(
            f"{len(rej_df)} of {n_total} images rejected ({frac:.2%} > max_reject_frac={max_reject_frac:.2%}): "
            f"{by_reason}; every one is listed in {plan.out / REJECTED_CSV}. Fix the data or raise max_reject_frac."
            if packed_ids
            else f"none of the {n_total} images could be packed ({by_reason}); see {plan.out / REJECTED_CSV}",
            counts,
        )
    _write_index_and_manifest(plan, m, records, summary, len(lost_df))
    return summary


def _rejected_table(m: pd.DataFrame, rejected: list[dict[str, Any]]) -> pd.DataFrame:
    """rejected.csv: the manifest columns of each rejected image with its reason and detail."""
    cols = ["image_id", "path", "split", "patient", "study", "body_part", "label"]
    df = m.loc[[r["image_id"] for r in rejected], cols].reset_index(drop=True)
    df["reason"] = [r["reason"] for r in rejected]
    df["detail"] = [r["detail"] for r in rejected]
    return df.loc[:, list(REJECTED_COLUMNS)]


def _lost_studies(manifest: pd.DataFrame, kept_studies: set[str], rej_df: pd.DataFrame) -> pd.DataFrame:
    """lost_studies.csv: studies none of whose images made it into the shards, with the reasons."""
    lost = []
    for study, g in manifest.groupby("study", sort=False):
        if study in kept_studies:
            continue
        reasons = Counter(rej_df.loc[rej_df["study"] == study, "reason"])
        first = g.iloc[0]
        lost.append(
            {
                "study": study,
                "split": first["split"],
                "patient": first["patient"],
                "body_part": first["body_part"],
                "label": int(first["label"]),
                "n_images": len(g),
                "reasons": ";".join(f"{k}={v}" for k, v in sorted(reasons.items())),
            }
        )
    return pd.DataFrame(lost, columns=list(LOST_COLUMNS))


def _write_index_and_manifest(
    plan: PackPlan, m: pd.DataFrame, records: list[dict[str, Any]], summary: PackSummary, n_lost: int
) -> None:
    """index.csv (manifest columns + where each image is; shard rows in write order), then manifest.json."""
    parts = []
    shard_entries = []
    for rec in records:
        if not rec["rows"]:
            continue
        rows = np.asarray(rec["rows"], dtype=np.int64).reshape(-1, 3)
        part = m.loc[rows[:, 0], list(MANIFEST_COLUMNS)].reset_index(drop=True)
        part["shard"] = rec["name"]
        part["row"] = np.arange(len(rows))
        part["orig_h"] = rows[:, 1]
        part["orig_w"] = rows[:, 2]
        parts.append(part)
        shard_entries.append(
            {"name": rec["name"], "n_images": len(rows), "bytes": int(rec["bytes"]), "sha256": rec["sha256"]}
        )
    index = pd.concat(parts, ignore_index=True)
    atomic_write_csv(plan.out / INDEX_CSV, index)
    st = plan.settings
    write_manifest_json(
        plan.out,
        {
            "format_version": FORMAT_VERSION,
            "bonehpc_version": __version__,
            "created": now_iso(),
            "pack_size": st.pack_size,
            "fit": st.fit,
            "compression": st.compression,
            "min_side": st.min_side,
            "images_per_shard": plan.images_per_shard,
            "mura_root": str(plan.root),
            "source_manifest_sha256": plan.manifest_sha256,
            "index_sha256": sha256_file(plan.out / INDEX_CSV),
            "n_images": len(index),
            "n_planned": summary.n_planned,
            "n_rejected": summary.n_rejected,
            "rejected_by_reason": summary.rejected_by_reason,
            "n_lost_studies": n_lost,
            "synthetic": _synthetic_summary(plan.root),
            "shards": shard_entries,
        },
    )


def _synthetic_summary(root: Path) -> dict[str, Any] | None:
    """What manifest.json records of a synthetic data set's marker (None for real data)."""
    from bonehpc.data.synthetic import SYNTHETIC_MARKER, read_marker

    marker = read_marker(root)
    if marker is None:
        return None
    keep = ("generator", "bonehpc_version", "patients", "seed", "bad_frac", "n_images")
    return {
        **{k: marker[k] for k in keep if k in marker},
        "n_bad_files": len(marker.get("bad_files", [])),
        "marker": f"MURA-v1.1/{SYNTHETIC_MARKER}",
    }


# ----------------------------------------------------------------------------------------------
# The whole pack


def _fmt_eta(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _run_shards(
    plan: PackPlan, indices: Sequence[int], workers: int, on_done: Callable[[ShardResult], None]
) -> list[ShardResult]:
    results: list[ShardResult] = []
    if workers <= 1 or len(indices) <= 1:
        with _one_cv2_thread():
            for k in indices:
                res = pack_shard(plan, k)
                results.append(res)
                on_done(res)
        return results
    with _pool(min(workers, len(indices))) as pool:
        futures: dict[Future[ShardResult], int] = {pool.submit(_pack_shard_task, str(plan.out), k): k for k in indices}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                err = fut.exception()
                if err is not None:
                    for p in pending:
                        p.cancel()
                    raise PackError(f"packing {plan.shards[futures[fut]].name} failed: {err}") from err
                res = fut.result()
                results.append(res)
                on_done(res)
    return results


def _progress(plan: PackPlan, level: int) -> Callable[[ShardResult], None]:
    """A callback that logs one line per finished shard (img/s of the shards written, ETA)."""
    state = {"done": 0, "work_images": 0, "todo": len(plan.manifest)}
    t_work = time.perf_counter()

    def on_done(res: ShardResult) -> None:
        state["done"] += 1
        if res.skipped:
            state["todo"] -= res.planned
        else:
            state["work_images"] += res.planned
        elapsed = time.perf_counter() - t_work
        rate = state["work_images"] / elapsed if elapsed > 0 else 0.0
        left = state["todo"] - state["work_images"]
        eta = _fmt_eta(left / rate) if rate > 0 else "?"
        what = "kept (complete and unchanged)" if res.skipped else f"written in {res.elapsed_s:.1f} s"
        log.log(
            level,
            "shard %s %s: %d/%d images, %d rejected | %d/%d shards | %.0f img/s | ETA %s",
            res.name,
            what,
            res.packed,
            res.planned,
            len(res.rejected),
            state["done"],
            len(plan.shards),
            rate,
            eta,
        )

    return on_done


def _open_out(out: str | Path) -> Path:
    """The resolved output folder, created; PackInputError when it is a file, foreign or not writable."""
    out_dir = Path(out).resolve()
    check_out_folder(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / PLAN_DIR).mkdir(exist_ok=True)
    except OSError as err:
        raise PackInputError(f"cannot write in --out {out_dir}: {err.strerror or err}") from None
    return out_dir


def pack_dataset(
    mura_root: str | Path,
    out: str | Path,
    *,
    manifest: pd.DataFrame | None = None,
    pack_size: int = 256,
    fit: str = "letterbox",
    compression: str = "none",
    images_per_shard: int = 2048,
    workers: int = 1,
    max_reject_frac: float = 0.01,
    min_side: int = DEFAULT_MIN_SIDE,
    progress: bool = True,
    cross_split_patients: bool = False,
    overwrite: bool = False,
) -> PackSummary:
    """Pack a MURA-layout data set into HDF5 shards under `out` (resumable; see the module docstring).

    Args:
        mura_root: folder that contains MURA-v1.1/ (or MURA-v1.1 itself).
        out: shard folder (created; an existing one must be empty or a bonehpc shard folder).
        manifest: manifest DataFrame (checked like the CSVs); default: build_manifest(mura_root).
        pack_size: side of the stored square images (1..MAX_PACK_SIZE).
        fit: letterbox (keep aspect, pad with 0) or stretch.
        compression: none or lzf.
        images_per_shard: images per shard file.
        workers: processes, one shard per task (started with forkserver: a script that calls this with
            workers > 1 needs the usual ``if __name__ == "__main__":`` guard).
        max_reject_frac: fail (PackError) when more than this fraction of images is rejected.
        min_side: reject images whose shorter side is below this many pixels.
        progress: log a line per finished shard (img/s, ETA); otherwise only at debug level.
        cross_split_patients: accept a patient number in both splits (refused by default: a holdout leak).
        overwrite: repack an `out` that was packed at another pack_size (refused by default).

    Returns:
        PackSummary.

    Raises:
        PackInputError: bad settings, a foreign or unwritable --out, a lock held by another pack, or
            too little free space (checked before any shard is written).
        PackError: too many rejected images (rejected.csv is written), the disk filled up, or a shard
            failed to write. Complete shards stay, so a re-run continues.
    """
    t0 = time.perf_counter()
    check_settings(pack_size, images_per_shard, max_reject_frac, workers)
    settings = {
        "pack_size": pack_size,
        "fit": fit,
        "compression": compression,
        "images_per_shard": images_per_shard,
        "min_side": min_side,
    }
    # Everything that can be refused is checked before the first byte is written or removed.
    from bonehpc.data.mura import check_manifest, locate

    root = locate(mura_root).resolve()
    if manifest is None:
        manifest = _manifest_of(root, cross_split_patients)
    else:
        check_manifest(manifest, "the given manifest", cross_split_patients)
    check_out_folder(Path(out).resolve())
    check_size_change(Path(out).resolve(), pack_size, overwrite, fit=fit, compression=compression, min_side=min_side)
    check_free_space(Path(out).resolve(), len(manifest), pack_size, compression)
    out_dir = _open_out(out)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(pack_lock(out_dir))
        except OSError as err:
            raise PackInputError(f"cannot write in --out {out_dir}: {err.strerror or err}") from None
        return _pack_locked(root, out_dir, manifest, workers, max_reject_frac, progress, t0, **settings)
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns or raises


def _pack_locked(
    root: Path,
    out_dir: Path,
    manifest: pd.DataFrame,
    workers: int,
    max_reject_frac: float,
    progress: bool,
    t0: float,
    **settings: Any,
) -> PackSummary:
    try:
        plan = plan_pack(root, out_dir, manifest=manifest, check=False, **settings)
        return _pack_planned(plan, workers, max_reject_frac, progress, t0)
    except (OSError, PackError) as err:
        if not _disk_full(err):
            raise
        raise PackError(
            f"disk full while packing into {out_dir}; complete shards are kept: free space and re-run"
        ) from err


def _pack_planned(plan: PackPlan, workers: int, max_reject_frac: float, progress: bool, t0: float) -> PackSummary:
    level = logging.INFO if progress else logging.DEBUG
    st = plan.settings
    log.log(
        level,
        "packing %d images from %s into %d shards of <= %d at %dpx (%s, %s) with %d worker(s) -> %s",
        len(plan.manifest),
        plan.root,
        len(plan.shards),
        plan.images_per_shard,
        st.pack_size,
        st.fit,
        st.compression,
        workers,
        plan.out,
    )
    t_work = time.perf_counter()
    results = _run_shards(plan, range(len(plan.shards)), workers, _progress(plan, level))
    work_s = time.perf_counter() - t_work
    summary = finalize_pack(plan, max_reject_frac=max_reject_frac, elapsed_s=time.perf_counter() - t0)
    summary.shards_written = sum(not r.skipped for r in results)
    summary.shards_skipped = sum(r.skipped for r in results)
    summary.elapsed_s = time.perf_counter() - t0
    written = sum(r.planned for r in results if not r.skipped)
    summary.img_per_s = written / work_s if work_s > 0 and written else 0.0
    for line in summary.lines():
        log.log(level, "%s", line)
    return summary
