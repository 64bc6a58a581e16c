"""Section infer: inference img/s of the teacher and the student (`bonehpc.models.info.measure_throughput`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bonehpc.bench.common import median, ratio
from bonehpc.bench.data import BenchData
from bonehpc.bench.options import TARGETS, BenchOptions
from bonehpc.bench.probe import device_label


def bench_infer(opts: BenchOptions, data: BenchData | None, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Section infer: img/s in eval mode, no grad, autocast as in training, of the teacher and the student."""
    from bonehpc.models import create_model
    from bonehpc.models.info import count_gflops, count_params, measure_throughput
    from bonehpc.train import amp_dtype_of

    amp_dtype = amp_dtype_of(opts.amp, dev)
    cl = dev.type == "cuda" and opts.channels_last
    out: dict[str, Any] = {
        "device": device_label(dev),
        "image_size": opts.image_size,
        "batch_size": opts.batch_size,
        "steps": opts.steps,
        "repeats": opts.repeats,
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "channels_last": cl,
        "models": {},
    }
    for role, name in (("teacher", opts.teacher), ("student", opts.student)):
        model = create_model(name)
        rates = []
        # no_grad: measure_throughput only calls the model; with grad on, every forward would also record
        # the autograd graph and keep its activations (not inference).
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            for _ in range(opts.repeats):
                rates.append(
                    measure_throughput(
                        model, opts.image_size, opts.batch_size, dev, opts.steps, max(1, opts.warmup), channels_last=cl
                    )
                )
        out["models"][role] = {
            "model": name,
            "params": count_params(model),
            "gflops": round(count_gflops(model, opts.image_size), 4),
            "img_s": round(median(rates), 1),
            "img_s_repeats": [round(r, 1) for r in rates],
        }
        del model
    out["ratio"] = ratio(out["models"]["student"]["img_s"], out["models"]["teacher"]["img_s"], 2)
    out["target_ratio"] = TARGETS["infer"]
    out["meets_target"] = out["ratio"] is not None and out["ratio"] >= TARGETS["infer"]
    return out
