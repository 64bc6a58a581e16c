"""A benchmark run: the selected sections in order, each failure recorded, and the result written as JSON."""

from __future__ import annotations

import datetime
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bonehpc.bench.data import BenchData, prepare_data
from bonehpc.bench.ddp import bench_ddp
from bonehpc.bench.infer import bench_infer
from bonehpc.bench.loader import bench_loader
from bonehpc.bench.options import FORMAT_VERSION, SECTIONS, BenchError, BenchOptions
from bonehpc.bench.pack import bench_pack, bench_reads
from bonehpc.bench.parity import bench_parity
from bonehpc.bench.probe import machine_info, resolve_device
from bonehpc.bench.train import bench_train, default_modes
from bonehpc.fsio import atomic_write_json

log = logging.getLogger(__name__)

Section = Callable[[BenchOptions, Any, torch.device, Path], dict[str, Any]]
_FUNCS: dict[str, Section] = {
    "pack": bench_pack,
    "reads": bench_reads,
    "loader": bench_loader,
    "train": bench_train,
    "infer": bench_infer,
    "ddp": bench_ddp,
    "parity": bench_parity,
}
_NEEDS_DATA = {"pack", "reads", "loader", "train", "parity"}


def _set_up_torch(opts: BenchOptions, dev: torch.device) -> None:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as bonehpc.train does: fixed shapes, autotuned kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _prepare(opts: BenchOptions, workdir: Path, result: dict[str, Any]) -> BenchData | None:
    """The data of the run, recorded under result['data']; None (and errors.data) when it fails."""
    try:
        data = prepare_data(opts, workdir)
    except Exception as err:  # noqa: BLE001 - the sections without data still run
        log.exception("preparing the benchmark data failed")
        result["errors"]["data"] = f"{type(err).__name__}: {err}"
        return None
    result["data"] = {
        "images": data.images,
        "patients": opts.patients,
        "max_side": opts.max_side,
        "pack_size": opts.resolved_pack_size,
        "generate_s": data.generate_s,
        "pack_s": data.pack_s,
    }
    return data


def _run_sections(
    todo: list[str], opts: BenchOptions, dev: torch.device, workdir: Path, result: dict[str, Any]
) -> None:
    """Prepare the data if a section needs it, then each section in turn (a failure: result["errors"])."""
    data = _prepare(opts, workdir, result) if _NEEDS_DATA & set(todo) else None
    for name in todo:
        if name in _NEEDS_DATA and data is None:
            result["errors"][name] = "no data (see errors.data)"
            continue
        log.info("bench %s ...", name)
        t0 = time.perf_counter()
        try:
            sec = _FUNCS[name](opts, data, dev, workdir)
            sec["elapsed_s"] = round(time.perf_counter() - t0, 1)
            result["sections"][name] = sec
        except Exception as err:  # noqa: BLE001 - recorded; the other sections still run
            log.error("bench %s failed:\n%s", name, traceback.format_exc())
            result["errors"][name] = f"{type(err).__name__}: {err}"


def run_benchmarks(sections: Sequence[str], opts: BenchOptions) -> dict[str, Any]:
    """Run the given sections (in the order of SECTIONS) and return the result dict (see `write_result`).

    A failing section is recorded under ``errors`` (type and message) and the others still run. The
    data goes to opts.workdir (kept), or to a temporary folder removed at the end.
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise BenchError(f"unknown benchmark section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    todo = [s for s in SECTIONS if s in sections]
    dev = resolve_device(opts)
    _set_up_torch(opts, dev)
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "bonehpc_bench": FORMAT_VERSION,
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "options": {
            **asdict(opts),
            "pack_size": opts.resolved_pack_size,
            "workers": opts.loader_workers,
            "modes": list(opts.modes or default_modes(dev)),
            "device": str(dev),
        },
        "sections": {},
        "errors": {},
    }
    tmp = None
    if opts.workdir:
        workdir = Path(opts.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = workdir = Path(tempfile.mkdtemp(prefix="bonehpc-bench-"))
    try:
        _run_sections(todo, opts, dev, workdir, result)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["load_avg_end_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    return result


def default_out_path(root: str | Path = "runs/bench") -> Path:
    """runs/bench/bench-<host>-<YYYYmmdd-HHMMSS>.json."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"bench-{platform.node() or 'host'}-{stamp}.json"


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    """Write the result as JSON (atomically, `bonehpc.fsio`)."""
    return atomic_write_json(path, result, indent=1)
