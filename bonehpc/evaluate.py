"""Holdout evaluation on the official valid split: the final models and the fold ensembles.

    bonehpc evaluate --config C                     # every holdout model that can be evaluated
    python -m bonehpc.evaluate --config C --checkpoint runs/x/fold0/teacher/best.pt --fold 0 --out p.csv
    torchrun --nproc_per_node=2 -m bonehpc.evaluate ...   (the same predictions, split over ranks)

Writes `holdout/<model>/predictions.csv` (image_id, study, body_part, label, prob) and
`holdout/<model>/metrics.json` for model in final_teacher, final_student (the `final/<role>/best.pt`
checkpoints) and ensemble_teacher, ensemble_student (mean probability of the fold models of a
role, over the folds whose best.pt exists; the folds used and missing are recorded); with the
optional no-KD baseline (distill.baseline: `bonehpc.paths.experiment_roles`), final_baseline and
ensemble_baseline too.
Before any holdout prediction it fits one temperature and bias per role on the folds' out-of-fold predictions
(`bonehpc.metrics.write_calibration` -> `calibration.json` at the experiment root).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bonehpc import dist
from bonehpc.checkpoint import BEST, build_model_from_checkpoint, load_checkpoint
from bonehpc.config import ExperimentConfig
from bonehpc.constants import INPUT_ERROR_EXIT_CODE, PRED_COLUMNS
from bonehpc.engine import amp_dtype_of, evaluate
from bonehpc.fsio import atomic_write_csv, atomic_write_json
from bonehpc.paths import HOLDOUT_METRICS, HOLDOUT_PREDICTIONS, ExperimentPaths, experiment_roles

log = logging.getLogger("bonehpc.evaluate")  # not __name__: it is "__main__" under `python -m`


def predict_checkpoint(
    cfg: ExperimentConfig, checkpoint: str | Path, image_ids: np.ndarray | list[int], reader: Any = None
) -> pd.DataFrame:
    """Predictions of a checkpoint for `image_ids`, every image once (split over ranks under torchrun).

    Returns:
        DataFrame with image_id, study, body_part, label, prob, sorted by image_id, on every rank; prob is
        corrected for the class weighting the checkpoint records (`bonehpc.metrics.correct_prior`).
    """
    from bonehpc.data.loaders import build_loader
    from bonehpc.data.shards import ShardReader
    from bonehpc.metrics import checkpoint_logit_shift, correct_prior

    info = dist.init_distributed()
    reader = reader if reader is not None else ShardReader(cfg.data.shards)
    state = load_checkpoint(checkpoint)
    model = build_model_from_checkpoint(state).to(info.device)
    if info.device.type == "cuda" and cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    ids = np.asarray(image_ids, dtype=np.int64)
    loader = build_loader(
        cfg,
        reader,
        ids,
        train=False,
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        seed=cfg.train.seed,
    )
    df = evaluate(model, loader, info.device, amp_dtype_of(cfg.train.amp, info.device))
    shift = checkpoint_logit_shift(state)
    if shift is None:
        log.warning(
            "%s records no probability correction (trained before it was recorded): probabilities as is", checkpoint
        )
    else:
        df["prob"] = correct_prior(df["prob"].to_numpy(), shift)
    missing = np.setdiff1d(ids, df["image_id"].to_numpy())
    if len(missing):
        raise RuntimeError(f"{checkpoint}: no prediction for {len(missing)} image(s) (e.g. {missing[0]})")
    meta = reader.index.set_index("image_id")[["study", "body_part"]]
    return df.join(meta, on="image_id")[list(PRED_COLUMNS)]


def _write(out_dir: Path, preds: pd.DataFrame, summary: dict[str, Any]) -> None:
    atomic_write_csv(out_dir / HOLDOUT_PREDICTIONS, preds)
    atomic_write_json(out_dir / HOLDOUT_METRICS, summary)  # last: its presence means the model is evaluated


def _calibrate(paths: ExperimentPaths, cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Temperatures and operating points, fitted on the folds' out-of-fold predictions only, before anything
    looks at the holdout (calibration.json); role -> operating point."""
    from bonehpc.metrics import write_calibration

    calib = write_calibration(paths.root, experiment_roles(cfg), cfg.data.num_folds)
    for role, c in calib["roles"].items():
        op = c["threshold"]
        log.info(
            "%s: temperature %.3f, bias %+.3f (out-of-fold image ECE %.4f -> %.4f), mean probability %.3f "
            "(recalibrated %.3f) vs prevalence %.3f, "
            "operating point %.3f (out-of-fold study kappa %.3f; Youden's J cut %.3f)",
            role,
            c["temperature"],
            c["bias"],
            c["ece_before"],
            c["ece_after"],
            c["mean_prob"],
            c["mean_prob_calibrated"],
            c["prevalence"],
            op["value"],
            op["kappa"],
            op["youden"]["value"],
        )
    return {role: c["threshold"] for role, c in calib["roles"].items()}


def evaluate_holdout(cfg: ExperimentConfig) -> dict[str, dict[str, float]]:
    """Evaluate every holdout model whose checkpoints exist; returns model name -> metrics.

    metrics.json per model: {"model", "kind" (final | ensemble), "role", "checkpoints", "folds_used",
    "folds_missing", "n_images", "status": "completed", "metrics", "threshold", "metrics_oof_threshold"}
    where metrics are the keys of bonehpc.metrics.evaluate_predictions (no prefix) at 0.5 (MURA protocol),
    threshold the role's out-of-fold operating point (calibration.json; None without fold runs) and
    metrics_oof_threshold the same keys at that cut, applied unchanged. A model with no checkpoint at all is
    skipped with a warning and is absent from the result.
    """
    from bonehpc.data.shards import ShardReader

    paths = ExperimentPaths.of(cfg)
    dist.init_distributed()  # the group first: every rank gets rank 0's operating points
    ops = dist.broadcast_object(_calibrate(paths, cfg) if dist.is_main() else None)
    reader = ShardReader(cfg.data.shards)
    valid = reader.index.loc[reader.index["split"] == "valid", "image_id"].to_numpy(np.int64)
    if len(valid) == 0:
        raise ValueError(f"{cfg.data.shards}: no image of the official valid split, nothing to evaluate")
    results: dict[str, dict[str, float]] = {}
    for role in experiment_roles(cfg):
        # The final model of the role: trained on every train patient.
        ckpt = paths.role_dir("final", role) / BEST
        if ckpt.is_file():
            preds = predict_checkpoint(cfg, ckpt, valid, reader)
            results[f"final_{role}"] = _finish(paths, f"final_{role}", "final", role, [ckpt], [], [], preds, ops)
        else:
            log.warning("final_%s: %s not found (train --fold final --role %s)", role, ckpt, role)
        # The ensemble of the role's fold models.
        used, missing, ckpts, probs = [], [], [], []
        base: pd.DataFrame | None = None
        for k in range(cfg.data.num_folds):
            fk = paths.role_dir(k, role) / BEST
            if not fk.is_file():
                missing.append(k)
                continue
            p = predict_checkpoint(cfg, fk, valid, reader)
            base = p if base is None else base
            probs.append(p["prob"].to_numpy())
            used.append(k)
            ckpts.append(fk)
        if base is None:
            log.warning("ensemble_%s: no fold has %s; skipped", role, BEST)
            continue
        if missing:
            log.warning("ensemble_%s: folds %s missing, averaging folds %s", role, missing, used)
        preds = base.assign(prob=np.mean(probs, axis=0))
        results[f"ensemble_{role}"] = _finish(
            paths, f"ensemble_{role}", "ensemble", role, ckpts, used, missing, preds, ops
        )
    return results


def _finish(
    paths: ExperimentPaths,
    model: str,
    kind: str,
    role: str,
    ckpts: list[Path],
    used: list[int],
    missing: list[int],
    preds: pd.DataFrame,
    ops: dict[str, dict[str, Any]],
) -> dict[str, float]:
    """Write the model's predictions.csv and metrics.json; returns its metrics at 0.5, plus oof_threshold and
    oof/<key> at the role's out-of-fold operating point when there is one."""
    from bonehpc.metrics import evaluate_predictions

    metrics = {k: float(v) for k, v in evaluate_predictions(preds).items()}
    op = ops.get(role)
    at_op = {k: float(v) for k, v in evaluate_predictions(preds, op["value"]).items()} if op else None
    summary = {
        "model": model,
        "kind": kind,
        "role": role,
        "checkpoints": [str(c) for c in ckpts],
        "folds_used": used,
        "folds_missing": missing,
        "n_images": len(preds),
        "status": "completed",
        "metrics": metrics,
        "threshold": op,
        "metrics_oof_threshold": at_op,
    }
    if dist.is_main():
        _write(paths.holdout_dir(model), preds, summary)
    log.info(
        "%s: study kappa %.4f, study AUROC %.4f, image AUROC %.4f (%d images%s)",
        model,
        metrics.get("study_kappa", float("nan")),
        metrics.get("study_auroc", float("nan")),
        metrics.get("image_auroc", float("nan")),
        len(preds),
        f", folds {used}" if kind == "ensemble" else "",
    )
    if op and at_op:
        log.info(
            "%s at the out-of-fold operating point %.3f: study kappa %.4f", model, op["value"], at_op["study_kappa"]
        )
        return {**metrics, "oof_threshold": float(op["value"]), **{f"oof/{k}": v for k, v in at_op.items()}}
    return metrics


def main(argv: list[str] | None = None) -> int:
    """`python -m bonehpc.evaluate`: holdout evaluation, or (--checkpoint) predictions of one checkpoint."""
    from bonehpc.config import ConfigError, load_config
    from bonehpc.data.folds import split_ids
    from bonehpc.paths import parse_fold

    p = argparse.ArgumentParser(
        prog="python -m bonehpc.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", "-c", help="experiment YAML")
    p.add_argument("--params", help="YAML of parameter overrides")
    p.add_argument("--checkpoint", help="predict with this checkpoint instead of the holdout evaluation")
    p.add_argument("--fold", default="final", help="with --checkpoint: images of this fold's validation side")
    p.add_argument("--out", help="with --checkpoint: predictions CSV to write (rank 0)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s%(asctime)s %(name)s] %(message)s")
    try:
        cfg = load_config(args.config, args.overrides, params=args.params)
        fold = parse_fold(args.fold)
    except (ConfigError, ValueError) as err:
        sys.stderr.write(f"bonehpc.evaluate: {err}\n")
        return INPUT_ERROR_EXIT_CODE
    try:
        if args.checkpoint:
            from bonehpc.data.folds import read_folds
            from bonehpc.data.shards import ShardReader
            from bonehpc.metrics import evaluate_predictions

            reader = ShardReader(cfg.data.shards)
            folds = read_folds(ExperimentPaths.of(cfg).folds)
            _, ids = split_ids(
                reader.index,
                folds,
                fold,
                cfg.data.num_folds,
                final_val_frac=cfg.train.final_val_frac,
                seed=cfg.data.fold_seed,
            )
            preds = predict_checkpoint(cfg, args.checkpoint, ids, reader)
            if dist.is_main():
                if args.out:
                    atomic_write_csv(args.out, preds)
                m = evaluate_predictions(preds)
                log.info(
                    "%d predictions: study_auroc %.4f study_kappa %.4f", len(preds), m["study_auroc"], m["study_kappa"]
                )
        else:
            for model, m in evaluate_holdout(cfg).items():
                if dist.is_main():
                    log.info("%s: study_kappa %.4f  study_auroc %.4f", model, m["study_kappa"], m["study_auroc"])
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
