"""Sections pack and reads: packing vs decode-only img/s, and warm shard reads vs PNG decoding, same images.

Torch-free on purpose: the decode-only pool workers import this module to run `_decode_task`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pandas as pd

from bonehpc.bench.data import BenchData
from bonehpc.bench.options import TARGETS, BenchError, BenchOptions
from bonehpc.bench.probe import cpu_label
from bonehpc.data.images import RejectedImageError, read_gray8
from bonehpc.data.pack import _manifest_of, _one_cv2_thread, _pool, pack_dataset
from bonehpc.data.shards import ShardReader

if TYPE_CHECKING:
    import torch


def _decode_task(root: str, paths: list[str], min_side: int) -> int:
    n = 0
    for p in paths:
        try:
            read_gray8(Path(root) / p, min_side, root=root)  # as the packer reads it (inside the root only)
            n += 1
        except RejectedImageError:
            pass
    return n


def _decode_only(root: Path, chunks: list[list[str]], workers: int, min_side: int) -> float:
    t0 = time.perf_counter()
    if workers <= 1 or len(chunks) <= 1:
        with _one_cv2_thread():
            for c in chunks:
                _decode_task(str(root), c, min_side)
    else:
        with _pool(min(workers, len(chunks))) as pool:
            list(pool.map(_decode_task, [str(root)] * len(chunks), chunks, [min_side] * len(chunks)))
    return time.perf_counter() - t0


def _alternate_runs(
    root: Path, manifest: pd.DataFrame, per_shard: int, workers: int, pack_size: int, repeats: int, tmp: Path
) -> dict[str, Any]:
    """Decode-only and pack runs, alternating; wall and CPU seconds of each, and the rejected count."""
    paths = manifest["path"].astype(str).tolist()
    chunks = [paths[i : i + per_shard] for i in range(0, len(paths), per_shard)]
    runs: dict[str, Any] = {"decode": [], "pack": [], "decode_cpu": [], "pack_cpu": [], "rejected": 0}
    for r in range(max(1, repeats)):
        c0 = time.process_time()
        runs["decode"].append(_decode_only(root, chunks, workers, 0))
        runs["decode_cpu"].append(time.process_time() - c0)
        c0 = time.process_time()
        t0 = time.perf_counter()
        summary = pack_dataset(
            root,
            tmp / f"shards{r}",
            manifest=manifest,
            pack_size=pack_size,
            images_per_shard=per_shard,
            workers=workers,
            max_reject_frac=1.0,
            min_side=0,
            progress=False,
        )
        runs["pack"].append(time.perf_counter() - t0)
        runs["pack_cpu"].append(time.process_time() - c0)
        runs["rejected"] = summary.n_rejected
        shutil.rmtree(tmp / f"shards{r}", ignore_errors=True)
    return runs


def benchmark_pack(
    mura_root: str | Path,
    workers: int,
    limit: int | None = None,
    pack_size: int = 256,
    images_per_shard: int | None = None,
    workdir: str | Path | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
    """Pack throughput next to decode-only throughput: same images, same processes, same task split.

    Decode-only reads each file and converts it to 8-bit gray (what packing must do at the least);
    packing also resizes, writes HDF5 shards, fsyncs and hashes them, and writes the index. Both
    include the start of their process pool and read from a warm page cache. They alternate
    `repeats` times and the fastest run of each counts (the least disturbed by other load on the
    machine). Packs go to a temporary folder (under `workdir` if given), removed after.

    Returns a dict with images, workers, pack_img_per_s, decode_img_per_s, ratio (pack / decode), the
    times of every run; with workers=1 also CPU seconds and cpu_ratio. `images_per_shard` defaults to
    enough for 4 tasks per worker, at most 2048; `limit` takes the first images of the manifest.
    """
    from bonehpc.data.mura import locate

    root = locate(mura_root).resolve()
    manifest = _manifest_of(root)
    if limit is not None:
        manifest = manifest.iloc[:limit].reset_index(drop=True)
    n = len(manifest)
    per_shard = images_per_shard or max(1, min(2048, -(-n // (4 * max(1, workers)))))
    for p in manifest["path"].astype(str):  # page cache: both sides read from memory
        with contextlib.suppress(OSError):
            (root / p).read_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="bonehpc-bench-pack-", dir=workdir))
    try:
        runs = _alternate_runs(root, manifest, per_shard, workers, pack_size, repeats, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    decode_s, pack_s = min(runs["decode"]), min(runs["pack"])
    extra: dict[str, Any] = {}
    if workers <= 1:
        # In-process runs: CPU seconds are also known, and other load on the machine hardly moves them.
        dcpu, pcpu = min(runs["decode_cpu"]), min(runs["pack_cpu"])
        extra = {"decode_cpu_s": round(dcpu, 3), "pack_cpu_s": round(pcpu, 3), "cpu_ratio": round(dcpu / pcpu, 3)}
    return {
        "images": n,
        "workers": workers,
        "pack_size": pack_size,
        "images_per_shard": per_shard,
        "decode_s": round(decode_s, 3),
        "pack_s": round(pack_s, 3),
        "decode_runs_s": [round(t, 3) for t in runs["decode"]],
        "pack_runs_s": [round(t, 3) for t in runs["pack"]],
        "decode_img_per_s": round(n / decode_s, 1),
        "pack_img_per_s": round(n / pack_s, 1),
        "ratio": round(decode_s / pack_s, 3),
        "rejected": runs["rejected"],
        "target_ratio": TARGETS["pack"],
        **extra,
    }


def benchmark_reads(shards_dir: str | Path, n: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Warm random-access shard reads next to decoding the original PNGs of the same images (one process).

    The shard reads run twice and the second (warm: page cache and open handles) pass is timed; the
    PNGs are also read once before timing, so both sides read from the page cache. `n` images are
    drawn (with replacement when the set is smaller) in an order seeded by `seed`; the packed folder's
    manifest.json names the source data set.

    Returns a dict with images, shard_img_per_s, png_img_per_s, ratio (shard / png).
    """
    reader = ShardReader(shards_dir)
    rng = np.random.default_rng(seed)
    ids = reader.image_ids
    picks = rng.choice(ids, size=n, replace=len(ids) < n)
    root = Path(reader.info["mura_root"])
    pos = reader.index.set_index("image_id")["path"]
    paths = [str(root / pos[i]) for i in picks]
    for i in picks:
        reader.read(int(i))
    t0 = time.perf_counter()
    for i in picks:
        reader.read(int(i))
    shard_s = time.perf_counter() - t0
    for p in set(paths):  # into the page cache, so both sides read from memory
        Path(p).read_bytes()
    t0 = time.perf_counter()
    for p in paths:
        img = cv2.imread(p, cv2.IMREAD_UNCHANGED)
        if img is None:
            raise BenchError(f"benchmark_reads: {p} cannot be decoded")
    png_s = time.perf_counter() - t0
    reader.close()
    return {
        "images": n,
        "pack_size": reader.pack_size,
        "shard_s": round(shard_s, 4),
        "png_s": round(png_s, 4),
        "shard_img_per_s": round(n / shard_s, 1),
        "png_img_per_s": round(n / png_s, 1),
        "ratio": round(png_s / shard_s, 2),
        "target_ratio": TARGETS["reads"],
    }


def bench_pack(opts: BenchOptions, data: BenchData, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Section pack: packing img/s vs decode-only img/s of the same images, same number of processes (CPU)."""
    res = benchmark_pack(
        data.mura_root, workers=opts.pack_workers or opts.cores, pack_size=opts.resolved_pack_size, workdir=workdir
    )
    res["meets_target"] = res["ratio"] >= res["target_ratio"]
    return {"device": cpu_label(), "max_side": opts.max_side, **res}


def bench_reads(opts: BenchOptions, data: BenchData, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Section reads: warm random-access shard reads vs decoding the original PNGs (one process, CPU)."""
    res = benchmark_reads(data.shards, n=opts.read_images, seed=opts.seed)
    res["meets_target"] = res["ratio"] >= res["target_ratio"]
    return {"device": cpu_label(), "max_side": opts.max_side, **res}
