"""Section parity: albumentations (CPU) vs DALI (GPU fp16 NHWC, or CPU-only) eval preset on the same images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bonehpc.bench.data import BenchData, bench_config
from bonehpc.bench.options import BenchOptions
from bonehpc.bench.probe import backend_missing, device_label
from bonehpc.data.shards import ShardReader


def _dali_batch(preset: Any, images: list[np.ndarray], dev: torch.device, seed: int) -> torch.Tensor:
    """The DALI eval pipeline's output for `images`, as one NCHW batch (GPU: a channels_last view)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from bonehpc.augment.dali import build_dali_pipeline

    n = len(images)
    gpu = dev.type == "cuda"

    def source(info: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if info.idx_in_epoch >= n:
            raise StopIteration
        return images[info.idx_in_epoch][..., None], np.zeros(1, np.int64), np.array([info.idx_in_epoch], np.int64)

    pipe = build_dali_pipeline(
        preset,
        source,
        batch_size=n,
        device_id=dev.index if gpu else None,
        seed=seed,
        parallel=False,
        output_dtype="float16" if gpu else "float32",
        output_layout="HWC" if gpu else "CHW",
    )
    x: torch.Tensor = next(iter(DALIGenericIterator(pipe, ["x", "y", "id"])))[0]["x"]
    return x.permute(0, 3, 1, 2) if gpu else x  # NHWC memory as a channels_last NCHW view, no copy


def bench_parity(opts: BenchOptions, data: BenchData, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Section parity: the largest difference between the two eval pipelines, in gray levels."""
    from bonehpc.augment.presets import build_preset
    from bonehpc.config import IMAGENET_STD

    out: dict[str, Any] = {"device": device_label(dev), "image_size": opts.image_size}
    missing = backend_missing("dali") or backend_missing("torch")
    if missing:
        out["skipped"] = missing
        return out
    from bonehpc.augment.albu import apply_albu, build_albu_transform  # albumentations: imports, checked above

    reader = ShardReader(data.shards)
    images = [reader.read(int(i)) for i in reader.image_ids[: min(32, len(reader))]]
    preset = build_preset(bench_config(opts, data), train=False)
    gpu = dev.type == "cuda"
    x = _dali_batch(preset, images, dev, opts.seed)
    out["dali_output"] = {
        "dtype": str(x.dtype).replace("torch.", ""),
        "device": str(x.device),
        "channels_last_view": bool(x.is_contiguous(memory_format=torch.channels_last)) and not x.is_contiguous(),
    }
    d = x.float().cpu().numpy()
    tf = build_albu_transform(preset, seed=opts.seed)
    a = np.stack([apply_albu(tf, im).numpy() for im in images])
    diff = np.abs(a - d)
    one_level = 1.0 / (255.0 * min(IMAGENET_STD))  # one gray level after normalisation
    tol = one_level * 1.001 + (0.01 if gpu else 0.0)  # + fp16 rounding of values up to ~2.6
    out.update(
        images=len(images),
        max_abs_diff=round(float(diff.max()), 5),
        mean_abs_diff=round(float(diff.mean()), 6),
        max_diff_gray_levels=round(float(diff.max()) / one_level, 3),
        tolerance=round(tol, 5),
        within_tolerance=bool(diff.max() <= tol),
    )
    return out
