"""Loader section helper: img/s of a training loader alone, and end to end with a model's training step."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from bonehpc.config import ExperimentConfig, apply_overrides
from bonehpc.data.loaders import Batch, BatchLoader, build_loader
from bonehpc.data.shards import ShardReader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(loader: BatchLoader, n: int) -> Iterator[Batch]:
    """n batches, running over epoch boundaries (set_epoch advances)."""
    done = 0
    while done < n:
        for batch in loader:
            yield batch
            done += 1
            if done == n:
                return
        loader.set_epoch(loader.epoch + 1)


def benchmark_loader(
    cfg: ExperimentConfig,
    reader: ShardReader,
    backend: str,
    steps: int,
    model_name: str | None = None,
    *,
    warmup: int = 3,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Images per second of a training loader alone, and end to end with a model's training step.

    Args:
        cfg: config (image size, batch size, workers, augmentation).
        reader: shards to read (all their images are used).
        backend: dali, torch, synthetic or auto.
        steps: timed batches (after ``warmup`` batches).
        model_name: timm model for the end-to-end figure (num_classes=2, SGD, bf16 autocast on GPU);
            None measures the loader only.
        warmup: untimed batches first (worker start, first allocations).
        device: default: cuda when available, else cpu.

    Returns:
        dict with backend, device, image_size, batch_size, steps, startup_s, loader_img_s and, with a
        model, model and e2e_img_s.
    """
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = apply_overrides(cfg, {"data.backend": backend, "train.max_steps_per_epoch": 0})
    bs = cfg.train.batch_size
    t0 = time.perf_counter()
    loader = build_loader(cfg, reader, reader.image_ids, train=True, device=dev, seed=cfg.train.seed)
    result: dict[str, Any] = {
        "backend": loader.backend,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "image_size": cfg.data.image_size,
        "batch_size": bs,
        "num_workers": cfg.data.num_workers,
        "steps": steps,
    }
    try:
        it = _batches(loader, warmup + steps)
        next(it)
        _sync(dev)
        result["startup_s"] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            next(it)
        _sync(dev)
        t = time.perf_counter()
        for _ in range(steps):
            next(it)
        _sync(dev)
        result["loader_img_s"] = bs * steps / (time.perf_counter() - t)
        if model_name:
            result.update(_bench_e2e(loader, model_name, steps, warmup, dev))
    finally:
        loader.close()
    return result


def _bench_e2e(loader: BatchLoader, model_name: str, steps: int, warmup: int, dev: torch.device) -> dict[str, Any]:
    import timm

    model = timm.create_model(model_name, num_classes=2, pretrained=False).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = dev.type == "cuda"

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    it = _batches(loader, warmup + steps)
    for _ in range(warmup):
        images, labels, _ids = next(it)
        step(images, labels)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        images, labels, _ids = next(it)
        step(images, labels)
    _sync(dev)
    return {"model": model_name, "e2e_img_s": loader.plan.batch_size * steps / (time.perf_counter() - t)}
