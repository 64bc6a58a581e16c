"""`bonehpc pack` and `bonehpc verify`: pack PNGs into HDF5 shards, check a shard folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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
        "are listed in OUT/rejected.csv (studies that lost every image in OUT/lost_studies.csv); exit code 1 when "
        "more than --max-reject-frac of them are rejected or the disk fills up. Exit code 2 before anything is "
        "written for bad settings, an --out that is a file or a non-empty folder that is not a bonehpc shard "
        "folder, a pack already running into --out (lock), or too little free space.",
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
    p.add_argument(
        "--cross-split-patients",
        action="store_true",
        help="accept a patient number in both the train and the valid split (data.cross_split_patients; "
        "refused by default: a holdout leak)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="repack an --out packed at another pack_size, fit, compression or min_side",
    )
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser(
        "verify",
        help="check a shard folder (default: full, SHA-256 of every file; --quick: structure and sizes)",
        description="Full (the default): manifest.json (signed with the SHA-256 of every shard and of index.csv), "
        "index.csv, every shard's size, attributes, dataset shapes and SHA-256 (a successful full check is "
        "remembered in SHARDS/.verified until a file changes, so it costs once). --quick: the same without "
        "hashing the shards. Exit code 1 naming the file when something is wrong.",
    )
    p.add_argument("shards", type=Path, help="shard folder written by `bonehpc pack`")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--full", action="store_true", help="hash every file (the default)")
    how.add_argument("--quick", action="store_true", help="structure, sizes and manifest signature only")
    p.set_defaults(func=cmd_verify)


def _given(flag: Any, default: Any) -> Any:
    """The flag's value when it was given (0 is a value, not "unset"), else the config's."""
    return default if flag is None else flag


def _fail(msg: str) -> int:
    print(f"bonehpc pack: {msg}", file=sys.stderr)
    return 2


def cmd_pack(args: argparse.Namespace) -> int:
    from bonehpc.config import DataConfig
    from bonehpc.data.mura import ManifestError, check_manifest, read_manifest
    from bonehpc.data.pack import PackError, PackInputError, check_settings, pack_dataset

    uses_cfg = bool(args.config or args.overrides or args.params)
    data = load_cfg(args).data if uses_cfg else DataConfig()
    if not uses_cfg and (args.mura_root is None or args.out is None):
        return _fail("give --config (with data.mura_root, data.shards) or both --mura-root and --out")
    settings = {
        "pack_size": _given(args.pack_size, data.pack_size),
        "fit": args.fit or data.fit,
        "compression": args.compression or data.compression,
        "images_per_shard": _given(args.images_per_shard, data.images_per_shard),
        "workers": _given(args.workers, max(1, data.num_workers)),
        "max_reject_frac": _given(args.max_reject_frac, data.max_reject_frac),
        "min_side": _given(args.min_side, data.min_side),
    }
    try:
        check_settings(
            settings["pack_size"], settings["images_per_shard"], settings["max_reject_frac"], settings["workers"]
        )
        if settings["min_side"] < 0:
            raise PackInputError(f"min_side must be >= 0, got {settings['min_side']}")
        manifest = read_manifest(args.manifest) if args.manifest else None
        cross = args.cross_split_patients or data.cross_split_patients
        if manifest is not None:
            check_manifest(manifest, args.manifest, cross)  # named here; pack_dataset checks it again (cheap)
        summary = pack_dataset(
            _given(args.mura_root, Path(data.mura_root)),
            _given(args.out, Path(data.shards)),
            manifest=manifest,
            progress=not args.quiet,
            cross_split_patients=cross,
            overwrite=args.overwrite,
            **settings,
        )
    except (ManifestError, PackInputError) as err:
        return _fail(str(err))
    except PackError as err:
        print(f"bonehpc pack: FAILED: {err}", file=sys.stderr)
        return 1
    if args.quiet:  # otherwise pack_dataset has logged the summary already
        for line in summary.lines():
            print(line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from bonehpc.data.shards import ShardError, verify_shards

    try:
        report = verify_shards(args.shards, full=not args.quick)
    except ShardError as err:
        print(f"bonehpc verify: FAILED: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
