"""Loaders: a backend string (dali | torch | synthetic | auto) -> batches ``(images, labels, ids)`` on a device.

Sharding and shuffling are done here, the same way for every backend (`EpochPlan`):

- Training: every epoch the ids are permuted with a generator seeded by ``(seed, epoch)`` - the same
  permutation on every rank - and cut into ``world_size`` disjoint slices of ``steps * batch_size``
  ids. ``steps = (len(ids) // world_size) // batch_size`` (capped by ``train.max_steps_per_epoch``):
  the remainder is DROPPED, so every rank runs the same number of full batches (BatchNorm and DDP's
  all-reduce see equal work) and no image counts twice in an epoch; since the permutation changes every
  epoch, a different handful of images sits out each time. A training set smaller than one global
  batch is an error.
- Evaluation: no shuffling, the ids are split into ``world_size`` contiguous blocks (sizes differ by at
  most one), every image is visited exactly once across ranks, the last batch may be partial, nothing is
  padded. Ranks may differ by one step; gather predictions with a variable-size gather.

Views: each sample's augmentation draw is seeded by ``(seed, epoch, image id)`` on both real backends, never
by rank, world size or position. The view of an image in an epoch is therefore the same for 1 or 8
processes, in a resumed run, a tune trial and the teacher-outputs job (`bonehpc.teacher_outputs`, which
reads every training id of an epoch in fixed order with the training preset: ``augment=True`` on an
evaluation plan). The two backends draw with different generators: a view is keyed on the backend too.

Preemption: Slurm signals every process of a step. Loader workers (and the helper processes
multiprocessing starts for them) start with SIGUSR2/SIGTERM blocked and ignore them
(`bonehpc.dist.preempt_signals_blocked`, `bonehpc.dist.ignore_preempt_signals`); only the rank process
acts on them, at a step boundary. They are shut down by ``close()`` (or when the loader is collected).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import math
import os
import random
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bonehpc import dist
from bonehpc.augment.dali import sample_draws_of
from bonehpc.augment.presets import Preset, build_preset
from bonehpc.config import ExperimentConfig
from bonehpc.data.shards import ShardReader
from bonehpc.lease import die_with_parent

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali", "torch", "synthetic")
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class LoaderError(ValueError):
    """The loader cannot be built as asked (unknown ids, too few images, unknown backend...)."""


# ----------------------------------------------------------------------------------------------
# Which ids each rank reads in each epoch


class EpochPlan:
    """The ids one rank reads per epoch (see the module docstring for the rules).

    Args:
        ids: image ids to read (unique).
        batch_size: images per batch on this rank.
        train: training (shuffle, equal full steps) or evaluation (fixed order, every id once).
        rank: this process's rank.
        world_size: number of processes.
        seed: seed of the shuffling.
        max_steps: cap on training steps per epoch (0: none).
    """

    def __init__(
        self,
        ids: Sequence[int] | np.ndarray,
        *,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        max_steps: int = 0,
    ) -> None:
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if batch_size <= 0:
            raise LoaderError(f"batch_size must be > 0, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise LoaderError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        uniq, counts = np.unique(self.ids, return_counts=True)
        if (counts > 1).any():
            raise LoaderError(f"image ids repeat: {uniq[counts > 1][:5].tolist()} (each image must appear once)")
        self.batch_size, self.train, self.rank, self.world_size, self.seed = batch_size, train, rank, world_size, seed
        n = len(self.ids)
        if train:
            steps = (n // world_size) // batch_size
            if steps == 0:
                raise LoaderError(
                    f"training set of {n} images is smaller than one global batch "
                    f"({world_size} ranks x {batch_size}); lower train.batch_size"
                )
            self.steps = min(steps, max_steps) if max_steps > 0 else steps
            self.per_rank = self.steps * batch_size
            self._eval_ids = None
        else:
            self._eval_ids = np.array_split(self.ids, world_size)[rank]
            self.per_rank = len(self._eval_ids)
            self.steps = math.ceil(self.per_rank / batch_size)
        self._cache: tuple[int, np.ndarray] | None = None

    def rank_ids(self, epoch: int) -> np.ndarray:
        """This rank's ids for an epoch, in reading order."""
        if self._eval_ids is not None:
            return self._eval_ids
        if self._cache is None or self._cache[0] != epoch:
            perm = np.random.default_rng((self.seed, epoch)).permutation(self.ids)
            self._cache = (epoch, perm[self.rank * self.per_rank : (self.rank + 1) * self.per_rank])
        return self._cache[1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state


def _labels_of(reader: ShardReader, ids: np.ndarray) -> dict[int, int]:
    """image_id -> label for the requested ids (taken from the shard index)."""
    index = reader.index
    lab = dict(zip(index["image_id"].to_numpy(np.int64).tolist(), index["label"].astype(int).tolist(), strict=True))
    missing = [int(i) for i in ids if int(i) not in lab]
    if missing:
        raise LoaderError(f"{len(missing)} image ids are not in the shards at {reader.shards_dir}: {missing[:5]}")
    return {int(i): lab[int(i)] for i in ids}


# Tags that keep the seed streams of different uses apart.
_SAMPLE, _DALI, _SYNTHETIC, _WORKER = 0, 1, 2, 3


def _derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from non-negative ints (seed, rank, epoch, ...)."""
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def view_seed(tag: int, seed: int, epoch: int, image_id: int) -> int:
    """The seed of one view: the augmentation draw of image `image_id` in `epoch` under `seed` (backend `tag`)."""
    return _derive_seed(tag, seed, epoch, image_id)


def _input_dtype(cfg: ExperimentConfig, device: torch.device) -> torch.dtype:
    """float32 on the CPU; on a GPU the autocast dtype (fp16 or bf16), float32 when amp is off."""
    if device.type != "cuda" or cfg.train.amp == "off":
        return torch.float32
    return torch.float16 if cfg.train.amp == "fp16" else torch.bfloat16


# ----------------------------------------------------------------------------------------------
# The loaders


class BatchLoader:
    """Iterable of ``(images, labels, ids)`` batches; ``len()`` is the number of steps per epoch.

    Attributes:
        backend: dali, torch or synthetic.
        plan: which ids this rank reads.
        device: where the batches are.
    """

    backend = ""

    def __init__(self, plan: EpochPlan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.epoch = 0

    def __len__(self) -> int:
        return self.plan.steps

    @property
    def _kind(self) -> str:
        return "train" if self.plan.train else "eval"

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (training loaders reshuffle: the order depends on the seed and the epoch)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        if self.plan.steps == 0:
            return iter(())
        return self._iter()

    def _iter(self) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Release worker processes and pipelines (also done at garbage collection)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend}, {self._kind}, steps={len(self)}, "
            f"batch={self.plan.batch_size}, rank={self.plan.rank}/{self.plan.world_size}, device={self.device})"
        )


# torch -------------------------------------------------------------------------------------------


class _ShardDataset(Dataset):
    """Reads one shard image and applies the albumentations preset; its view is keyed by (seed, epoch, image_id)."""

    def __init__(self, reader: ShardReader, preset: Preset, labels: dict[int, int], seed: int) -> None:
        from bonehpc.augment.albu import build_albu_transform

        self.reader, self.preset, self.labels, self.seed = reader, preset, labels, seed
        self.transform = build_albu_transform(preset, seed=seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int, int]:
        from bonehpc.augment.albu import apply_albu

        image_id, epoch, _pos = key
        if self.preset.is_random:
            # The view's seed: (seed, epoch, id) only, so no worker, rank, world size or resume changes it.
            self.transform.set_random_seed(view_seed(_SAMPLE, self.seed, epoch, image_id))
        return apply_albu(self.transform, self.reader.read(image_id)), self.labels[image_id], image_id


class _PlanSampler(Sampler):
    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return self.loader.plan.per_rank

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self.loader.epoch
        for pos, image_id in enumerate(self.loader.plan.rank_ids(epoch).tolist()):
            yield image_id, epoch, pos


def _worker_init(seed: int, rank: int, worker_id: int) -> None:
    """Set up a DataLoader worker: ignore the preemption signals (the rank process handles them), seed
    every RNG from (seed, rank, worker) and keep it to one cv2 thread."""
    import cv2

    dist.ignore_preempt_signals()
    die_with_parent()  # it ignores TERM: without this a worker would outlive a trainer killed with SIGKILL
    cv2.setNumThreads(1)
    s = _derive_seed(_WORKER, seed, rank, worker_id)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


class _WorkerInit:
    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank

    def __call__(self, worker_id: int) -> None:
        _worker_init(self.seed, self.rank, worker_id)


# Torch loaders with worker processes that are still open. Their workers ignore SIGTERM, and at exit
# multiprocessing's own handler TERMs daemon children and then joins them: it would wait forever. This
# handler, registered after multiprocessing's (torch imports it first), runs before it and closes them.
_OPEN_TORCH_LOADERS: weakref.WeakSet[TorchLoader] = weakref.WeakSet()


@atexit.register
def _close_open_torch_loaders() -> None:
    for loader in list(_OPEN_TORCH_LOADERS):
        loader.close()
    # Workers of an iterator whose loader is already gone (garbage-collected without close) are not in the
    # set. multiprocessing would TERM every daemon child next and wait for it; these ignore TERM, so they
    # get SIGKILL now (a daemon child is ended at exit either way; no state of theirs outlives the parent).
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(5)


class TorchLoader(BatchLoader):
    """torch DataLoader over the shards with the albumentations preset applied in CPU workers."""

    backend = "torch"

    def __init__(
        self, cfg: ExperimentConfig, reader: ShardReader, plan: EpochPlan, preset: Preset, device: torch.device
    ) -> None:
        super().__init__(plan, device)
        cuda = device.type == "cuda"
        self.channels_last = cuda and cfg.train.channels_last
        self.dtype = _input_dtype(cfg, device)
        labels = _labels_of(reader, plan.ids)
        dataset = _ShardDataset(reader, preset, labels, plan.seed)
        workers = cfg.data.num_workers
        if workers > 0:
            # The fork server imports these once; each worker then starts without re-importing them.
            import multiprocessing

            multiprocessing.set_forkserver_preload(["torch", "albumentations", "cv2", "h5py", "bonehpc.data.loaders"])
        self.dataloader = DataLoader(
            dataset,
            batch_size=plan.batch_size,
            sampler=_PlanSampler(self),
            drop_last=False,  # the plan already holds whole batches when training
            num_workers=workers,
            pin_memory=cuda,
            persistent_workers=workers > 0,
            worker_init_fn=_WorkerInit(plan.seed, plan.rank) if workers > 0 else None,
            # Workers come from a clean fork server, not from this process: a fork of a process that
            # runs DALI, CUDA or HDF5 threads can inherit a held lock and hang (seen here: a worker
            # stuck after DALI pipelines had run in the parent).
            multiprocessing_context="forkserver" if workers > 0 else None,
        )

    def _iter(self) -> Iterator[Batch]:
        # Workers (and the fork server they come from) start here, on the first epoch: with the
        # preemption signals blocked, so that they inherit the mask and survive Slurm's signal to the
        # whole step before their worker_init_fn runs.
        if self.dataloader.num_workers and self.dataloader._iterator is None:
            log.info("torch loader (%s): starting %d workers", self._kind, self.dataloader.num_workers)
            _OPEN_TORCH_LOADERS.add(self)
        with dist.preempt_signals_blocked():
            batches = iter(self.dataloader)
        for images, labels, ids in batches:
            images = images.to(self.device, non_blocking=True)
            # Cast and relayout in one copy (two separate calls would copy the batch twice on the GPU).
            fmt = torch.channels_last if self.channels_last else torch.preserve_format
            images = images.to(dtype=self.dtype, memory_format=fmt)
            yield images, labels.to(self.device, non_blocking=True), ids.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the workers through their queues; one that does not stop is killed (it ignores TERM)."""
        it = getattr(self.dataloader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            workers = list(getattr(it, "_workers", ()))
            it._shutdown_workers()
            for w in workers:
                if w.is_alive():
                    w.kill()
                    w.join(timeout=5)
        self.dataloader._iterator = None
        _OPEN_TORCH_LOADERS.discard(self)


# dali --------------------------------------------------------------------------------------------


class _DaliSource:
    """Per-sample callable for DALI's parallel external_source; picklable (runs in DALI's workers).

    Returns the image, its label and id, and the sample's augmentation draws (rotation angle, flip)
    seeded by ``(seed, epoch, image id)`` like the torch backend: a view depends on neither the rank nor
    how long the pipeline has run, so a resumed run sees the same images as an uninterrupted one. DALI
    drops a batch that StopIteration cuts short, so an epoch always ends on a batch boundary: a partial
    last batch (evaluation) is filled up by repeating ids, and the loader trims it again.
    """

    def __init__(
        self, reader: ShardReader, plan: EpochPlan, labels: dict[int, int], preset: Preset, epoch_offset: int
    ) -> None:
        self.reader, self.plan, self.labels, self.preset = reader, plan, labels, preset
        self.epoch_offset = epoch_offset
        self.n_samples = plan.steps * plan.batch_size
        self.draws = sample_draws_of(preset)
        self._pid = 0  # the process that last ran this callable

    def __call__(self, info: Any) -> tuple[np.ndarray, ...]:
        """(image [S, S, 1], label [1], id [1], then the preset's draws: see `sample_draws_of`)."""
        if self._pid != os.getpid():  # first sample in this worker process
            dist.ignore_preempt_signals()
            die_with_parent()  # never outlive the trainer (it ignores TERM)
            self._pid = os.getpid()
        if info.idx_in_epoch >= self.n_samples:
            raise StopIteration
        epoch, pos = self.epoch_offset + info.epoch_idx, info.idx_in_epoch
        order = self.plan.rank_ids(epoch)
        image_id = int(order[pos % len(order)])
        out = (
            self.reader.read(image_id)[..., None],
            np.array([self.labels[image_id]], dtype=np.int64),
            np.array([image_id], dtype=np.int64),
        )
        if not self.draws:
            return out
        rng = np.random.default_rng(view_seed(_DALI, self.plan.seed, epoch, image_id))
        angle = np.array(rng.uniform(-self.preset.rotate_deg, self.preset.rotate_deg), dtype=np.float32)
        flip = np.array(rng.random() < self.preset.hflip_p, dtype=np.int32)
        return out + tuple(angle if d == "angle" else flip for d in self.draws)


def _cuda_driver_initialized() -> bool:
    """Whether cuInit ran in this process: DALI's own test before it forks Python workers."""
    backend: Any = importlib.import_module("nvidia.dali.backend")  # untyped (no stub for this function)
    return bool(backend.IsDriverInitialized())


class DaliLoader(BatchLoader):
    """DALI pipeline (GPU, or CPU-only mode without CUDA) fed by a parallel per-sample shard reader.

    The pipeline is built once, at construction, so that, when no CUDA context exists yet, its Python
    workers fork before one does (DALI's rule for fork); a build after CUDA started spawns them. The
    pipeline counts its own epochs and is reused for every epoch, also when the caller stops right
    after an epoch's last batch (``islice(loader, len(loader))``: the end of the epoch is taken from
    DALI at the start of the next one). It is rebuilt only when `set_epoch` jumps (on resume) or when
    an epoch was left unfinished; since the augmentation draws come from the source, a rebuilt
    pipeline gives the same batches. ``builds`` counts the pipelines built.
    """

    backend = "dali"

    def __init__(
        self, cfg: ExperimentConfig, reader: ShardReader, plan: EpochPlan, preset: Preset, device: torch.device
    ) -> None:
        super().__init__(plan, device)
        self.cfg, self.reader, self.preset = cfg, reader, preset
        self.labels = _labels_of(reader, plan.ids)
        self.gpu = device.type == "cuda"
        self.channels_last = self.gpu and cfg.train.channels_last
        self.dtype = _input_dtype(cfg, device)
        self.num_threads = max(1, min(4, len(os.sched_getaffinity(0))))
        self.builds = 0
        self._pipe: Any = None
        self._iterator: Any = None
        self._pipe_epoch = -1  # the epoch the current pipeline produces next
        self._dirty = False  # an epoch was left unfinished: the pipeline must be rebuilt
        self._pending_end = False  # the last batch of an epoch is out, DALI has not reported the end yet
        if plan.steps > 0:
            self._build(self.epoch)

    def _build(self, epoch: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from bonehpc.augment.dali import build_dali_pipeline

        self.close()
        # DALI refuses to fork once the CUDA driver is initialised in this process, which
        # torch.cuda.is_available() alone already does (torch.cuda.is_initialized() stays False).
        start = "spawn" if torch.cuda.is_initialized() or _cuda_driver_initialized() else "fork"
        device_id = None
        if self.gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        half = self.gpu and self.dtype != torch.float32
        pipe = build_dali_pipeline(
            self.preset,
            _DaliSource(self.reader, self.plan, self.labels, self.preset, epoch),
            batch_size=self.plan.batch_size,
            device_id=device_id,
            seed=_derive_seed(_DALI, self.plan.seed, self.plan.rank, epoch) % (2**31),
            num_threads=self.num_threads,
            parallel=True,
            py_num_workers=max(1, self.cfg.data.num_workers),
            py_start_method=start,
            sample_draws=True,
            # fp16 HWC on the GPU: a channels_last NCHW view after permute, no copy (bf16 is a cast later).
            output_dtype="float16" if half else "float32",
            output_layout="HWC" if self.channels_last else "CHW",
        )
        # The workers start here; with the preemption signals blocked they never receive Slurm's
        # signal to the whole step (and the source ignores it too, once in each worker).
        with dist.preempt_signals_blocked():
            pipe.build()
        self._pipe = pipe
        self._iterator = DALIGenericIterator(
            pipe, ["images", "labels", "ids"], last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
        )
        self.builds += 1
        self._pipe_epoch = epoch
        self._dirty = self._pending_end = False
        log.info(
            "DALI pipeline %d built (%s, epoch %d): %d Python workers (%s), device_id %s",
            self.builds,
            self._kind,
            epoch,
            max(1, self.cfg.data.num_workers),
            start,
            device_id,
        )

    def _end_epoch(self) -> None:
        """Take the end of the epoch from DALI (its auto_reset then starts the next epoch)."""
        self._pending_end = False
        try:
            next(self._iterator)
        except StopIteration:
            self._pipe_epoch += 1
        else:  # more batches than planned (never expected): start over with a new pipeline
            self._dirty = True

    def _iter(self) -> Iterator[Batch]:
        if self._pending_end:
            self._end_epoch()
        # Training and epoch-keyed views (the outputs job's augmented evaluation plan) need the set epoch.
        wanted = self.epoch if self.plan.train or self.preset.is_random else self._pipe_epoch
        if self._iterator is None or self._dirty or wanted != self._pipe_epoch:
            self._build(self.epoch)
        self._dirty = True  # until the epoch's last batch is out
        steps, bs = self.plan.steps, self.plan.batch_size
        last = self.plan.per_rank - (steps - 1) * bs  # real images in the last batch
        for step in range(steps):
            d = next(self._iterator)[0]
            if step == steps - 1:
                # The caller may stop after this batch (islice): the next epoch still reuses the pipeline.
                self._dirty, self._pending_end = False, True
                if last < bs:
                    d = {k: v[:last] for k, v in d.items()}  # drop the fill-up of the partial last batch
            images = d["images"]
            if self.channels_last:
                images = images.permute(0, 3, 1, 2)  # NHWC memory seen as channels_last NCHW
            if images.dtype != self.dtype:
                images = images.to(self.dtype)
            yield (
                images,
                d["labels"].view(-1).to(self.device, non_blocking=True),
                d["ids"].view(-1).to(self.device, non_blocking=True),
            )
        self._end_epoch()

    def close(self) -> None:
        self._iterator = None
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            del pipe

    def __del__(self) -> None:
        self.close()


# synthetic ---------------------------------------------------------------------------------------


class SyntheticLoader(BatchLoader):
    """Random images made on the device (for benchmarks: no reading, no augmentation cost).

    Ids follow the plan (so sharding and ``len`` behave as for the real backends); labels are the
    shards' labels when a reader is given, else random. One random batch is generated per loader and
    reused, so generating data costs nothing in the measurements.
    """

    backend = "synthetic"

    def __init__(
        self, cfg: ExperimentConfig, reader: ShardReader | None, plan: EpochPlan, device: torch.device
    ) -> None:
        super().__init__(plan, device)
        self.size = cfg.data.image_size
        self.dtype = _input_dtype(cfg, device)
        self.channels_last = device.type == "cuda" and cfg.train.channels_last
        self.labels = _labels_of(reader, plan.ids) if reader is not None else None
        self._images: torch.Tensor | None = None

    def _iter(self) -> Iterator[Batch]:
        gen = torch.Generator(device=self.device).manual_seed(_derive_seed(_SYNTHETIC, self.plan.seed, self.plan.rank))
        if self._images is None:
            b, s = self.plan.batch_size, self.size
            x = torch.randn(b, 3, s, s, generator=gen, device=self.device).to(self.dtype)
            self._images = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        ids = self.plan.rank_ids(self.epoch)
        for start in range(0, len(ids), self.plan.batch_size):
            chunk = ids[start : start + self.plan.batch_size]
            if self.labels is not None:
                labels = torch.tensor([self.labels[int(i)] for i in chunk], dtype=torch.int64)
            else:
                labels = torch.randint(0, 2, (len(chunk),), generator=gen, device=self.device)
            yield (
                self._images[: len(chunk)],
                labels.to(self.device),
                torch.from_numpy(chunk.copy()).to(self.device),
            )


# ----------------------------------------------------------------------------------------------


def resolve_backend(backend: str, rank: int = 0) -> str:
    """The backend to use: ``auto`` is dali when ``nvidia.dali`` imports, else torch (logged on rank 0)."""
    if backend not in BACKENDS:
        raise LoaderError(f"data.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    from bonehpc.augment.dali import dali_available

    chosen = "dali" if dali_available() else "torch"
    if rank == 0:
        log.info("data.backend=auto: using %s (%s)", chosen, "nvidia.dali imports" if chosen == "dali" else "no DALI")
    return chosen


def build_loader(
    cfg: ExperimentConfig,
    reader: ShardReader | None,
    image_ids: Sequence[int] | np.ndarray,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device,
    seed: int = 0,
    augment: bool | None = None,
) -> BatchLoader:
    """A loader of ``(images, labels, ids)`` batches for one rank (see the module docstring).

    Args:
        cfg: config (data.backend, data.num_workers, data.image_size, train.batch_size,
            train.channels_last, train.amp, train.max_steps_per_epoch (training only), augment.*).
        reader: the shard reader (may be None only for the synthetic backend).
        image_ids: ids of the images to read (unique; all of them across ranks).
        train: training (shuffled, augmented, equal full steps per rank) or evaluation.
        rank: this process's rank.
        world_size: number of processes.
        device: where the batches go.
        seed: seed of shuffling and augmentation.
        augment: apply the training preset (default: `train`). ``train=False, augment=True`` reads every id
            once in fixed order with the training views of the set epoch (the teacher-outputs job).

    Returns:
        The loader; call ``set_epoch(e)`` before each training epoch.
    """
    backend = resolve_backend(cfg.data.backend, rank)
    plan = EpochPlan(
        image_ids,
        batch_size=cfg.train.batch_size,
        train=train,
        rank=rank,
        world_size=world_size,
        seed=seed,
        max_steps=cfg.train.max_steps_per_epoch if train else 0,
    )
    if backend == "synthetic":
        return SyntheticLoader(cfg, reader, plan, device)
    if reader is None:
        raise LoaderError(f"backend {backend} needs a ShardReader (only 'synthetic' runs without shards)")
    preset = build_preset(cfg, train if augment is None else augment)
    if backend == "torch":
        return TorchLoader(cfg, reader, plan, preset, device)
    if device.type == "cuda" and cfg.data.num_workers == 0:
        log.info("data.num_workers=0: DALI needs at least 1 Python worker, using 1")
    return DaliLoader(cfg, reader, plan, preset, device)


def build_eval_loader(
    cfg: ExperimentConfig,
    reader: ShardReader | None,
    image_ids: Sequence[int] | np.ndarray,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device,
) -> BatchLoader:
    """`build_loader` with ``train=False``: fixed order, every image once across ranks, no augmentation."""
    return build_loader(cfg, reader, image_ids, train=False, rank=rank, world_size=world_size, device=device)
