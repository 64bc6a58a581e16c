"""One torchrun process of the DDP benchmark: the training step on a device-resident batch.

Run as `python -m bonehpc.bench ddp-worker --out=... --model=...` (by `bonehpc.bench.ddp`); rank 0
writes the JSON named by --out.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bonehpc import dist
from bonehpc.bench.common import Endless, build_model, median, sync
from bonehpc.bench.data import bench_config
from bonehpc.bench.options import BenchOptions
from bonehpc.fsio import atomic_write_json


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bonehpc.bench ddp-worker")
    p.add_argument("--out", required=True, help="JSON file written by rank 0")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--image-size", type=int, required=True, help="input side")
    p.add_argument("--batch-size", type=int, required=True, help="images per process and step")
    p.add_argument("--steps", type=int, required=True, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, required=True, help="untimed steps")
    p.add_argument("--repeats", type=int, required=True, help="timed windows")
    p.add_argument("--amp", default="auto", help="train.amp")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW on GPU")
    return p.parse_args(argv)


def _join(device: str) -> tuple[dist.DistInfo, int]:
    """Join the torchrun group; CPU: split the cores between the processes. Returns (info, torch threads)."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    info = dist.init_distributed()
    threads = torch.get_num_threads()
    if info.device.type == "cpu":
        threads = max(1, len(os.sched_getaffinity(0)) // info.world_size)
        torch.set_num_threads(threads)
    else:
        torch.backends.cudnn.benchmark = True
    return info, threads


def _train_args(model_name: str, opts: BenchOptions, info: dist.DistInfo) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments of `train_one_epoch` for the DDP-wrapped model."""
    from bonehpc.config import apply_overrides
    from bonehpc.data.loaders import build_loader
    from bonehpc.distill import DistillationLoss, build_task_loss
    from bonehpc.train import amp_dtype_of, build_optimizer, build_scheduler

    dev = info.device
    cfg = apply_overrides(bench_config(opts, None), {"data.backend": "synthetic", "data.num_workers": 0})
    model = build_model(model_name, dev, dev.type == "cuda" and opts.channels_last)
    if info.distributed:
        if dev.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # as bonehpc.train does
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    loss_fn = DistillationLoss(build_task_loss(None), None, "none")
    tcfg = cfg.teacher
    opt = build_optimizer(model, tcfg.optimizer, tcfg.lr, tcfg.weight_decay, tcfg.momentum)
    sched = build_scheduler(opt, 0, 10**9)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.train.amp == "fp16" and dev.type == "cuda")
    ids = np.arange(opts.batch_size * info.world_size * 4)
    loader = build_loader(
        cfg, None, ids, train=True, rank=info.rank, world_size=info.world_size, device=dev, seed=opts.seed
    )
    kw = {"amp_dtype": amp_dtype_of(cfg.train.amp, dev), "grad_clip": cfg.train.grad_clip, "log_every": 10**9}
    return (model, Endless(loader), loss_fn, opt, sched, scaler, dev), kw


def ddp_worker(argv: Sequence[str] | None = None) -> int:
    """One torchrun process of the DDP benchmark: the training step on a device-resident batch."""
    from bonehpc.engine import train_one_epoch

    a = _parse(argv)
    logging.basicConfig(level=logging.WARNING)
    info, threads = _join(a.device)
    dev = info.device
    opts = BenchOptions(
        image_size=a.image_size,
        batch_size=a.batch_size,
        steps=a.steps,
        warmup=a.warmup,
        repeats=a.repeats,
        amp=a.amp,
        channels_last=not a.no_channels_last,
        seed=a.seed,
    )
    args, kw = _train_args(a.model, opts, info)
    train_one_epoch(*args, max_steps=max(1, opts.warmup), header="ddp warm-up", **kw)
    rates = []
    for _ in range(opts.repeats):
        dist.barrier()
        sync(dev)
        t0 = time.perf_counter()
        train_one_epoch(*args, max_steps=opts.steps, header="ddp", **kw)  # ends in an all_reduce: ranks aligned
        sync(dev)
        rates.append(info.world_size * opts.batch_size * opts.steps / (time.perf_counter() - t0))
    if info.is_main:
        res = {
            "world_size": info.world_size,
            "backend": "nccl" if dev.type == "cuda" else ("gloo" if info.distributed else "none"),
            "threads_per_proc": threads,
            "img_s": round(median(rates), 1),
            "img_s_repeats": [round(r, 1) for r in rates],
            "img_s_per_proc": round(median(rates) / info.world_size, 1),
        }
        atomic_write_json(a.out, res, indent=None)
    args[1].close()
    dist.cleanup()
    return 0
