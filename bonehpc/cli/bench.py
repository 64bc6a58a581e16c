"""`bonehpc bench`: benchmarks whose ratios are measured side by side in one run (JSON + a table)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from bonehpc.bench.options import SECTIONS  # torch-free


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(sub: argparse._SubParsersAction) -> None:
    """Add `bonehpc bench WHAT` to the `bonehpc` subparsers."""
    p = sub.add_parser(
        "bench",
        help="benchmarks: packing, shard reads, loaders, train/KD/inference steps, DDP (ratios side by side)",
        description="Measure on this machine, in one run, each figure next to the one it is compared with: "
        "packing vs decode-only img/s; warm shard reads vs PNG decode; each loader backend alone; the training "
        "step of teacher, student and KD on a device-resident batch (ceiling) vs end to end per backend, eager "
        "and torch.compile; teacher vs student inference; DDP 1 vs N processes; albumentations vs DALI parity. "
        "Synthetic data is generated and packed in --workdir (default: a temporary folder). Writes one JSON "
        "file (--out) and prints a Markdown table. Defaults are small, for a CPU machine; on a GPU use e.g. "
        "--image-size 224 --batch-size 256 --steps 20 --warmup 5 (bench/gpu.sh does). Exit code 1 when a "
        "section failed (the others are still measured and written).",
    )
    p.add_argument("what", choices=("all", *SECTIONS), help="all sections, or one of them")
    p.add_argument("--out", type=Path, help="JSON file to write (default runs/bench/bench-<host>-<date>.json)")
    p.add_argument("--workdir", default="", help="folder for the synthetic data and shards, kept (default: temporary)")
    p.add_argument("--image-size", type=int, default=64, help="network input side (64)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step and process (16)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per repeat (4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first; they include compilation (2)")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per figure, the median is reported (5)")
    p.add_argument("--loader-steps", type=int, default=24, help="timed batches of each loader alone (24)")
    p.add_argument("--patients", type=int, default=80, help="synthetic patients, ~3.6 images each (80)")
    p.add_argument("--max-side", type=int, default=256, help="longest side of the synthetic PNGs (256)")
    p.add_argument("--pack-size", type=int, default=0, help="packed image side (0: image size x 256/224)")
    p.add_argument("--backends", type=_csv, default=("dali", "torch"), help="loader backends, comma separated")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure torch.compile (default: on with a GPU; off on CPU, said so in the output)",
    )
    p.add_argument("--modes", type=_csv, help="exactly these train modes, e.g. 'compile' (overrides --compile)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="train.amp (auto)")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels_last models and batches on GPU (default on)",
    )
    p.add_argument("--teacher", default="resnet50", help="teacher model (resnet50)")
    p.add_argument("--student", default="hybrid_small", help="student model (hybrid_small)")
    p.add_argument(
        "--roles",
        type=_csv,
        default=("teacher", "student", "kd", "kd_cached", "outputs"),
        help="train steps to measure (teacher,student,kd,kd_cached,outputs: kd_cached = student + cached teacher "
        "logits, outputs = the teacher-outputs job's inference)",
    )
    p.add_argument("--kd", default="soft", choices=("soft", "hard"), help="distillation kind of the KD step")
    p.add_argument("--workers", type=int, default=0, help="loader workers (0: min(8, cores - 1))")
    p.add_argument("--pack-workers", type=int, default=0, help="packing processes (0: all cores)")
    p.add_argument("--read-images", type=int, default=1000, help="images read by the reads benchmark (1000)")
    p.add_argument("--ddp-procs", type=int, default=0, help="processes of the DDP figure (0: GPUs, or 2 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--omp-passive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="set OMP_WAIT_POLICY=PASSIVE unless already set (default on: on a shared, busy CPU, spinning "
        "OpenMP threads slowed CPU steps 10x or more; recorded in the JSON)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="where to run (auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and loaders")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.omp_passive:  # before torch (and its OpenMP runtime) is imported by bonehpc.bench
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from bonehpc.bench import (
        BenchError,
        BenchOptions,
        default_out_path,
        format_table,
        run_benchmarks,
        write_result,
    )

    modes: tuple[str, ...] = args.modes or ()
    if not modes and args.compile is not None:
        modes = ("eager", "compile") if args.compile else ("eager",)
    try:
        # Every BenchOptions field is a flag of the same name (argparse dest), --modes/--compile folded into modes.
        names = [f.name for f in dataclasses.fields(BenchOptions) if f.name != "modes"]
        opts = BenchOptions(modes=modes, **{name: getattr(args, name) for name in names})
        sections = SECTIONS if args.what == "all" else (args.what,)
        result = run_benchmarks(sections, opts)
    except BenchError as err:
        print(f"bonehpc bench: {err}")
        return 2
    out = write_result(result, args.out or default_out_path())
    print(format_table(result))
    print(f"\nwritten: {out}")
    return 1 if result["errors"] else 0
