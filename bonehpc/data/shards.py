"""The HDF5 shard format: the one schema module that the packer (writer) and the loaders (reader) share.

A packed data set is a folder::

    shard-00000.h5 ...   images uint8 [N, S, S] (one chunk per image) + per-image metadata datasets
    index.csv            one row per packed image: manifest columns + shard, row, orig_h, orig_w
    manifest.json        format version, pack settings, shards (count, bytes, SHA-256), source manifest hash
    rejected.csv         images the packer could not use (path, study, reason) - written by bonehpc.data.pack
    lost_studies.csv     studies none of whose images could be packed - written by bonehpc.data.pack
    .verified            stamp of the last successful full verification (sizes + mtimes), makes re-checks cheap

Every file is written under a temporary name and moved into place with ``os.replace`` after an fsync
(bonehpc.fsio), so a file with a final name is always complete. manifest.json carries
``content_sha256``, the SHA-256 of its own other keys (which hold every shard's SHA-256 and the
index's), so a full check covers every file of the folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from bonehpc.data.images import FITS
from bonehpc.fsio import atomic_write_text, fsync_dir, read_bytes_bounded, tmp_name_for

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGES = "images"
MANIFEST_JSON = "manifest.json"
INDEX_CSV = "index.csv"
REJECTED_CSV = "rejected.csv"
LOST_STUDIES_CSV = "lost_studies.csv"
VERIFIED_STAMP = ".verified"
SHARD_GLOB = "shard-*.h5"
CONTENT_SHA256 = "content_sha256"
COMPRESSIONS = ("none", "lzf")

# Per-image metadata stored next to the images in every shard: name -> numpy dtype (str: UTF-8 strings).
META_DTYPES: dict[str, Any] = {
    "image_id": np.int64,
    "path": str,
    "split": str,
    "patient": str,
    "study": str,
    "body_part": str,
    "view": np.int32,
    "label": np.int8,
    "orig_h": np.int32,
    "orig_w": np.int32,
}
# The manifest columns every packed image carries (the contract of bonehpc.data.mura.build_manifest).
MANIFEST_COLUMNS = ("image_id", "path", "split", "body_part", "patient", "study", "view", "label")
INDEX_COLUMNS = (*MANIFEST_COLUMNS, "shard", "row", "orig_h", "orig_w")
FILE_ATTRS = (
    "format_version",
    "pack_size",
    "fit",
    "compression",
    "source_manifest_sha256",
    "n_images",
    "plan_key",
)

_STR_DTYPE = h5py.string_dtype(encoding="utf-8")
_HASH_BLOCK = 8 << 20


class ShardError(ValueError):
    """A shard folder is missing, incomplete or corrupt; the message names the file and the problem."""


def shard_name(index: int) -> str:
    """File name of shard number `index`: shard-00000.h5."""
    return f"shard-{index:05d}.h5"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def manifest_sha256(manifest: pd.DataFrame) -> str:
    """Hash of the manifest columns of a manifest DataFrame (independent of extra columns and dtypes)."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}")
    text = manifest.loc[:, list(MANIFEST_COLUMNS)].astype(str).to_csv(index=False, lineterminator="\n")
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard file."""

    name: str
    n_images: int
    bytes: int
    sha256: str


class ShardWriter:
    """Writes one shard file; the file appears under its final name only when `close()` succeeds.

    Images are buffered in blocks and written a block at a time (one HDF5 chunk per image, so random
    reads touch exactly one chunk). Use as a context manager: leaving the block with an exception
    deletes the temporary file.

    Args:
        path: final path of the shard (shard-NNNNN.h5).
        pack_size: side S of the square uint8 images.
        capacity: most images this shard will hold (the dataset is trimmed to the real count on close).
        fit: letterbox or stretch (recorded; the caller has already made the image square).
        compression: none or lzf.
        source_manifest_sha256: hash of the manifest the images come from.
        plan_key: hash of this shard's image list and settings (lets a re-run of the packer skip it).
        block: images per HDF5 write.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        pack_size: int,
        capacity: int,
        fit: str = "letterbox",
        compression: str = "none",
        source_manifest_sha256: str = "",
        plan_key: str = "",
        block: int = 64,
    ) -> None:
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if pack_size <= 0 or capacity <= 0:
            raise ValueError(f"pack_size and capacity must be > 0, got {pack_size}, {capacity}")
        self.path = Path(path)
        self.tmp_path = tmp_name_for(self.path)
        self.pack_size = pack_size
        self.capacity = capacity
        self.fit = fit
        self.compression = compression
        self.source_manifest_sha256 = source_manifest_sha256
        self.plan_key = plan_key
        self._block = np.zeros((max(1, min(block, capacity)), pack_size, pack_size), np.uint8)
        self._in_block = 0
        self._n = 0
        self._meta: dict[str, list[Any]] = {k: [] for k in META_DTYPES}
        self._file: h5py.File | None = h5py.File(self.tmp_path, "w")
        self._images = self._file.create_dataset(
            IMAGES,
            shape=(capacity, pack_size, pack_size),
            maxshape=(None, pack_size, pack_size),
            dtype=np.uint8,
            chunks=(1, pack_size, pack_size),
            compression=None if compression == "none" else compression,
        )

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()

    def __len__(self) -> int:
        return self._n

    def add(self, image: np.ndarray, meta: Mapping[str, Any]) -> int:
        """Append one image (uint8 [S, S]) with its metadata; returns its row in the shard."""
        if self._file is None:
            raise ShardError(f"{self.path.name}: writer is closed")
        if image.dtype != np.uint8 or image.shape != (self.pack_size, self.pack_size):
            raise ValueError(f"image must be uint8 {(self.pack_size,) * 2}, got {image.dtype} {image.shape}")
        if self._n >= self.capacity:
            raise ShardError(f"{self.path.name}: more than capacity={self.capacity} images")
        missing = [k for k in META_DTYPES if k not in meta]
        if missing:
            raise ValueError(f"metadata lacks {missing}")
        self._block[self._in_block] = image
        self._in_block += 1
        for k in META_DTYPES:
            self._meta[k].append(meta[k])
        row = self._n
        self._n += 1
        if self._in_block == len(self._block):
            self._flush_block()
        return row

    def _flush_block(self) -> None:
        if self._in_block:
            start = self._n - self._in_block
            self._images[start : self._n] = self._block[: self._in_block]
            self._in_block = 0

    def close(self) -> ShardInfo:
        """Write metadata and attributes, fsync, move the file into place; returns its ShardInfo."""
        if self._file is None:
            raise ShardError(f"{self.path.name}: writer is already closed")
        try:
            self._flush_block()
            f = self._file
            self._images.resize(self._n, axis=0)
            for k, dtype in META_DTYPES.items():
                if dtype is str:
                    f.create_dataset(k, data=np.array([str(v) for v in self._meta[k]], dtype=object), dtype=_STR_DTYPE)
                else:
                    f.create_dataset(k, data=np.asarray(self._meta[k], dtype=dtype).reshape(-1))
            f.attrs.update(
                {
                    "format_version": FORMAT_VERSION,
                    "pack_size": self.pack_size,
                    "fit": self.fit,
                    "compression": self.compression,
                    "source_manifest_sha256": self.source_manifest_sha256,
                    "n_images": self._n,
                    "plan_key": self.plan_key,
                }
            )
            f.close()
            self._file = None
            with open(self.tmp_path, "rb+") as raw:
                os.fsync(raw.fileno())
            digest = sha256_file(self.tmp_path)
            size = self.tmp_path.stat().st_size
            os.replace(self.tmp_path, self.path)
            fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        return ShardInfo(self.path.name, self._n, size, digest)

    def abort(self) -> None:
        """Drop the temporary file (nothing with the final name is created)."""
        if self._file is not None:
            with contextlib.suppress(Exception):  # best effort while already failing
                self._file.close()
            self._file = None
        self.tmp_path.unlink(missing_ok=True)


def manifest_content_sha256(info: Mapping[str, Any]) -> str:
    """SHA-256 of manifest.json's keys other than content_sha256 (canonical JSON: sorted keys, no spaces)."""
    body = {k: v for k, v in info.items() if k != CONTENT_SHA256}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest_json(shards_dir: str | Path, info: Mapping[str, Any]) -> Path:
    """Write manifest.json atomically (keys sorted, human-readable), signed with its content_sha256."""
    doc = {**info, CONTENT_SHA256: manifest_content_sha256(info)}
    return atomic_write_text(Path(shards_dir) / MANIFEST_JSON, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def now_iso() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# Reading


def load_manifest_json(shards_dir: str | Path) -> dict[str, Any]:
    """manifest.json of a shard folder, with the format version checked."""
    d = Path(shards_dir)
    p = d / MANIFEST_JSON
    if not d.is_dir():
        raise ShardError(f"{d}: shard folder does not exist (run `bonehpc pack` first)")
    if not p.is_file():
        raise ShardError(f"{p}: missing - the pack did not finish (or failed; see {REJECTED_CSV} there)")
    try:
        info = json.loads(read_bytes_bounded(p))
    except (OSError, ValueError, RecursionError) as err:
        raise ShardError(f"{p}: not readable JSON ({err})") from err
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        found = info.get("format_version") if isinstance(info, dict) else None
        raise ShardError(f"{p}: format_version {found!r}, this bonehpc reads {FORMAT_VERSION}")
    for key in ("pack_size", "shards", "n_images"):
        if key not in info:
            raise ShardError(f"{p}: lacks {key!r}")
    return info


def _read_index(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(
            io.BytesIO(read_bytes_bounded(path)),
            dtype={"path": str, "study": str, "patient": str, "shard": str, "body_part": str},
        )
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: not readable ({err})") from err
    missing = [c for c in INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise ShardError(f"{path}: lacks columns {missing}")
    return df


class ShardReader:
    """Random access to packed images; picklable, with HDF5 files opened lazily in the reading process.

    File handles are kept per process: the reader remembers the pid that opened them and reopens
    after a fork; pickling (spawn, DataLoader / DALI workers) drops them. So one reader object can be
    handed to torch DataLoader workers and DALI parallel external_source workers, started either way.

    Args:
        shards_dir: folder written by `bonehpc pack`.
    """

    def __init__(self, shards_dir: str | Path) -> None:
        self.shards_dir = Path(shards_dir)
        self.info = load_manifest_json(self.shards_dir)
        self.pack_size: int = int(self.info["pack_size"])
        self.index: pd.DataFrame = _read_index(self.shards_dir / INDEX_CSV)
        self.shard_names: list[str] = [s["name"] for s in self.info["shards"]]
        code_of = {n: i for i, n in enumerate(self.shard_names)}
        unknown = set(self.index["shard"]) - set(code_of)
        if unknown:
            raise ShardError(f"{self.shards_dir / INDEX_CSV}: names shards not in manifest.json: {sorted(unknown)[:5]}")
        ids = self.index["image_id"].to_numpy(np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ShardError(f"{self.shards_dir / INDEX_CSV}: image_id values repeat")
        self._shard_code = self.index["shard"].map(code_of).to_numpy(np.int32)
        self._row = self.index["row"].to_numpy(np.int64)
        self._pos = pd.Series(np.arange(len(ids)), index=ids)
        self._handles: dict[int, h5py.Dataset] = {}
        self._files: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"ShardReader({str(self.shards_dir)!r}, images={len(self)}, pack_size={self.pack_size})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        state["_files"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the HDF5 files this process opened."""
        if getattr(self, "_pid", None) == os.getpid():
            for f in getattr(self, "_files", {}).values():
                with contextlib.suppress(Exception):  # may run during interpreter shutdown
                    f.close()
        self._files = {}
        self._handles = {}

    @property
    def image_ids(self) -> np.ndarray:
        """image_id of every packed image, in index order."""
        return self.index["image_id"].to_numpy(np.int64)

    def _dataset(self, code: int) -> h5py.Dataset:
        if self._pid != os.getpid():
            # Inherited over fork: the parent's HDF5 handles must not be used here; forget, don't close.
            self._files, self._handles, self._pid = {}, {}, os.getpid()
        ds = self._handles.get(code)
        if ds is None:
            path = self.shards_dir / self.shard_names[code]
            try:
                f = h5py.File(path, "r")
            except OSError as err:
                raise ShardError(f"{path}: cannot open ({err})") from err
            self._files[code] = f
            ds = self._handles[code] = f[IMAGES]
        return ds

    def read_row(self, shard: str | int, row: int) -> np.ndarray:
        """Image at `row` of `shard` (file name or position in manifest.json): uint8 [S, S]."""
        code = shard if isinstance(shard, int) else self.shard_names.index(shard)
        return np.asarray(self._dataset(code)[row])

    def position(self, image_id: int) -> int:
        """Row of `image_id` in `index`."""
        try:
            return int(self._pos[image_id])
        except KeyError:
            raise KeyError(
                f"image_id {image_id} is not in {self.shards_dir} (rejected or not in the manifest)"
            ) from None

    def read(self, image_id: int) -> np.ndarray:
        """Image `image_id`: uint8 [S, S]."""
        i = self.position(image_id)
        return np.asarray(self._dataset(int(self._shard_code[i]))[self._row[i]])

    def read_many(self, image_ids: Iterable[int]) -> np.ndarray:
        """Images of `image_ids` stacked: uint8 [N, S, S]."""
        ids = list(image_ids)
        out = np.empty((len(ids), self.pack_size, self.pack_size), np.uint8)
        for k, image_id in enumerate(ids):
            out[k] = self.read(image_id)
        return out

    def label(self, image_id: int) -> int:
        """Label (0 normal, 1 abnormal) of `image_id`."""
        return int(self.index["label"].iat[self.position(image_id)])


# ----------------------------------------------------------------------------------------------
# Verification


@dataclass
class VerifyReport:
    """Result of a successful verify_shards."""

    shards_dir: str
    n_shards: int
    n_images: int
    bytes: int
    full: bool
    cached: bool = False
    elapsed_s: float = 0.0
    pack_size: int = 0
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """One line for logs and the CLI."""
        how = "full (SHA-256" + (", cached stamp)" if self.cached else ")") if self.full else "quick"
        return (
            f"OK {self.shards_dir}: {self.n_shards} shards, {self.n_images} images at {self.pack_size}px, "
            f"{self.bytes / 1e6:.1f} MB, {how} check in {self.elapsed_s:.2f} s"
        )


def _stamp_key(d: Path, names: list[str]) -> dict[str, list[int]]:
    key = {}
    for n in [MANIFEST_JSON, INDEX_CSV, *names]:
        st = (d / n).stat()
        key[n] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return key


def _check_shard(path: Path, entry: Mapping[str, Any], info: Mapping[str, Any], idx: pd.DataFrame) -> None:
    name = path.name
    n = int(entry["n_images"])
    s = int(info["pack_size"])
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ShardError(f"{name}: not a readable HDF5 file ({err})") from err
    with f:
        attrs = dict(f.attrs)
        for key in FILE_ATTRS:
            if key not in attrs:
                raise ShardError(f"{name}: attribute {key!r} missing")
        expect = {
            "format_version": FORMAT_VERSION,
            "pack_size": s,
            "fit": info.get("fit"),
            "compression": info.get("compression"),
            "source_manifest_sha256": info.get("source_manifest_sha256"),
            "n_images": n,
        }
        for key, want in expect.items():
            got = attrs[key]
            got = got.item() if isinstance(got, np.generic) else got
            if got != want:
                raise ShardError(f"{name}: attribute {key}={got!r}, manifest.json says {want!r}")
        if IMAGES not in f:
            raise ShardError(f"{name}: dataset {IMAGES!r} missing")
        ds = f[IMAGES]
        if ds.shape != (n, s, s) or ds.dtype != np.uint8:
            raise ShardError(f"{name}: {IMAGES} is {ds.dtype} {ds.shape}, expected uint8 {(n, s, s)}")
        if ds.chunks != (1, s, s):
            raise ShardError(f"{name}: {IMAGES} chunks {ds.chunks}, expected {(1, s, s)}")
        for key in META_DTYPES:
            if key not in f or f[key].shape != (n,):
                raise ShardError(f"{name}: metadata dataset {key!r} missing or not of length {n}")
        rows = idx["row"].to_numpy(np.int64)
        if len(rows) != n or not np.array_equal(np.sort(rows), np.arange(n)):
            raise ShardError(f"{name}: {INDEX_CSV} lists {len(rows)} rows for it, expected rows 0..{n - 1} once each")
        ids = f["image_id"][:]
        if not np.array_equal(ids[rows], idx["image_id"].to_numpy(np.int64)):
            raise ShardError(f"{name}: image_id of its rows differ from {INDEX_CSV}")


def verify_shards(shards_dir: str | Path, full: bool = False) -> VerifyReport:
    """Check a shard folder; raises ShardError naming the shard and what is wrong.

    Quick: manifest.json present, parseable and matching its content_sha256, index.csv matches its
    recorded hash, every listed shard exists with the listed size, its attributes and dataset shapes
    match, and the index rows are consistent with the shard. Full: also the SHA-256 of every shard
    (and manifest.json must be signed, so every byte of the folder is covered). A successful full check
    leaves a `.verified` stamp (sizes, mtimes, ctimes, inodes); the next full check with an
    unchanged stamp skips the hashing.

    Args:
        shards_dir: folder written by `bonehpc pack`.
        full: also hash every shard file.

    Returns:
        VerifyReport with counts and timing.
    """
    t0 = time.perf_counter()
    d = Path(shards_dir)
    info = load_manifest_json(d)
    entries = info["shards"]
    if not isinstance(entries, list):
        raise ShardError(f"{d / MANIFEST_JSON}: 'shards' is not a list")
    signed = info.get(CONTENT_SHA256)
    if signed is not None and signed != manifest_content_sha256(info):
        raise ShardError(f"{d / MANIFEST_JSON}: content differs from its {CONTENT_SHA256} (edited after packing)")
    if signed is None and full:
        raise ShardError(
            f"{d / MANIFEST_JSON}: no {CONTENT_SHA256} (packed by an older bonehpc); re-run `bonehpc pack` "
            "(complete shards are kept) so the full check covers it"
        )
    index_path = d / INDEX_CSV
    if not index_path.is_file():
        raise ShardError(f"{index_path}: missing")
    want_index = info.get("index_sha256")
    if want_index and sha256_file(index_path) != want_index:
        raise ShardError(f"{index_path}: content differs from the SHA-256 recorded in {MANIFEST_JSON}")
    index = _read_index(index_path)
    if len(index) != int(info["n_images"]):
        raise ShardError(f"{index_path}: {len(index)} rows, {MANIFEST_JSON} says {info['n_images']} images")
    if index["image_id"].duplicated().any():
        raise ShardError(f"{index_path}: image_id values repeat")
    names = [str(e["name"]) for e in entries]
    extra = set(index["shard"]) - set(names)
    if extra:
        raise ShardError(f"{index_path}: refers to shards not in {MANIFEST_JSON}: {sorted(extra)[:5]}")
    if sum(int(e["n_images"]) for e in entries) != len(index):
        raise ShardError(f"{MANIFEST_JSON}: shard image counts do not add up to n_images={len(index)}")
    groups = {str(k): g for k, g in index.groupby("shard", sort=False)}
    total = 0
    for e in entries:
        path = d / str(e["name"])
        if not path.is_file():
            raise ShardError(f"{path.name}: listed in {MANIFEST_JSON} but missing from {d}")
        size = path.stat().st_size
        if size != int(e["bytes"]):
            raise ShardError(f"{path.name}: {size} bytes, {MANIFEST_JSON} says {e['bytes']} (truncated or rewritten)")
        total += size
        _check_shard(path, e, info, groups.get(path.name, index.iloc[:0]))

    report = VerifyReport(str(d), len(entries), len(index), total, full, pack_size=int(info["pack_size"]))
    if full:
        stamp_path = d / VERIFIED_STAMP
        key = _stamp_key(d, names)
        cached = False
        try:
            cached = json.loads(stamp_path.read_text()).get("files") == key
        except (OSError, ValueError, AttributeError):
            cached = False
        if not cached:
            for e in entries:
                if sha256_file(d / e["name"]) != e["sha256"]:
                    raise ShardError(f"{e['name']}: SHA-256 differs from {MANIFEST_JSON} (content changed)")
            try:
                atomic_write_text(stamp_path, json.dumps({"verified_at": now_iso(), "files": key}) + "\n")
            except OSError as err:  # a read-only data folder is fine; the next full check hashes again
                log.info("could not write %s (%s)", stamp_path, err)
        report.cached = cached
    report.elapsed_s = time.perf_counter() - t0
    return report
