"""Section loader: img/s of each training loader backend alone (batches on the device, augmentation on)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from bonehpc.bench.common import Endless, sync
from bonehpc.bench.data import BenchData, bench_config
from bonehpc.bench.options import BenchOptions
from bonehpc.bench.probe import backend_missing, device_label
from bonehpc.config import ExperimentConfig, apply_overrides
from bonehpc.data.loaders import build_loader
from bonehpc.data.shards import ShardReader

log = logging.getLogger(__name__)


def benchmark_loader(
    cfg: ExperimentConfig,
    reader: ShardReader,
    backend: str,
    steps: int,
    *,
    warmup: int = 3,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Images per second of a training loader alone (no model: end to end is the train section's figure).

    Args:
        cfg: config (image size, batch size, workers, augmentation).
        reader: shards to read (all their images are used).
        backend: dali, torch, synthetic or auto.
        steps: timed batches (after ``warmup`` batches, running over epoch boundaries).
        warmup: untimed batches first (worker start, first allocations).
        device: default: cuda when available, else cpu.

    Returns:
        dict with backend, device, image_size, batch_size, num_workers, steps, startup_s, loader_img_s.
    """
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = apply_overrides(cfg, {"data.backend": backend, "train.max_steps_per_epoch": 0})
    bs = cfg.train.batch_size
    t0 = time.perf_counter()
    stream = Endless(build_loader(cfg, reader, reader.image_ids, train=True, device=dev, seed=cfg.train.seed))
    result: dict[str, Any] = {
        "backend": stream.loader.backend,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "image_size": cfg.data.image_size,
        "batch_size": bs,
        "num_workers": cfg.data.num_workers,
        "steps": steps,
    }
    try:
        it = iter(stream)
        next(it)
        sync(dev)
        result["startup_s"] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            next(it)
        sync(dev)
        t = time.perf_counter()
        for _ in range(steps):
            next(it)
        sync(dev)
        result["loader_img_s"] = bs * steps / (time.perf_counter() - t)
    finally:
        stream.close()
    return result


def bench_loader(opts: BenchOptions, data: BenchData, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Section loader: training loader img/s of each backend alone (batches on `dev`, augmentation on)."""
    cfg = bench_config(opts, data)
    reader = ShardReader(data.shards)
    out: dict[str, Any] = {"device": device_label(dev), "backends": {}}
    for backend in opts.backends:
        missing = backend_missing(backend)
        if missing:
            out["backends"][backend] = {"skipped": missing}
            continue
        try:
            r = benchmark_loader(cfg, reader, backend, opts.loader_steps, warmup=max(3, opts.warmup), device=dev)
            r["loader_img_s"] = round(r["loader_img_s"], 1)
            r["startup_s"] = round(r["startup_s"], 2)
            out["backends"][backend] = r
        except Exception as err:  # noqa: BLE001 - one backend failing must not hide the other
            log.exception("loader benchmark %s failed", backend)
            out["backends"][backend] = {"error": f"{type(err).__name__}: {err}"}
    out["note"] = "loader alone: CPU-worker queues prefetch during warm-up; compare end-to-end train figures too"
    return out
