"""`bonehpc pack` and `bonehpc verify`: pack PNGs into HDF5 shards, check a shard folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bonehpc.cli import add_config_args, load_cfg


def register(sub: argparse._SubParsersAction) -> None:
    """Add the pack and verify commands to the `bonehpc` subparsers."""
    p = sub.add_parser(
        "pack",
        help="pack a MURA-layout data set into HDF5 shards (parallel, resumable)",
        description="Decode every image of the manifest with OpenCV, convert it to 8-bit gray, make it square "
        "(letterbox or stretch, INTER_AREA) and write HDF5 shards + index.csv + manifest.json. Settings come "
        "from --config (data.mura_root, data.shards, data.pack_size, data.fit, data.compression, "
        "data.images_per_shard, data.max_reject_frac, data.min_side, data.num_workers) or from --mura-root/--out; "
        "the flags below override both. A re-run keeps complete shards that match and redoes the rest. Unusable images "
        "are listed in OUT/rejected.csv; exit code 1 when more than --max-reject-frac of them are rejected.",
    )
    add_config_args(p)
    p.add_argument("--mura-root", type=Path, help="folder that contains MURA-v1.1/ (default: data.mura_root)")
    p.add_argument("--out", type=Path, help="shard folder to write (default: data.shards)")
    p.add_argument("--manifest", type=Path, help="manifest CSV to pack (default: built from the MURA CSVs)")
    p.add_argument("--workers", type=int, help="packing processes, one shard each (default: data.num_workers, >= 1)")
    p.add_argument("--pack-size", type=int, help="side of the stored square images (default: data.pack_size)")
    p.add_argument("--fit", choices=("letterbox", "stretch"), help="how images are made square (default: data.fit)")
    p.add_argument("--compression", choices=("none", "lzf"), help="HDF5 filter (default: data.compression)")
    p.add_argument("--images-per-shard", type=int, help="images per shard file (default: data.images_per_shard)")
    p.add_argument(
        "--max-reject-frac", type=float, help="fail above this fraction of rejected images (data.max_reject_frac)"
    )
    p.add_argument("--min-side", type=int, help="reject images whose shorter side is below this (data.min_side)")
    p.add_argument("--quiet", action="store_true", help="no per-shard progress lines")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser(
        "verify",
        help="check a shard folder (quick: structure and sizes; --full: SHA-256 of every file)",
        description="Quick: manifest.json, index.csv, every shard's size, attributes and dataset shapes. "
        "--full: also the SHA-256 of every shard (a successful full check is remembered in SHARDS/.verified "
        "until a file changes). Exit code 1 naming the shard when something is wrong.",
    )
    p.add_argument("shards", type=Path, help="shard folder written by `bonehpc pack`")
    p.add_argument("--full", action="store_true", help="also hash every shard file")
    p.set_defaults(func=cmd_verify)


def cmd_pack(args: argparse.Namespace) -> int:
    from bonehpc.config import DataConfig
    from bonehpc.data.mura import ManifestError, read_manifest
    from bonehpc.data.pack import PackError, pack_dataset

    data = load_cfg(args).data if args.config or args.overrides or args.params else DataConfig()
    uses_cfg = bool(args.config or args.overrides or args.params)
    if not uses_cfg and (args.mura_root is None or args.out is None):
        print(
            "bonehpc pack: give --config (with data.mura_root, data.shards) or both --mura-root and --out",
            file=sys.stderr,
        )
        return 2
    mura_root = args.mura_root if args.mura_root is not None else Path(data.mura_root)
    out = args.out if args.out is not None else Path(data.shards)
    workers = args.workers if args.workers is not None else max(1, data.num_workers)
    try:
        manifest = read_manifest(args.manifest) if args.manifest else None
        summary = pack_dataset(
            mura_root,
            out,
            manifest=manifest,
            pack_size=args.pack_size or data.pack_size,
            fit=args.fit or data.fit,
            compression=args.compression or data.compression,
            images_per_shard=args.images_per_shard or data.images_per_shard,
            workers=max(1, workers),
            max_reject_frac=data.max_reject_frac if args.max_reject_frac is None else args.max_reject_frac,
            min_side=data.min_side if args.min_side is None else args.min_side,
            progress=not args.quiet,
        )
    except ManifestError as err:
        print(f"bonehpc pack: {err}", file=sys.stderr)
        return 2
    except (PackError, ValueError) as err:
        print(f"bonehpc pack: FAILED: {err}", file=sys.stderr)
        return 1
    if args.quiet:  # otherwise pack_dataset has logged the summary already
        for line in summary.lines():
            print(line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from bonehpc.data.shards import ShardError, verify_shards

    try:
        report = verify_shards(args.shards, full=args.full)
    except ShardError as err:
        print(f"bonehpc verify: FAILED: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
