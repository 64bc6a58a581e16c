"""`bonehpc report`, `bonehpc predict` and `bonehpc export` (light module: the work is imported when a command runs)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("bonehpc.cli.report")


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "report",
        help="aggregated report of an experiment: runs/EXP/report/index.html (+ report.md and CSV tables)",
        description="Cross-validation and holdout metrics at image and study level, per body part kappa, curves, "
        "teacher vs student, tuning study, Slurm accounting and reproducibility, from the files of runs/EXP. "
        "Missing folds or results are marked, not fatal.",
    )
    r.add_argument("--exp", required=True, help="experiment name (the folder under --run-root)")
    r.add_argument("--run-root", default="runs", help="parent folder of experiments (default: runs)")
    r.set_defaults(func=_report)

    p = sub.add_parser(
        "predict",
        help="abnormality probabilities per image and per study for new X-rays (optional Grad-CAM overlays)",
        description="Preprocesses like training's evaluation path (gray decode, square at the pack size, resize, "
        "normalise). Writes OUT (one row per image) and OUT_studies.csv (study = image folder, probability = mean "
        "of its images, abnormal above --threshold). Unreadable images are listed with a reason.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint (.pt), run folder (uses best.pt) or experiment folder (fold ensemble of --role)",
    )
    p.add_argument(
        "--role", default="student", choices=("teacher", "student", "baseline"), help="role for an experiment folder"
    )
    p.add_argument("--input", required=True, help="folder of PNG/JPEG images (recursive) or a CSV of image paths")
    p.add_argument("--out", default="preds.csv", help="per-image output CSV (default preds.csv)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    p.add_argument(
        "--gradcam",
        metavar="DIR",
        help="write Grad-CAM overlays of abnormal studies' images here (source and overlay side by side, at the "
        "source's resolution)",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="apply the temperature and bias that `bonehpc evaluate` fitted on the experiment's out-of-fold "
        "predictions (calibration.json in the experiment folder; off by default: probabilities are the model's own)",
    )
    p.add_argument(
        "--threshold",
        default="default",
        help="call abnormal above: oof (the role's out-of-fold operating point that `bonehpc evaluate` stored, "
        "maximising study kappa), youden (its Youden's J cut), 0.5 (MURA protocol) or a number; default: oof when "
        "the experiment has one, else 0.5. The output line says which was used",
    )
    p.set_defaults(func=_predict)

    e = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (dynamic batch) and check it against PyTorch with onnxruntime",
    )
    e.add_argument("--model", required=True, help="checkpoint file (best.pt / last.pt) or a run folder (its best.pt)")
    e.add_argument("--out", required=True, help="output .onnx path")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, the lowest torch 2.14 emits)")
    e.add_argument("--atol", type=float, default=1e-4, help="max allowed |logit difference| (default 1e-4)")
    e.set_defaults(func=_export)


def _input_error(command: str, message: str) -> int:
    """One line on stderr, exit code INPUT_ERROR_EXIT_CODE (as bonehpc.cli.main does for bonehpc's errors)."""
    from bonehpc.constants import INPUT_ERROR_EXIT_CODE

    print(f"bonehpc {command}: {message.splitlines()[0] if message else 'error'}", file=sys.stderr)
    return INPUT_ERROR_EXIT_CODE


def _report(args: argparse.Namespace) -> int:
    from bonehpc.paths import JOBS_REGISTRY, RUN_CONFIG
    from bonehpc.report import build_report

    exp_dir = Path(args.run_root) / args.exp
    if not exp_dir.is_dir():
        return _input_error("report", f"experiment folder not found: {exp_dir}")
    # the report goes into <folder>/report/: only into a folder that bonehpc's runs made (its config, its
    # jobs.json, or a run's saved config), never into any folder --exp/--run-root happen to name
    if not any((exp_dir / f).is_file() for f in (RUN_CONFIG, JOBS_REGISTRY)) and not any(
        exp_dir.glob(f"*/*/{RUN_CONFIG}")
    ):
        return _input_error(
            "report", f"{exp_dir} is not an experiment folder (no {RUN_CONFIG}, {JOBS_REGISTRY} or runs in it)"
        )
    index = build_report(exp_dir)
    print(index)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from bonehpc.checkpoint import CheckpointError
    from bonehpc.predict import PredictError, predict, studies_csv_path

    try:
        df = predict(
            args.model,
            args.input,
            args.out,
            args.batch_size,
            args.device,
            args.gradcam,
            role=args.role,
            calibrate=args.calibrate,
            threshold=args.threshold,
        )
    except (PredictError, CheckpointError) as err:
        return _input_error("predict", str(err))
    st = df.attrs["studies"]
    bad = int((df.status != "ok").sum())
    print(
        f"{len(df)} images ({bad} unreadable), {len(st)} studies, {int((st.pred == 1).sum())} called abnormal; "
        f"wrote {args.out} and {studies_csv_path(args.out)}"
        + (
            f" (calibrated: temperature {df.attrs['temperature']:.3f}, bias {df.attrs.get('bias', 0.0):+.3f})"
            if df.attrs.get("temperature")
            else ""
        )
        + f"; threshold {df.attrs['threshold']:.4f}: {df.attrs['threshold_source']}"
    )
    return 1 if bad == len(df) else 0


def _export(args: argparse.Namespace) -> int:
    from bonehpc.checkpoint import CheckpointError
    from bonehpc.export import ExportError, export_onnx

    try:
        info = export_onnx(args.model, args.out, opset=args.opset, atol=args.atol)
    except (ExportError, CheckpointError) as err:
        return _input_error("export", str(err))
    print(
        f"{info['path']}: opset {info['opset']}, input [B, 3, {info['image_size']}, {info['image_size']}], "
        f"max |logit diff| vs PyTorch {info['max_abs_diff']:.2e}"
    )
    return 0
