"""Section ddp: the training step (device-resident batches) in 1 vs N torchrun processes.

GPUs: NCCL, one process per GPU. CPU: gloo, the processes share the cores (labelled so). Each
process is `bonehpc.bench.ddp_worker` (run as `python -m bonehpc.bench ddp-worker`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bonehpc.bench.common import ratio
from bonehpc.bench.data import BenchData
from bonehpc.bench.options import BenchError, BenchOptions
from bonehpc.bench.probe import device_label

REPO = Path(__file__).resolve().parents[2]  # the children import this bonehpc, installed or not


def _run_torchrun(procs: int, opts: BenchOptions, workdir: Path, timeout_s: float) -> dict[str, Any]:
    out = workdir / f"ddp-{procs}.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        "-m",
        "bonehpc.bench",
        "ddp-worker",
        f"--out={out}",
        f"--model={opts.teacher}",
        f"--image-size={opts.image_size}",
        f"--batch-size={opts.batch_size}",
        f"--steps={opts.steps}",
        f"--warmup={opts.warmup}",
        f"--repeats={opts.repeats}",
        f"--amp={opts.amp}",
        f"--seed={opts.seed}",
        f"--device={opts.device}",
    ]
    if not opts.channels_last:
        cmd.append("--no-channels-last")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // procs)))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise BenchError(f"torchrun with {procs} process(es) failed (exit {proc.returncode}): " + " | ".join(tail))
    res: dict[str, Any] = json.loads(out.read_text())
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def bench_ddp(opts: BenchOptions, data: BenchData | None, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Section ddp: the teacher's training step (device-resident batches) in 1 vs N torchrun processes."""
    gpu = dev.type == "cuda"
    n = opts.ddp_procs or (torch.cuda.device_count() if gpu else 2)
    kind = "gpu-nccl" if gpu else "cpu-gloo"
    out: dict[str, Any] = {
        "device": device_label(dev),
        "kind": kind,
        "model": opts.teacher,
        "image_size": opts.image_size,
        "batch_size_per_proc": opts.batch_size,
        "procs": n,
    }
    if gpu and n > torch.cuda.device_count():
        n = torch.cuda.device_count()
        out["procs"] = n
    if n < 2:
        out["skipped"] = f"{n} {'GPU' if gpu else 'process'} only: no scaling to measure (needs 2 or more devices)"
        return out
    if not gpu:
        out["note"] = (
            "CPU: N gloo processes share the same cores (threads split between them); this is a check that "
            "DDP runs and what it costs, not GPU scaling"
        )
    one = _run_torchrun(1, opts, workdir, timeout_s=900)
    many = _run_torchrun(n, opts, workdir, timeout_s=900)
    out["runs"] = {"1": one, str(n): many}
    out["ratio"] = ratio(many["img_s"], one["img_s"], 3)
    out["efficiency"] = round(out["ratio"] / n, 3) if out["ratio"] is not None else None
    return out
