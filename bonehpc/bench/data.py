"""The benchmark data: a synthetic MURA-layout set packed into shards, and the config the sections read."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonehpc.bench.options import BenchError, BenchOptions

log = logging.getLogger(__name__)


@dataclass
class BenchData:
    """The synthetic data set and its shards used by one run."""

    mura_root: Path
    shards: Path
    images: int
    generate_s: float = 0.0
    pack_s: float = 0.0


def prepare_data(opts: BenchOptions, workdir: Path) -> BenchData:
    """Generate the synthetic MURA-layout set and pack it (both reused when already in `workdir`)."""
    from bonehpc.data.mura import build_manifest
    from bonehpc.data.pack import pack_dataset
    from bonehpc.data.shards import ShardReader
    from bonehpc.data.synthetic import generate

    tag = f"p{opts.patients}-s{opts.max_side}-seed{opts.seed}"
    root = workdir / f"synth-{tag}"
    shards = workdir / f"shards-{tag}-px{opts.resolved_pack_size}"
    t0 = time.perf_counter()
    if not (root / "MURA-v1.1" / "valid_labeled_studies.csv").is_file():
        generate(root, patients=opts.patients, seed=opts.seed, max_side=opts.max_side, overwrite=True)
    gen_s = time.perf_counter() - t0
    n = len(build_manifest(root))
    t0 = time.perf_counter()
    if not (shards / "manifest.json").is_file():
        pack_dataset(
            root,
            shards,
            pack_size=opts.resolved_pack_size,
            images_per_shard=max(64, -(-n // max(1, opts.cores))),
            workers=opts.pack_workers or opts.cores,
            max_reject_frac=1.0,  # tiny synthetic images may fall below the packer's minimum side: not an error here
            progress=False,
        )
    pack_s = time.perf_counter() - t0
    packed = len(ShardReader(shards))
    need = opts.batch_size * max(1, opts.ddp_procs)
    if packed < opts.batch_size:
        raise BenchError(f"{packed} packed images < batch size {opts.batch_size}: raise --patients (need {need}+)")
    log.info("bench data: %d images (%d packed at %d px) in %s", n, packed, opts.resolved_pack_size, workdir)
    return BenchData(root, shards, packed, round(gen_s, 2), round(pack_s, 2))


def bench_config(opts: BenchOptions, data: BenchData | None, *, workers: int | None = None) -> Any:
    """The ExperimentConfig the loaders and the training step read (sizes from the options)."""
    from bonehpc.config import load_config

    items = [
        f"data.image_size={opts.image_size}",
        f"data.pack_size={opts.resolved_pack_size}",
        f"data.num_workers={opts.loader_workers if workers is None else workers}",
        f"train.batch_size={opts.batch_size}",
        f"train.amp={opts.amp}",
        f"train.channels_last={str(opts.channels_last).lower()}",
        f"train.seed={opts.seed}",
        f"distill.kind={opts.kd}",
        "data.verify=none",
    ]
    if data is not None:
        items += [f"data.shards={data.shards}", f"data.mura_root={data.mura_root}"]
    return load_config(None, items)
