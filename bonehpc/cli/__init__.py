"""The `bonehpc` console script.

Each area module in this package (data, train, slurm, tune, report, bench) has
`register(subparsers)`, adds its subcommands there and sets `func` on each parser. These modules
import nothing heavy at module level, so `bonehpc --help` is fast; the work is imported when a
command runs.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from bonehpc import __version__, offline_env
from bonehpc.config import ConfigError
from bonehpc.constants import INPUT_ERROR_EXIT_CODE

AREAS = ("data", "pack", "train", "slurm", "tune", "report", "bench", "demo")

DESCRIPTION = """\
bonehpc trains and evaluates bone-abnormality detectors on MURA musculoskeletal X-rays on Slurm:
patient-grouped K-fold CV of a ResNet-50 teacher and a distilled CNN+Transformer student,
Optuna tuning as Slurm arrays, sacct-backed status and an aggregated report.

Typical flow:  synth/manifest/folds -> pack -> submit folds -> status -> report
"""


def add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--config FILE, --params FILE and trailing dotlist overrides (train.epochs=3)."""
    p.add_argument("--config", "-c", required=required, help="experiment YAML (defaults < YAML < overrides)")
    p.add_argument("--params", help="YAML of parameter overrides, e.g. tuned best params (applied after --config)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size=32")


def load_cfg(args: argparse.Namespace):  # noqa: ANN201 - returns ExperimentConfig
    """The ExperimentConfig from --config, --params and overrides of a parsed command line."""
    from bonehpc.config import load_config

    return load_config(
        getattr(args, "config", None), getattr(args, "overrides", []) or [], params=getattr(args, "params", None)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bonehpc", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"bonehpc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in AREAS:
        try:
            mod = importlib.import_module(f"bonehpc.cli.{area}")
        except ModuleNotFoundError as err:
            if err.name == f"bonehpc.cli.{area}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    offline_env(hub=args.command != "weights")  # before the commands import torch, timm, albumentations
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname).1s%(asctime)s %(name)s] %(message)s",
        datefmt="%m%d %H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _check_args(args)
        rc = args.func(args)
    except ConfigError as err:
        if args.verbose:
            raise
        print(f"bonehpc: config error: {err}", file=sys.stderr)
        return INPUT_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        line = input_error_line(err)
        if line is None or args.verbose:
            raise
        print(f"bonehpc {args.command}: {line}", file=sys.stderr)
        return INPUT_ERROR_EXIT_CODE
    return int(rc or 0)


def _check_args(args: argparse.Namespace) -> None:
    """Every string of the command line is printable on one line (a NUL or newline never goes further)."""
    from bonehpc.shellsafe import check_text

    for key, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (str, os.PathLike)):
                check_text("key=value" if key == "overrides" else f"--{key.replace('_', '-')}", str(item))


def input_error_line(err: BaseException) -> str | None:
    """One line for an error of the input or the environment, None for a bug (which keeps its traceback).

    Input errors: bonehpc's own exceptions (ShardError, ManifestError, WeightsNotFoundError, ...; their
    message names the input), an OSError about a path (permission denied, a directory where a file is
    due, no such file, disk full), and text that is not UTF-8.
    """
    if type(err).__module__.startswith("bonehpc."):
        return f"{type(err).__name__}: {err}"
    if isinstance(err, OSError) and (err.filename is not None or err.errno == errno.ENOSPC):
        where = "" if err.filename is None else f": {err.filename}"
        where += "" if err.filename2 is None else f" -> {err.filename2}"
        return f"{type(err).__name__}: {err.strerror or err}{where}"
    if isinstance(err, UnicodeDecodeError):
        return f"UnicodeDecodeError: not UTF-8 text ({err.reason} at byte {err.start}); -v shows where it was read"
    return None


if __name__ == "__main__":
    sys.exit(main())
