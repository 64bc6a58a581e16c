"""The outputs job of a fold: the frozen teacher over every training view of the students' schedule, once.

`compute` (every rank of ``torchrun -m bonehpc.cli.outputs --config C --fold k``, or `bonehpc outputs`) writes the
cache that `bonehpc.teacher_outputs` describes and reads. Each rank runs the teacher on a contiguous block of the
fold's training ids per epoch (an evaluation plan with the training preset: the students' views, keyed on seed,
epoch and image id), in inference mode under the training autocast, channels_last on a GPU, in batches of
`distill.outputs_batch_size`; rank 0 gathers the epoch, writes it to the partial file and flushes. SIGUSR2/SIGTERM
stop the job at the end of an epoch (at the next batch in a single process) with the finished epochs kept: the
rerun continues after them (exit status 3, like training).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from bonehpc import dist
from bonehpc.config import ExperimentConfig
from bonehpc.fsio import atomic_write_json
from bonehpc.lease import RunLease, die_with_parent
from bonehpc.paths import BEST_CKPT, OUTPUTS_FILE, RUN_METRICS, STATUS_COMPLETED, ExperimentPaths, fold_name
from bonehpc.teacher_outputs import (
    PARTIAL_SUFFIX,
    file_sha256,
    fold_train_ids,
    key_mismatch,
    outputs_epochs,
    read_header,
    view_key,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Writer:
    """Rank 0's outputs file under construction (``<file>.partial``): epochs appended as they complete."""

    path: Path
    key: dict[str, Any]
    ids: np.ndarray
    epochs: int = 0
    file: Any = None

    @property
    def partial(self) -> Path:
        return self.path.with_name(self.path.name + PARTIAL_SUFFIX)

    def open(self) -> int:
        """Open the partial file, continuing a matching partial or complete file; returns the epochs done."""
        for source in (self.partial, self.path):
            header = read_header(source)
            if header is not None and not key_mismatch(header[0], self.key):
                if source == self.path:
                    shutil.copyfile(self.path, self.partial)  # extend a complete cache by more epochs
                self.file = h5py.File(self.partial, "a")
                self.epochs = header[1]
                if "logits" in self.file and self.file["logits"].shape[0] > self.epochs:  # cut short by a crash
                    self.file["logits"].resize(self.epochs, axis=0)
                log.info("teacher outputs: continuing %s from epoch %d", source, self.epochs)
                return self.epochs
        self.file = h5py.File(self.partial, "w")
        self.file.create_dataset("ids", data=self.ids)
        self.file.attrs["key"] = json.dumps(self.key, sort_keys=True)
        self.file.attrs["epochs"] = 0
        return 0

    def append(self, logits: np.ndarray) -> None:
        if "logits" not in self.file:  # the number of classes is known from the first epoch
            n, c = logits.shape
            self.file.create_dataset("logits", shape=(0, n, c), maxshape=(None, n, c), chunks=(1, n, c), dtype="f4")
        ds = self.file["logits"]
        ds.resize(self.epochs + 1, axis=0)
        ds[self.epochs] = logits
        self.epochs += 1
        self.file.attrs["epochs"] = self.epochs
        self.file.flush()

    def close(self, complete: bool) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if complete:
            os.replace(self.partial, self.path)


def _epoch_logits(
    loss: Any, loader: Any, epoch: int, device: torch.device, amp: torch.dtype | None, stop: dist.StopFlag
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """This rank's (ids, logits) of one epoch's views; None when a stop signal came (single process only)."""
    loader.set_epoch(epoch)
    ids, out = [], []
    with torch.inference_mode():
        for images, _labels, batch_ids in loader:
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out.append(loss.teacher_logits(images))
            ids.append(batch_ids)
            if not dist.is_dist() and stop.is_set:
                return None
    n = sum(len(i) for i in ids)
    logits = torch.cat(out).cpu().numpy() if out else np.zeros((0, 0), np.float32)
    return torch.cat(ids).cpu().numpy() if ids else np.zeros(0, np.int64), logits, n


def _assemble(parts: Sequence[tuple[np.ndarray, np.ndarray, int]], sorted_ids: np.ndarray) -> np.ndarray:
    """One epoch's logits in `sorted_ids` order from every rank's (ids, logits)."""
    ids = np.concatenate([p[0] for p in parts])
    logits = np.concatenate([p[1] for p in parts if len(p[0])])
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(ids[order], sorted_ids):
        raise RuntimeError(f"teacher outputs: an epoch saw {len(ids)} views, expected each of {len(sorted_ids)} once")
    return logits[order].astype(np.float32)


def compute(cfg: ExperimentConfig, fold: int | str) -> dict[str, Any]:
    """The outputs job of one fold (every rank calls it; see the module docstring). Returns its metrics.json.

    Raises:
        MissingTeacherError: the fold's teacher has no best.pt.
        Preempted: stopped by SIGUSR2/SIGTERM; the finished epochs are kept, call again to continue.
    """
    from bonehpc.log import close_logging, setup_logging
    from bonehpc.train import MissingTeacherError, _load_folds, _on_main, _prepare_dir, check_fold

    check_fold(fold, cfg.data.num_folds)
    paths = ExperimentPaths.of(cfg)
    out = paths.outputs_dir(fold)
    teacher = paths.role_dir(fold, "teacher") / BEST_CKPT
    if not teacher.is_file():
        raise MissingTeacherError(f"{teacher} is missing: train the teacher of {fold_name(fold)} first")
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by torchrun: never outlive it (no orphan writers)
        die_with_parent()
    owns_group = not dist.is_dist()
    info = dist.init_distributed()
    leases: list[RunLease] = []  # rank 0's lease of the outputs folder: one writer of the cache

    def take_lease() -> None:
        _prepare_dir(out)
        leases.append(RunLease(out, what="writing these teacher outputs").acquire())

    try:
        _on_main(take_lease)
        setup_logging(out, info.rank)
        stop = dist.StopFlag(info.device).install()
        try:
            _load_folds(cfg, paths, _shard_index(cfg))  # folds.csv written by rank 0 only, when missing
            return _compute(cfg, fold, out, teacher, info, stop)
        finally:
            stop.uninstall()
            close_logging()
    finally:
        for lease in leases:
            lease.release()
        if owns_group:
            dist.cleanup()


def _compute(
    cfg: ExperimentConfig, fold: int | str, out: Path, teacher_ckpt: Path, info: dist.DistInfo, stop: dist.StopFlag
) -> dict[str, Any]:
    from bonehpc.data.loaders import build_loader
    from bonehpc.data.shards import ShardReader
    from bonehpc.distill import DistillationLoss, build_task_loss, teacher_and_input
    from bonehpc.engine import amp_dtype_of
    from bonehpc.train import Preempted, _on_main

    t0 = time.perf_counter()
    device, epochs = info.device, outputs_epochs(cfg)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    ids = np.sort(fold_train_ids(cfg, fold))
    key = view_key(cfg, file_sha256(teacher_ckpt), ids, device)
    teacher, renorm = teacher_and_input(
        teacher_ckpt, device, cfg.train.channels_last, cfg.augment.mean, cfg.augment.std
    )
    loss = DistillationLoss(build_task_loss(), teacher, "soft", teacher_input=renorm).to(device)
    writer = _Writer(out / OUTPUTS_FILE, key, ids)
    start = int(_on_main(writer.open))  # rank 0 opens the file; every rank learns where to start
    batch = cfg.distill.outputs_batch_size or 4 * cfg.train.batch_size
    ocfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
    reader = ShardReader(cfg.data.shards)
    loader = build_loader(
        ocfg, reader, ids, train=False, augment=True, rank=info.rank, world_size=info.world_size, device=device,
        seed=cfg.train.seed,
    )  # fmt: skip
    amp = amp_dtype_of(cfg.train.amp, device)
    log.info(
        "teacher outputs of %s: %d train images x epochs %d..%d, batch %d, %s, autocast %s, %d rank(s)",
        fold_name(fold), len(ids), start, epochs - 1, batch, loader.backend, amp, info.world_size,
    )  # fmt: skip
    done_now, t_inf = 0, 0.0
    try:
        for epoch in range(start, epochs):
            t1 = time.perf_counter()
            part = _epoch_logits(loss, loader, epoch, device, amp, stop)
            if stop.agreed() or part is None:
                raise Preempted(out, epoch, stop.signal)
            parts = dist.all_gather_object(part)
            t_inf += time.perf_counter() - t1
            done_now += sum(p[2] for p in parts)
            if info.is_main:
                writer.append(_assemble(parts, ids))
            log.info("teacher outputs: epoch %d done (%.1f s)", epoch, time.perf_counter() - t1)
    finally:
        loader.close()
        reader.close()
        if info.is_main:
            writer.close(complete=writer.epochs >= epochs)
    summary = {
        "fold": fold,
        "role": "outputs",
        "status": STATUS_COMPLETED,
        "epochs": epochs,
        "epochs_computed": epochs - start,
        "images_per_epoch": len(ids),
        "img_per_s": round(done_now / t_inf, 2) if t_inf > 0 else None,
        "world_size": info.world_size,
        "time_s": round(time.perf_counter() - t0, 3),
        "key": key,
    }
    if info.is_main:
        atomic_write_json(out / RUN_METRICS, summary)
        log.info("teacher outputs of %s: %s (%s img/s)", fold_name(fold), out / OUTPUTS_FILE, summary["img_per_s"])
    dist.barrier()
    return summary


def _shard_index(cfg: ExperimentConfig) -> Any:
    from bonehpc.data.shards import ShardReader

    reader = ShardReader(cfg.data.shards)
    index = reader.index
    reader.close()
    return index
