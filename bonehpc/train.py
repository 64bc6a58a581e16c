"""Train one (fold, role): the same code under torchrun, a submitit Slurm task and plain python.

    torchrun --standalone --nproc_per_node=4 -m bonehpc.train --config C --fold 0 --role teacher
    python -m bonehpc.train --config C --fold final --role student train.epochs=30

`run()` resumes automatically from `<run_dir>/last.pt` and returns at once when `metrics.json` says
the run is completed, so a job can simply be started again after a crash, a time-out or a requeue.

Preemption: SIGUSR2 (Slurm `--signal=USR2@N`) and SIGTERM only set a flag. The loop acts on it at a
step boundary, all ranks together: the epoch in progress is abandoned, `last.pt` (written at the end
of every epoch) stays the resume point, and `run()` raises `Preempted`; `main()` exits with status 3
(`PREEMPTED_EXIT_CODE`) so a wrapper can requeue. On restart the abandoned epoch is redone from the
same state with the same data order and augmentation (they depend only on seed, epoch and rank), so
an interrupted run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch

from bonehpc import dist
from bonehpc.checkpoint import (
    BEST,
    FORMAT_VERSION,
    LAST,
    CheckpointError,
    capture_rng,
    find_resume,
    load_checkpoint,
    model_spec,
    restore_rng,
    save_checkpoint,
    unwrap_model,
)
from bonehpc.config import ExperimentConfig, save_config, to_dict
from bonehpc.engine import evaluate, train_one_epoch
from bonehpc.log import close_logging, setup_logging
from bonehpc.paths import ExperimentPaths, fold_name

log = logging.getLogger("bonehpc.train")  # not __name__: it is "__main__" under `python -m`

PREEMPTED_EXIT_CODE = 3
METRICS_JSONL = "metrics.jsonl"
METRICS_JSON = "metrics.json"
PREDICTIONS_VAL = "predictions_val.csv"
CONFIG_YAML = "config.yaml"
PRED_COLUMNS = ["image_id", "study", "body_part", "label", "prob"]

T = TypeVar("T")


class Preempted(RuntimeError):  # noqa: N818 - an event, not an error of the caller
    """Training stopped on SIGUSR2/SIGTERM; `last.pt` in `run_dir` is the resume point. Requeue the job."""

    def __init__(self, run_dir: Path, epoch: int, signum: int | None) -> None:
        super().__init__(f"{run_dir}: preempted by signal {signum} during epoch {epoch}; resume from {LAST}")
        self.run_dir = run_dir
        self.epoch = epoch
        self.signum = signum


# ----------------------------------------------------------------------------------------------
# Small helpers


def _on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 and hand its result (or its error) to every rank."""
    result: Any = None
    error: BaseException | None = None
    if dist.is_main():
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
    result, error = dist.broadcast_object((result, error))
    if error is not None:
        raise error
    return result  # type: ignore[no-any-return]


def seed_everything(seed: int, epoch: int = 0, rank: int = 0) -> None:
    """Seed torch, numpy and python from (seed, epoch, rank) only, so a redone epoch repeats exactly."""
    s = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def amp_dtype_of(amp: str, device: torch.device) -> torch.dtype | None:
    """torch dtype of autocast for train.amp (None: full precision)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def read_completed(run_dir: Path) -> dict[str, Any] | None:
    """metrics.json of a completed run, else None."""
    p = run_dir / METRICS_JSON
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    return info if isinstance(info, dict) and info.get("status") == "completed" else None


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_history(path: Path, epochs_done: int) -> list[dict[str, Any]]:
    """Epoch records of metrics.jsonl for epochs < epochs_done (later ones were not checkpointed)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if int(r["epoch"]) < epochs_done]


# ----------------------------------------------------------------------------------------------
# Data: shards, folds, the image ids of each side


def _load_folds(cfg: ExperimentConfig, paths: ExperimentPaths, index: pd.DataFrame) -> pd.DataFrame:
    from bonehpc.data.folds import make_folds, read_folds, write_folds

    def create() -> None:
        if paths.folds.is_file():
            return
        if paths.manifest.is_file():
            manifest = pd.read_csv(paths.manifest)
            source = str(paths.manifest)
        else:
            manifest = index
            source = "the shard index"
        folds = make_folds(manifest, cfg.data.num_folds, cfg.data.fold_seed)
        paths.folds.parent.mkdir(parents=True, exist_ok=True)
        write_folds(folds, paths.folds)
        log.info("wrote %s (%d folds from %s)", paths.folds, cfg.data.num_folds, source)

    _on_main(create)
    folds = read_folds(paths.folds)
    k = int(folds["fold"].max()) + 1
    if k != cfg.data.num_folds:
        raise ValueError(
            f"{paths.folds} has {k} folds but data.num_folds={cfg.data.num_folds}: "
            "delete it or use a new experiment name"
        )
    return folds


def split_ids(index: pd.DataFrame, folds: pd.DataFrame, fold: int | str, num_folds: int) -> tuple[np.ndarray, ...]:
    """(train image ids, val image ids) of `fold`: K-fold CV on the train split, or final = train vs valid."""
    from bonehpc.data.folds import apply_folds

    df = apply_folds(index, folds)
    is_train = df["split"] == "train"
    if fold == "final":
        train, val = df[is_train], df[df["split"] == "valid"]
    else:
        if not isinstance(fold, int) or not 0 <= fold < num_folds:
            raise ValueError(f"fold {fold!r} is not in 0..{num_folds - 1} or 'final'")
        lost = df[is_train & (df["fold"] < 0)]
        if len(lost):
            raise ValueError(
                f"{len(lost)} train images belong to patients missing from folds.csv "
                f"(e.g. {lost['patient'].iloc[0]}): folds.csv is from another manifest"
            )
        train, val = df[is_train & (df["fold"] != fold)], df[is_train & (df["fold"] == fold)]
    if train.empty or val.empty:
        raise ValueError(f"{fold_name(fold)}: empty {'training' if train.empty else 'validation'} set")
    return train["image_id"].to_numpy(np.int64), val["image_id"].to_numpy(np.int64)


# ----------------------------------------------------------------------------------------------
# Optimisation


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float, momentum: float):  # noqa: ANN201
    """AdamW or SGD; norms, biases and other 1-d parameters get no weight decay."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero, stepped once per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# The run


def run(
    cfg: ExperimentConfig,
    fold: int | str,
    role: str,
    run_dir: str | Path | None = None,
    on_epoch_end: Callable[[int, Mapping[str, Any]], None] | None = None,
) -> dict[str, float]:
    """Train `role` on `fold` and return the validation metrics of the best epoch (keys val/...).

    Args:
        cfg: the experiment config.
        fold: 0..num_folds-1 (validate on that fold of the train split) or "final" (train on every
            train patient, validate on the official valid split).
        role: "teacher" or "student" (the student distils from the fold's teacher best.pt).
        run_dir: where the run's files go (default ExperimentPaths.of(cfg).role_dir(fold, role)).
        on_epoch_end: called on rank 0 as on_epoch_end(epoch, record) after each epoch's record and
            checkpoints are written (Optuna pruning); what it raises ends the run (resumable from last.pt).

    Raises:
        Preempted: stopped by SIGUSR2/SIGTERM; call again to resume.
    """
    cfg.role(role)  # validates the name
    fold_name(fold)
    out = Path(run_dir) if run_dir is not None else ExperimentPaths.of(cfg).role_dir(fold, role)
    done = read_completed(out)
    if done is not None:
        log.info("%s: already completed (metrics.json), not training again", out)
        return {k: float(v) for k, v in done["metrics"].items()}
    owns_group = not dist.is_dist()
    info = dist.init_distributed()
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    setup_logging(out, info.rank)
    stop = dist.StopFlag(info.device).install()
    try:
        return _train(cfg, fold, role, out, info, stop, on_epoch_end)
    except Preempted as err:
        log.warning("%s (exit status %d from main)", err, PREEMPTED_EXIT_CODE)
        raise
    finally:
        stop.uninstall()
        close_logging()
        if owns_group:
            dist.cleanup()


def _train(
    cfg: ExperimentConfig,
    fold: int | str,
    role: str,
    out: Path,
    info: dist.DistInfo,
    stop: dist.StopFlag,
    on_epoch_end: Callable[[int, Mapping[str, Any]], None] | None = None,
) -> dict[str, float]:
    from bonehpc.data.loaders import build_loader
    from bonehpc.data.shards import ShardReader, verify_shards
    from bonehpc.distill import DistillationLoss, build_task_loss, inverse_frequency_weights, load_frozen_teacher
    from bonehpc.metrics import evaluate_predictions
    from bonehpc.models import create_model, model_info

    t_start = time.perf_counter()
    rcfg, tcfg = cfg.role(role), cfg.train
    paths = ExperimentPaths.of(cfg)
    device = info.device
    if tcfg.num_threads > 0:
        torch.set_num_threads(tcfg.num_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log.info("%s %s: rank %d/%d on %s, run dir %s", fold_name(fold), role, info.rank, info.world_size, device, out)

    # --- data
    if cfg.data.verify != "none":
        report = _on_main(lambda: verify_shards(cfg.data.shards, full=cfg.data.verify == "full"))
        log.info("shards verified (%s): %s", cfg.data.verify, report)
    reader = ShardReader(cfg.data.shards)
    folds = _load_folds(cfg, paths, reader.index)
    train_ids, val_ids = split_ids(reader.index, folds, fold, cfg.data.num_folds)
    labels_of = reader.index.set_index("image_id")["label"]
    train_labels = labels_of.loc[train_ids].to_numpy(np.int64)
    val_labels = labels_of.loc[val_ids].to_numpy(np.int64)
    log.info(
        "images: train %d (%.1f%% abnormal), val %d (%.1f%% abnormal)",
        len(train_ids),
        100 * train_labels.mean(),
        len(val_ids),
        100 * val_labels.mean(),
    )
    train_loader = build_loader(
        cfg, reader, train_ids, train=True, rank=info.rank, world_size=info.world_size, device=device, seed=tcfg.seed
    )
    val_loader = build_loader(
        cfg, reader, val_ids, train=False, rank=info.rank, world_size=info.world_size, device=device, seed=tcfg.seed
    )
    steps_per_epoch = min(len(train_loader), tcfg.max_steps_per_epoch or len(train_loader))
    if steps_per_epoch < 1:
        raise ValueError(f"no training step per epoch: {len(train_ids)} images, batch {tcfg.batch_size}")

    # --- model, loss
    seed_everything(tcfg.seed)
    model = create_model(
        rcfg.model,
        pretrained=rcfg.pretrained,
        weights=rcfg.weights or None,
        drop_rate=rcfg.drop_rate,
        **rcfg.model_kwargs,
    )
    net_info = {"name": rcfg.model, **model_info(model, input_size=cfg.data.image_size)}
    model.to(device)
    if device.type == "cuda" and tcfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda" and info.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # CPU (gloo) has no SyncBatchNorm
    class_weights = None
    if tcfg.class_weight == "auto":
        class_weights = inverse_frequency_weights(train_labels)
        log.info("class weights %s", [round(float(w), 3) for w in class_weights])
    task_loss = build_task_loss(class_weights)
    teacher = None
    kind = "none"
    if role == "student" and cfg.distill.kind != "none":
        teacher_ckpt = paths.role_dir(fold, "teacher") / BEST
        if not teacher_ckpt.is_file():
            raise FileNotFoundError(f"{teacher_ckpt} is missing: train the teacher of {fold_name(fold)} first")
        teacher = load_frozen_teacher(teacher_ckpt, device)
        if device.type == "cuda" and tcfg.channels_last:  # same layout as the batches it sees
            teacher.to(memory_format=torch.channels_last)
        kind = cfg.distill.kind
    loss_fn = DistillationLoss(task_loss, teacher, kind, cfg.distill.alpha, cfg.distill.tau).to(device)

    global_batch = tcfg.batch_size * info.world_size
    lr = rcfg.lr * global_batch / 256
    optimizer = build_optimizer(model, rcfg.optimizer, lr, rcfg.weight_decay, rcfg.momentum)
    scheduler = build_scheduler(optimizer, round(rcfg.warmup_epochs * steps_per_epoch), rcfg.epochs * steps_per_epoch)
    amp_dtype = amp_dtype_of(tcfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    log.info(
        "model %s (%.2f M params, %.3f GFLOPs), %s lr %.3g (global batch %d), amp %s, %d steps/epoch x %d epochs",
        rcfg.model,
        net_info["params"] / 1e6,
        net_info["gflops"],
        rcfg.optimizer,
        lr,
        global_batch,
        amp_dtype,
        steps_per_epoch,
        rcfg.epochs,
    )

    # --- resume
    start_epoch, step, best_metric, best_epoch = 0, 0, float("nan"), -1
    last = find_resume(out)
    if last is not None:
        state = load_checkpoint(last)
        if state.get("role") != role or str(state.get("fold")) != str(fold):
            raise CheckpointError(f"{last} belongs to {state.get('fold')}/{state.get('role')}, not {fold}/{role}")
        if state["model_spec"]["name"] != rcfg.model:
            raise CheckpointError(f"{last} holds a {state['model_spec']['name']}, the config asks for {rcfg.model}")
        unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best_metric, best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        log.info(
            "resumed from %s: %d epochs done, best %s=%.4f at epoch %d",
            last,
            start_epoch,
            tcfg.early_stop_metric,
            best_metric,
            best_epoch,
        )
    history = _read_history(out / METRICS_JSONL, start_epoch)
    if info.is_main:
        _atomic_text(out / METRICS_JSONL, "".join(json.dumps(r) + "\n" for r in history))
        save_config(cfg, out / CONFIG_YAML)

    spec = model_spec(model)
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    train_model: torch.nn.Module = torch.compile(model) if tcfg.compile else model  # type: ignore[assignment]
    index = reader.index.set_index("image_id")

    def checkpoint_state(epochs_done: int) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model_spec": spec,
            "model": unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epochs_done,
            "step": step,
            "best_metric": best_metric,
            "best_epoch": best_epoch,
            "config": to_dict(cfg),
            "rng": capture_rng(),
            "fold": fold,
            "role": role,
        }

    # --- epochs
    last_preds: pd.DataFrame | None = None
    for epoch in range(start_epoch, rcfg.epochs):
        t0 = time.perf_counter()
        seed_everything(tcfg.seed, epoch, info.rank)
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        lr_now = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(
            train_model,
            train_loader,
            loss_fn,
            optimizer,
            scheduler,
            scaler,
            device,
            amp_dtype=amp_dtype,
            grad_clip=tcfg.grad_clip,
            log_every=tcfg.log_every,
            max_steps=tcfg.max_steps_per_epoch,
            stop_flag=stop,
            header=f"epoch {epoch}",
        )
        if stop.stopped:
            raise Preempted(out, epoch, stop.signal)
        step += int(stats.pop("train/steps"))
        preds = evaluate(model, val_loader, device, amp_dtype)
        missing = np.setdiff1d(val_ids, preds["image_id"].to_numpy())
        if len(missing):
            raise RuntimeError(f"evaluation skipped {len(missing)} validation images (e.g. {missing[0]})")
        preds = preds.join(index[["study", "body_part"]], on="image_id")
        val = {f"val/{k}": float(v) for k, v in evaluate_predictions(preds[PRED_COLUMNS]).items()}
        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr_now,
            "time_s": round(time.perf_counter() - t0, 3),
            **stats,
            "val/loss": float(preds["loss"].mean()),
            **val,
        }
        metric = record.get(tcfg.early_stop_metric)
        if metric is None:
            raise KeyError(f"train.early_stop_metric {tcfg.early_stop_metric!r} is not a metric: {sorted(record)}")
        improved = math.isfinite(metric) and (best_epoch < 0 or not math.isfinite(best_metric) or metric > best_metric)
        if improved:
            best_metric, best_epoch = float(metric), epoch
        history.append(record)
        last_preds = preds
        log.info(
            "epoch %d: loss %.4f  val/loss %.4f  %s %.4f  val/study_auroc %.4f  (%.1fs)%s",
            epoch,
            record["train/loss"],
            record["val/loss"],
            tcfg.early_stop_metric,
            metric,
            record.get("val/study_auroc", float("nan")),
            record["time_s"],
            "  * best" if improved else "",
        )
        if info.is_main:
            with open(out / METRICS_JSONL, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            state = checkpoint_state(epoch + 1)
            if improved:
                save_checkpoint(out / BEST, state)
                preds[PRED_COLUMNS].to_csv(out / f".{PREDICTIONS_VAL}.tmp", index=False)
                os.replace(out / f".{PREDICTIONS_VAL}.tmp", out / PREDICTIONS_VAL)
            save_checkpoint(out / LAST, state)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
        dist.barrier()
        if tcfg.patience and epoch - best_epoch >= tcfg.patience:
            log.info("early stop: no improvement of %s for %d epochs", tcfg.early_stop_metric, tcfg.patience)
            break
        if epoch + 1 < rcfg.epochs and stop.agreed():
            raise Preempted(out, epoch + 1, stop.signal)

    # --- finish
    if best_epoch < 0:
        # The metric was never finite (e.g. one class only in val): keep the last epoch as "best".
        log.warning("%s was never finite; best.pt is the last epoch", tcfg.early_stop_metric)
        best_epoch = history[-1]["epoch"]
        if info.is_main:
            save_checkpoint(out / BEST, checkpoint_state(best_epoch + 1))
            if last_preds is not None:
                last_preds[PRED_COLUMNS].to_csv(out / PREDICTIONS_VAL, index=False)
    best = next(r for r in history if r["epoch"] == best_epoch)
    metrics = {k: float(v) for k, v in best.items() if k.startswith("val/")}
    summary = {
        "fold": fold,
        "role": role,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "status": "completed",
        "metrics": metrics,
        "model": net_info,
        "world_size": info.world_size,
        "time_s": round(time.perf_counter() - t_start, 3),
    }
    if info.is_main:
        _atomic_text(out / METRICS_JSON, json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    log.info(
        "%s %s done: best epoch %d, %s %.4f",
        fold_name(fold),
        role,
        best_epoch,
        tcfg.early_stop_metric,
        metrics.get(tcfg.early_stop_metric, float("nan")),
    )
    return metrics


# ----------------------------------------------------------------------------------------------
# Command line (what torchrun launches)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bonehpc.train",
        description="Train one fold/role. Several processes: torchrun --nproc_per_node=N -m bonehpc.train ... "
        f"Exit status {PREEMPTED_EXIT_CODE} means preempted (SIGUSR2/SIGTERM): run it again to resume.",
    )
    p.add_argument("--config", "-c", help="experiment YAML (defaults < YAML < overrides)")
    p.add_argument("--params", help="YAML of parameter overrides (e.g. tuned best params)")
    p.add_argument("--fold", required=True, help="fold number 0..K-1, or 'final'")
    p.add_argument("--role", required=True, choices=("teacher", "student"), help="which model to train")
    p.add_argument("--run-dir", help="output folder (default runs/<name>/<fold>/<role>)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")
    return p


def parse_fold(text: str) -> int | str:
    """'final' or a non-negative int."""
    if text == "final":
        return "final"
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"--fold must be a fold number or 'final', got {text!r}") from None
    fold_name(k)
    return k


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m bonehpc.train`; returns 0, 2 (bad config) or 3 (preempted)."""
    from bonehpc.config import ConfigError, load_config

    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, params=args.params)
        fold = parse_fold(args.fold)
    except (ConfigError, ValueError) as err:
        sys.stderr.write(f"bonehpc.train: {err}\n")
        return 2
    try:
        run(cfg, fold, args.role, args.run_dir)
    except Preempted as err:
        sys.stderr.write(f"bonehpc.train: {err}\n")
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
