"""`bonehpc demo` (the whole pipeline on synthetic data) and `bonehpc config` (show / describe the config)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from bonehpc.cli import add_config_args, load_cfg
from bonehpc.constants import INPUT_ERROR_EXIT_CODE

log = logging.getLogger("bonehpc.demo")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline end to end on synthetic MURA-layout data (local executor, CPU)",
        description="synth -> manifest -> folds -> pack -> teacher+student per fold (+ final model) -> holdout "
        "evaluation -> report -> predict. Every step is resumable: running it again reuses what is done.",
    )
    add_config_args(p)
    p.add_argument("--patients", type=int, default=150, help="synthetic patients to generate (default 150)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    p.set_defaults(func=_demo)

    c = sub.add_parser("config", help="print the resolved config, or every key with its meaning")
    add_config_args(c)
    c.add_argument("--describe", action="store_true", help="list every config key, its default and its meaning")
    c.set_defaults(func=_config)


def _config(args: argparse.Namespace) -> int:
    import yaml

    from bonehpc.config import describe, to_dict

    if args.describe:
        print(describe())
    else:
        print(yaml.safe_dump(to_dict(load_cfg(args)), sort_keys=False), end="")
    return 0


def _step(name: str) -> float:
    print(f"\n=== {name}", flush=True)
    return time.perf_counter()


def _demo(args: argparse.Namespace) -> int:
    if not args.config:
        args.config = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    cfg = load_cfg(args)
    need = max(10, 4 * cfg.data.num_folds)  # every fold needs train patients; a fifth go to the valid split
    if args.patients < need:
        print(
            f"bonehpc demo: --patients {args.patients}: need at least {need} for data.num_folds="
            f"{cfg.data.num_folds} (train patients in every fold, and a valid split)",
            file=sys.stderr,
        )
        return INPUT_ERROR_EXIT_CODE
    from jobs.demo import run_demo

    return run_demo(cfg, patients=args.patients, seed=args.seed, step=_step)
