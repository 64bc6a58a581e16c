"""Teacher outputs: the frozen teacher's logits on every training view of a fold, computed once, read by students.

Views are keyed on (seed, epoch, image id) (`bonehpc.data.loaders`), so the view a student gets of image i in
epoch e does not depend on the number of processes, the batch, a resume or the trial. The outputs job of fold k
(`bonehpc.outputs_job`, `bonehpc outputs --config C --fold k`, torchrun-able) runs the frozen teacher of
fold k once over every training image of every epoch of the students' schedule, with the same seed, preset,
size, input dtype and autocast as the training step (inference mode, channels_last on a GPU, batches of
`distill.outputs_batch_size`), and writes the logits to ``runs/<exp>/<fold>/outputs/teacher_outputs.h5``:

    ids      int64 [N]         the fold's training image ids, sorted
    logits   float32 [E, N, C] logits of epoch e, image ids[n] (one HDF5 chunk per epoch)
    attrs    key (JSON: `view_key`), epochs (E: epochs 0..E-1 are complete)

A student (or tune trial) with ``distill.teacher_outputs`` auto or cached opens the file through
`open_for_run`: the stored key must equal the run's own key and cover its epochs (a run with fewer epochs
reads a prefix). cached refuses a mismatch (one line naming the field); auto falls back to the online teacher
and says why. When an epoch starts, each rank reads the epoch's chunk and keeps the rows of its own samples
(the ids its loader plan gives it; an id missing from the cache is an error, never a wrong row), and looks them
up by image id in each step (`torch.searchsorted` on the device: no host sync), so DDP, resume and requeue
read exactly the rows their views need.

The job is resumable: finished epochs go to ``teacher_outputs.h5.partial`` as they complete (flushed), a
requeued job continues after the last one, and the file is renamed into place when every epoch is there. A
cache with the same key and fewer epochs is extended the same way. This module is the key and the reader
(torch-light, imported by training); the job is `bonehpc.outputs_job`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from bonehpc.config import ExperimentConfig
from bonehpc.paths import (
    BEST_CKPT,
    OUTPUTS_FILE,
    RUN_METRICS,
    STATUS_COMPLETED,
    ExperimentPaths,
    fold_name,
    read_json,
)

log = logging.getLogger(__name__)

FORMAT = 1
PARTIAL_SUFFIX = ".partial"
# Config keys that change what the teacher sees (or how its logits are computed): a tune space over one of
# them cannot reuse the fold's cache (see `view_changing_keys`).
VIEW_KEYS = ("augment.", "data.image_size", "data.backend", "data.pack_size", "data.shards", "train.seed", "train.amp")


class TeacherOutputsError(ValueError):
    """Cached teacher outputs cannot be used as asked (missing, or made for other views); one line says why."""


# ----------------------------------------------------------------------------------------------
# The key


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file (the teacher checkpoint), streamed."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def outputs_epochs(cfg: ExperimentConfig) -> int:
    """Epochs the outputs job covers: the longest student schedule of the experiment and its tuning (student.epochs,
    tune.epochs, the highest `student.epochs` of the tune space); shorter runs read a prefix."""
    spec = cfg.tune.space.get("student.epochs") or {}
    candidates = [cfg.student.epochs, cfg.tune.epochs, spec.get("high", 0), *(spec.get("choices") or [])]
    return max(int(c) for c in candidates if isinstance(c, int | float))


def view_key(cfg: ExperimentConfig, teacher_sha256: str, train_ids: np.ndarray, device: torch.device) -> dict[str, Any]:
    """Everything that decides the teacher's logits on a fold's training views, epochs excepted."""
    from bonehpc.data.loaders import _input_dtype, resolve_backend
    from bonehpc.data.shards import INDEX_CSV
    from bonehpc.engine import amp_dtype_of

    a = cfg.augment
    index = Path(cfg.data.shards) / INDEX_CSV
    ids = np.sort(np.asarray(train_ids, dtype=np.int64))
    return {
        "format": FORMAT,
        "teacher_sha256": teacher_sha256,
        "shards_index_sha256": file_sha256(index) if index.is_file() else "",
        "backend": resolve_backend(cfg.data.backend),
        "image_size": cfg.data.image_size,
        "augment": {"hflip_p": a.hflip_p, "rotate_deg": a.rotate_deg, "mean": list(a.mean), "std": list(a.std)},
        "seed": cfg.train.seed,
        "input_dtype": str(_input_dtype(cfg, device)),
        "autocast": str(amp_dtype_of(cfg.train.amp, device)),
        "train_images": len(ids),
        "train_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
    }


def key_mismatch(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    """'' when the keys agree, else the differing fields (e.g. "seed 0 != 1 (cache != run)")."""
    diffs = [f"{k} {stored.get(k)!r} != {wanted.get(k)!r}" for k in sorted(set(stored) | set(wanted))]
    diffs = [d for k, d in zip(sorted(set(stored) | set(wanted)), diffs, strict=True) if stored.get(k) != wanted.get(k)]
    return "; ".join(d if len(d) < 160 else d[:157] + "..." for d in diffs) + (" (cache != run)" if diffs else "")


def read_header(path: Path) -> tuple[dict[str, Any], int] | None:
    """(key, epochs covered) of an outputs file, None when it is missing or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs["key"]), int(f.attrs["epochs"])
    except (OSError, KeyError, ValueError):
        return None


def fold_train_ids(cfg: ExperimentConfig, fold: int | str) -> np.ndarray:
    """The training image ids of a fold: the split the training run makes (folds.csv made when missing)."""
    from bonehpc.data.folds import ensure_folds, split_ids
    from bonehpc.data.shards import ShardReader

    reader = ShardReader(cfg.data.shards)
    try:
        d = cfg.data
        folds = ensure_folds(ExperimentPaths.of(cfg).folds, reader.index, d.num_folds, d.fold_seed)
        train, _ = split_ids(
            reader.index, folds, fold, d.num_folds, final_val_frac=cfg.train.final_val_frac, seed=d.fold_seed
        )
    finally:
        reader.close()
    return train


def outputs_current(cfg: ExperimentConfig, fold: int | str, device: torch.device | None = None) -> bool:
    """Whether the fold's outputs file matches the current teacher and config and covers `outputs_epochs`."""
    paths = ExperimentPaths.of(cfg)
    teacher = paths.role_dir(fold, "teacher") / BEST_CKPT
    header = read_header(paths.outputs_dir(fold) / OUTPUTS_FILE)
    if header is None or not teacher.is_file():
        return False
    key = view_key(cfg, file_sha256(teacher), fold_train_ids(cfg, fold), device or torch.device("cpu"))
    return not key_mismatch(header[0], key) and header[1] >= outputs_epochs(cfg)


# ----------------------------------------------------------------------------------------------
# Reading (students, tune trials)


class CachedTeacherOutputs:
    """The teacher logits of one fold's cache, looked up per epoch by image id (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        epochs: int,
        device: torch.device,
        *,
        ids: np.ndarray | None = None,
        arrays: np.ndarray | None = None,
    ) -> None:
        self.path, self.epochs, self.device = path, epochs, device
        self._arrays = arrays  # [E, N, C] held in memory (`in_memory`) instead of read from the file
        if ids is None:
            with h5py.File(path, "r") as f:
                ids = f["ids"][...]
        self._all_ids = np.asarray(ids, dtype=np.int64)
        self.ids = torch.from_numpy(self._all_ids).to(device)
        self.epoch = -1
        self.table: torch.Tensor | None = None

    @classmethod
    def in_memory(cls, ids: np.ndarray, logits: np.ndarray, device: torch.device) -> CachedTeacherOutputs:
        """The same lookup over arrays (sorted ids [N], logits [E, N, C]): the benchmark's cached KD step."""
        arrays = np.asarray(logits, dtype=np.float32)
        return cls(Path("<memory>"), arrays.shape[0], device, ids=np.asarray(ids, dtype=np.int64), arrays=arrays)

    def set_epoch(self, epoch: int, ids: np.ndarray | None = None) -> None:
        """Read epoch `epoch`'s rows (one contiguous chunk) and keep, on the device, those of `ids` (this rank's
        samples of the epoch; None: every row).

        Raises:
            TeacherOutputsError: an id of this rank is not in the cache (never looked up silently wrong).
        """
        if not 0 <= epoch < self.epochs:
            raise TeacherOutputsError(f"{self.path}: covers epochs 0..{self.epochs - 1}, epoch {epoch} asked")
        if self._arrays is not None:
            table = self._arrays[epoch]
        else:
            with h5py.File(self.path, "r") as f:
                table = f["logits"][epoch]
        all_ids = self._all_ids
        if ids is not None:
            want = np.unique(np.asarray(ids, dtype=np.int64))
            rows = np.searchsorted(all_ids, want).clip(max=len(all_ids) - 1)
            missing = want[all_ids[rows] != want]
            if len(missing):
                raise TeacherOutputsError(f"{self.path}: image ids {missing[:5].tolist()} of this rank are not cached")
            table, all_ids = table[rows], want
        self.ids = torch.from_numpy(all_ids).to(self.device)
        self.table = torch.from_numpy(np.ascontiguousarray(table)).to(self.device)
        self.epoch = epoch

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, C] of the batch's image ids in the current epoch."""
        if self.table is None:
            raise RuntimeError("CachedTeacherOutputs.set_epoch was not called")
        rows = torch.searchsorted(self.ids, ids.to(self.ids.device))
        return self.table[rows]


def open_for_run(
    cfg: ExperimentConfig, fold: int | str, train_ids: np.ndarray, device: torch.device
) -> CachedTeacherOutputs | None:
    """The fold's cache for this student run (distill.teacher_outputs auto | cached), None: run the teacher online.

    Raises:
        TeacherOutputsError: cached, and the cache is missing or does not match the run (the field named).
    """
    mode = cfg.distill.teacher_outputs
    paths = ExperimentPaths.of(cfg)
    path = paths.outputs_dir(fold) / OUTPUTS_FILE
    teacher = paths.role_dir(fold, "teacher") / BEST_CKPT
    header = read_header(path)
    if header is None:
        reason = f"no teacher outputs at {path} (the outputs job of {fold_name(fold)} has not run)"
    else:
        want = view_key(cfg, file_sha256(teacher), train_ids, device)
        reason = key_mismatch(header[0], want)
        if not reason and header[1] < cfg.student.epochs:
            reason = f"{path} covers {header[1]} epochs, the run has {cfg.student.epochs}"
    if not reason:
        assert header is not None
        log.info(
            "teacher outputs: cached, %s (%d of its %d epochs; teacher %s)",
            path,
            cfg.student.epochs,
            header[1],
            header[0]["teacher_sha256"][:12],
        )
        return CachedTeacherOutputs(path, header[1], device)
    if mode == "cached":
        raise TeacherOutputsError(f"distill.teacher_outputs=cached: {reason}")
    log.warning("teacher outputs: online (the teacher runs every step): %s", reason)
    return None


def check_tune_space(cfg: ExperimentConfig) -> list[str]:
    """Keys of tune.space that change the teacher's views; refused (TeacherOutputsError) under cached.

    Under auto the trials whose values differ from the cache's fall back to the online teacher (each run
    checks its own key); the keys are returned so the caller can say so.
    """
    keys = [k for k in cfg.tune.space if any(k == v or (v.endswith(".") and k.startswith(v)) for v in VIEW_KEYS)]
    if not keys or cfg.distill.kind == "none" or cfg.distill.teacher_outputs == "online":
        return keys
    if cfg.distill.teacher_outputs == "cached":
        raise TeacherOutputsError(
            f"tune.space changes what the teacher sees ({', '.join(keys)}): cached teacher outputs cannot serve "
            "those trials; set distill.teacher_outputs=auto (such trials run the teacher online) or online"
        )
    log.warning("tune.space has %s: trials that change the views run the teacher online", ", ".join(keys))
    return keys


def completed_summary(cfg: ExperimentConfig, fold: int | str) -> dict[str, Any] | None:
    """The outputs job's metrics.json of a fold, when it says completed."""
    doc = read_json(ExperimentPaths.of(cfg).outputs_dir(fold) / RUN_METRICS)
    return doc if doc is not None and doc.get("status") == STATUS_COMPLETED else None
