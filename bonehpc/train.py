"""Train one (fold, role): the same code under torchrun, a submitit Slurm task and plain python.

    torchrun --standalone --nproc_per_node=4 -m bonehpc.cli.train --config C --fold 0 --role teacher
    bonehpc train --config C --fold final --role student train.epochs=30

(the command line lives in bonehpc/cli/train.py; `python -m bonehpc.cli.train ARGS` is `bonehpc train ARGS`.)

`run()` is five named steps: build the data (`build_data`), the model and its loss (`build_learner`),
resume (`resume`), the epochs (`epoch_loop`) and the summary (`finish`). It resumes automatically
from `<run_dir>/last.pt` and returns at once when `metrics.json` says the run is completed, so a job
can simply be started again after a crash, a time-out or a requeue.

Roles: teacher; student (distils from the fold's teacher best.pt); baseline (the student's model
trained without distillation and without loading a teacher, to measure what KD buys).

Model selection never sees the holdout: a fold run validates on its fold of the train split; a final
run validates on a patient-grouped slice of the train patients (`train.final_val_frac`) and keeps its last
epoch (`train.final_epoch`: the slice monitors, it does not select), and the official valid split is left
to the one holdout evaluation (`bonehpc evaluate`). Probabilities are corrected for the class weights of
the loss (`bonehpc.metrics.correct_prior`; the record is `prob_correction` in metrics.json and checkpoints).

Preemption: SIGUSR2 (Slurm `--signal=USR2@N`) and SIGTERM only set a flag. The loop acts on it at a
step boundary, all ranks together: the epoch in progress is abandoned, the newest epoch-end state is
written to `last.pt` (it may be only in memory when `train.checkpoint_every_*` skipped writing it),
and `run()` raises `Preempted`; the command exits with status 3 (`PREEMPTED_EXIT_CODE`) so a wrapper
can requeue. On restart the abandoned epoch is redone from the same state with the same data order
and augmentation (the order depends on seed and epoch, each view on seed, epoch and image id), so an
interrupted run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch

from bonehpc import dist
from bonehpc.checkpoint import (
    BEST,
    LAST,
    CheckpointWriter,
    TrainState,
    find_resume,
    load_training_checkpoint,
    load_weights,
    make_checkpoint,
    restore_rng,
    save_checkpoint,
    weights_payload,
)
from bonehpc.config import ExperimentConfig, RoleConfig, TrainConfig, save_config, to_dict
from bonehpc.constants import PRED_COLUMNS, PREEMPTED_EXIT_CODE
from bonehpc.curves import Curves
from bonehpc.engine import amp_dtype_of, evaluate, train_one_epoch
from bonehpc.fsio import atomic_write_csv, atomic_write_json, atomic_write_text
from bonehpc.lease import RunLease, die_with_parent, slurm_task_id
from bonehpc.log import close_logging, setup_logging
from bonehpc.metrics import prob_correction_record
from bonehpc.paths import (
    ROLES,
    RUN_CONFIG,
    RUN_EPOCHS,
    RUN_METRICS,
    RUN_PREDICTIONS,
    STATUS_COMPLETED,
    ExperimentPaths,
    fold_name,
    read_json,
    run_status,
)

log = logging.getLogger("bonehpc.train")  # not __name__: it is "__main__" under `python -m`

PRED_COLS = list(PRED_COLUMNS)

T = TypeVar("T")


class TrainError(ValueError):
    """A run cannot start (fold, role, output folder, folds.csv); the message says why in one line."""


class MissingTeacherError(TrainError, FileNotFoundError):
    """The student's fold has no trained teacher (best.pt) yet."""


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


def role_config(cfg: ExperimentConfig, role: str) -> RoleConfig:
    """The RoleConfig a role trains (baseline: the student's model and optimisation)."""
    if role not in ROLES:
        raise TrainError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return cfg.role(role)


def check_fold(fold: int | str, num_folds: int) -> None:
    """TrainError unless `fold` is 0..num_folds-1 or "final"."""
    if fold == "final" or (isinstance(fold, int) and not isinstance(fold, bool) and 0 <= fold < num_folds):
        return
    raise TrainError(f"fold {fold!r} is not in 0..{num_folds - 1} (data.num_folds={num_folds}) or 'final'")


def _prepare_dir(out: Path) -> None:
    """Create the run folder and prove that it is writable (TrainError, before anything is written)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # unnamed on Linux; removed on close everywhere
            pass
    except OSError as err:
        raise TrainError(f"{out}: the run folder is not writable ({err.strerror or err})") from None


def _read_history(path: Path, epochs_done: int) -> list[dict[str, Any]]:
    """Epoch records of metrics.jsonl for epochs < epochs_done (later ones were not checkpointed)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if int(r["epoch"]) < epochs_done]


def epoch_line(record: Mapping[str, Any], early_stop_metric: str, improved: bool) -> str:
    """The log line of one epoch: each metric once (the early-stop metric may be val/study_auroc)."""
    keys = dict.fromkeys(("val/loss", early_stop_metric, "val/study_auroc"))
    shown = "  ".join(f"{k} {float(record.get(k, math.nan)):.4f}" for k in keys)
    best = "  * best" if improved else ""
    return f"epoch {record['epoch']}: loss {record['train/loss']:.4f}  {shown}  ({record['time_s']:.1f}s){best}"


# ----------------------------------------------------------------------------------------------
# Data: shards, folds, the image ids of each side


def _load_folds(cfg: ExperimentConfig, paths: ExperimentPaths, index: pd.DataFrame) -> pd.DataFrame:
    """folds.csv of the experiment (`ensure_folds`: made from the shard index on rank 0 when it is missing)."""
    from bonehpc.data.folds import ensure_folds

    return _on_main(lambda: ensure_folds(paths.folds, index, cfg.data.num_folds, cfg.data.fold_seed))


@dataclass
class RunData:
    """Step 1: the images of both sides and their loaders."""

    index: pd.DataFrame  # the shard index by image_id
    train_ids: np.ndarray
    val_ids: np.ndarray
    train_labels: np.ndarray
    train_loader: Any
    val_loader: Any
    steps_per_epoch: int
    selection: dict[str, Any]


def build_data(cfg: ExperimentConfig, fold: int | str, info: dist.DistInfo) -> RunData:
    from bonehpc.data.folds import split
    from bonehpc.data.loaders import build_loader
    from bonehpc.data.shards import ShardReader, verify_shards

    if cfg.data.verify != "none":
        report = _on_main(lambda: verify_shards(cfg.data.shards, full=cfg.data.verify == "full"))
        log.info("shards verified: %s", report.summary())
    reader = ShardReader(cfg.data.shards)
    folds = _load_folds(cfg, ExperimentPaths.of(cfg), reader.index)
    sides = split(reader.index, folds, fold, cfg.data.num_folds, cfg.train.final_val_frac, cfg.data.fold_seed)
    train, val, selection = sides.train, sides.val, sides.selection
    train_ids, val_ids = sides.ids()
    train_labels = train["label"].to_numpy(np.int64)
    log.info(
        "images: train %d (%.1f%% abnormal), val %d (%.1f%% abnormal; %s)",
        len(train_ids),
        100 * train_labels.mean(),
        len(val_ids),
        100 * val["label"].mean(),
        selection["method"],
    )
    loaders = [
        build_loader(
            cfg,
            reader,
            ids,
            train=is_train,
            rank=info.rank,
            world_size=info.world_size,
            device=info.device,
            seed=cfg.train.seed,
        )
        for ids, is_train in ((train_ids, True), (val_ids, False))
    ]
    steps = min(len(loaders[0]), cfg.train.max_steps_per_epoch or len(loaders[0]))
    if steps < 1:
        raise TrainError(f"no training step per epoch: {len(train_ids)} images, batch {cfg.train.batch_size}")
    index = reader.index.set_index("image_id")
    return RunData(index, train_ids, val_ids, train_labels, loaders[0], loaders[1], steps, selection)


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


@dataclass
class Learner:
    """Step 2: the network, its loss (with the frozen teacher for KD) and its optimisation."""

    model: torch.nn.Module  # the plain module (checkpoints, evaluation)
    train_model: torch.nn.Module  # what the steps run: DDP and/or torch.compile around `model`
    net_info: dict[str, Any]
    loss_fn: Any
    distill: str  # the distillation kind in use (none for teachers and baselines)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    device: torch.device
    prob_correction: dict[str, Any] = field(default_factory=lambda: prob_correction_record(None))
    """How this model's probabilities are corrected for class weighting (metrics.json, checkpoints)."""

    def wrap(self, info: dist.DistInfo, compile_model: bool) -> None:
        """DDP (several processes) and torch.compile around the model, after the weights are final."""
        net = self.model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
        self.train_model = torch.compile(net) if compile_model else net  # type: ignore[assignment]

    def train_epoch(self, loader: Any, tcfg: TrainConfig, stop: dist.StopFlag, epoch: int) -> dict[str, float]:
        return train_one_epoch(
            self.train_model,
            loader,
            self.loss_fn,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.device,
            amp_dtype=self.amp_dtype,
            grad_clip=tcfg.grad_clip,
            log_every=tcfg.log_every,
            max_steps=tcfg.max_steps_per_epoch,
            stop_flag=stop,
            header=f"epoch {epoch}",
        )


def _build_loss(  # noqa: ANN202
    cfg: ExperimentConfig,
    fold: int | str,
    role: str,
    task_loss: torch.nn.Module,
    device: torch.device,
    data: RunData | None = None,
):
    """DistillationLoss: with the fold's frozen teacher (or its cached outputs) for a KD student, plain task loss
    otherwise. `data` (the train ids) lets distill.teacher_outputs auto|cached find the fold's cache."""
    from bonehpc.distill import DistillationLoss, teacher_and_input

    d = cfg.distill
    if role != "student" or d.kind == "none":
        return DistillationLoss(task_loss, None, "none", d.alpha, d.tau).to(device)
    teacher_ckpt = ExperimentPaths.of(cfg).role_dir(fold, "teacher") / BEST
    if not teacher_ckpt.is_file():
        raise MissingTeacherError(f"{teacher_ckpt} is missing: train the teacher of {fold_name(fold)} first")
    if data is not None and d.teacher_outputs != "online":
        from bonehpc.teacher_outputs import open_for_run

        cached = open_for_run(cfg, fold, data.train_ids, device)
        if cached is not None:
            return DistillationLoss(task_loss, None, d.kind, d.alpha, d.tau, cached=cached).to(device)
    teacher, renorm = teacher_and_input(
        teacher_ckpt, device, cfg.train.channels_last, cfg.augment.mean, cfg.augment.std
    )
    return DistillationLoss(task_loss, teacher, d.kind, d.alpha, d.tau, renorm).to(device)


def build_learner(cfg: ExperimentConfig, fold: int | str, role: str, data: RunData, info: dist.DistInfo) -> Learner:
    from bonehpc.distill import build_task_loss, inverse_frequency_weights
    from bonehpc.models import create_model, model_info

    rcfg, tcfg, device = role_config(cfg, role), cfg.train, info.device
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
        class_weights = inverse_frequency_weights(data.train_labels)
        log.info("class weights %s", [round(float(w), 3) for w in class_weights])
    correction = prob_correction_record(None if class_weights is None else class_weights.tolist())
    loss_fn = _build_loss(cfg, fold, role, build_task_loss(class_weights), device, data)

    global_batch = tcfg.batch_size * info.world_size
    lr = rcfg.lr * global_batch / 256
    optimizer = build_optimizer(model, rcfg.optimizer, lr, rcfg.weight_decay, rcfg.momentum)
    steps = data.steps_per_epoch
    scheduler = build_scheduler(optimizer, round(rcfg.warmup_epochs * steps), rcfg.epochs * steps)
    amp_dtype = amp_dtype_of(tcfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    log.info(
        "model %s (%.2f M params, %.3f GFLOPs), %s lr %.3g (global batch %d), amp %s, distill %s (teacher %s), "
        "%d steps/epoch x %d epochs",
        rcfg.model,
        net_info["params"] / 1e6,
        net_info["gflops"],
        rcfg.optimizer,
        lr,
        global_batch,
        amp_dtype,
        loss_fn.kind,
        loss_fn.source,
        steps,
        rcfg.epochs,
    )
    return Learner(
        model, model, net_info, loss_fn, loss_fn.kind, optimizer, scheduler, scaler, amp_dtype, device, correction
    )


# ----------------------------------------------------------------------------------------------
# Resume and checkpoints


def resume(out: Path, learner: Learner, fold: int | str, role: str, model_name: str) -> TrainState:
    """Step 3: the state of `out/last.pt` loaded into the learner (and the RNGs), or a fresh state."""
    last = find_resume(out)
    if last is None:
        return TrainState(fold, role)
    ckpt = load_training_checkpoint(last, fold, role, model_name)
    load_weights(learner.model, ckpt["model"], what=str(last))
    learner.optimizer.load_state_dict(ckpt["optimizer"])
    learner.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        learner.scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"])
    state = TrainState(fold, role, int(ckpt["epoch"]), int(ckpt["step"]))
    state.best_metric, state.best_epoch = float(ckpt["best_metric"]), int(ckpt["best_epoch"])
    log.info(
        "resumed from %s: %d epochs done, best %.4f at epoch %d", last, state.epoch, state.best_metric, state.best_epoch
    )
    return state


class RunCheckpoints:
    """Rank 0's checkpoints: best.pt (weights only) when the metric improves, last.pt (everything to
    resume) every `train.checkpoint_every_epochs` epochs and/or `checkpoint_every_min` minutes and at
    the end.

    On a GPU the epoch's end state is copied to the host once (the copy torch.save would make anyway)
    and written in the background (CheckpointWriter), so neither this rank nor the ranks that wait for
    it at the next collective wait for the file system. On a CPU the copy would cost about as much as
    a local write, so due files are written at once from the live state. When last.pt is not due, a
    CPU copy of the state stays here and a preemption writes it before the process exits (`preempted`).
    """

    def __init__(self, out: Path, tcfg: TrainConfig, config: dict[str, Any], learner: Learner) -> None:
        self.out, self.tcfg, self.config, self.learner = out, tcfg, config, learner
        self.writer = CheckpointWriter()
        self.pending: dict[str, Any] | None = None
        self.written_at = time.monotonic()

    def _due(self, epochs_done: int) -> bool:
        every, minutes = self.tcfg.checkpoint_every_epochs, self.tcfg.checkpoint_every_min
        return bool(every and epochs_done % every == 0) or bool(
            minutes and time.monotonic() - self.written_at >= 60 * minutes
        )

    def end_of_epoch(self, state: TrainState, improved: bool, final: bool) -> None:
        lr, due = self.learner, final or self._due(state.epoch)
        background = lr.device.type == "cuda"
        ckpt = make_checkpoint(
            state,
            lr.model,
            self.config,
            optimizer=lr.optimizer,
            scheduler=lr.scheduler,
            scaler=lr.scaler,
            copy=background or not due,
        )
        ckpt["prob_correction"] = lr.prob_correction  # predict and evaluate correct this model's probabilities
        writes = [(self.out / BEST, weights_payload(ckpt))] if improved else []
        if due:
            writes.append((self.out / LAST, ckpt))
            self.pending, self.written_at = None, time.monotonic()
        else:
            self.pending = ckpt
        if background and writes:
            self.writer.submit(writes)
        elif writes:
            for path, payload in writes:
                save_checkpoint(path, payload)

    def preempted(self) -> None:
        """Finish the write in flight and write the newest resume point when it is not on disk yet."""
        self.writer.wait()
        if self.pending is not None:
            save_checkpoint(self.out / LAST, self.pending)
            self.pending = None

    def close(self) -> None:
        self.writer.wait()


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class RunContext:
    cfg: ExperimentConfig
    fold: int | str
    role: str
    out: Path
    info: dist.DistInfo
    stop: dist.StopFlag
    on_epoch_end: Callable[[int, Mapping[str, Any]], None] | None = None
    lease: RunLease | None = None
    """Rank 0's run lease (None on other ranks); checked before each epoch's writes."""


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
        fold: 0..num_folds-1 (validate on that fold of the train split) or "final" (train on the train
            patients but a held-out slice of them, `train.final_val_frac`; best.pt is the last epoch unless
            train.final_epoch=best selects it on the slice).
        role: "teacher", "student" (distils from the fold's teacher best.pt) or "baseline" (the
            student's model without distillation).
        run_dir: where the run's files go (default ExperimentPaths.of(cfg).role_dir(fold, role)).
        on_epoch_end: called on rank 0 as on_epoch_end(epoch, record) after each epoch's record and
            checkpoints are written (Optuna pruning); what it raises ends the run (resumable from last.pt).

    Raises:
        TrainError: bad fold or role, or an output folder that cannot be written (nothing written).
        Preempted: stopped by SIGUSR2/SIGTERM; call again to resume.
    """
    role_config(cfg, role)
    check_fold(fold, cfg.data.num_folds)
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by torchrun: never outlive it (no orphan writers)
        die_with_parent()
    out = Path(run_dir) if run_dir is not None else ExperimentPaths.of(cfg).role_dir(fold, role)
    if run_status(out) == STATUS_COMPLETED:
        log.info("%s: already completed (metrics.json), not training again", out)
        done = read_json(out / RUN_METRICS) or {}
        return {k: float(v) for k, v in (done.get("metrics") or {}).items()}
    owns_group = not dist.is_dist()
    info = dist.init_distributed()
    leases: list[RunLease] = []  # rank 0's lease of the run folder (one writer per run)

    def take_lease() -> bool:
        _prepare_dir(out)
        leases.append(RunLease(out).acquire())
        return run_status(out) == STATUS_COMPLETED  # completed by the holder we waited for

    try:
        if _on_main(take_lease):
            done = read_json(out / RUN_METRICS) or {}
            return {k: float(v) for k, v in (done.get("metrics") or {}).items()}
        setup_logging(out, info.rank)
        stop = dist.StopFlag(info.device).install()
        try:
            return _train(RunContext(cfg, fold, role, out, info, stop, on_epoch_end, next(iter(leases), None)))
        except Preempted as err:
            log.warning("%s (exit status %d)", err, PREEMPTED_EXIT_CODE)
            raise
        finally:
            stop.uninstall()
            close_logging()
    finally:
        for lease in leases:
            lease.release()
        if owns_group:
            dist.cleanup()


def _train(ctx: RunContext) -> dict[str, float]:
    t_start = time.perf_counter()
    cfg, info = ctx.cfg, ctx.info
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log.info(
        "%s %s: rank %d/%d on %s, run dir %s",
        fold_name(ctx.fold),
        ctx.role,
        info.rank,
        info.world_size,
        info.device,
        ctx.out,
    )
    data = build_data(cfg, ctx.fold, info)
    learner = build_learner(cfg, ctx.fold, ctx.role, data, info)
    state = resume(ctx.out, learner, ctx.fold, ctx.role, role_config(cfg, ctx.role).model)
    history = _read_history(ctx.out / RUN_EPOCHS, state.epoch)
    if info.is_main:
        atomic_write_text(ctx.out / RUN_EPOCHS, "".join(json.dumps(r) + "\n" for r in history))
        save_config(cfg, ctx.out / RUN_CONFIG)
    learner.wrap(info, cfg.train.compile)
    last_preds = epoch_loop(ctx, data, learner, state, history)
    return finish(ctx, data, learner, state, history, last_preds, time.perf_counter() - t_start)


def _validate(learner: Learner, data: RunData) -> tuple[dict[str, float], pd.DataFrame]:
    """val/loss and the val/ metrics of the validation side, and its predictions (PRED_COLUMNS + loss)."""
    from bonehpc.metrics import correct_prior, evaluate_predictions

    preds = evaluate(learner.model, data.val_loader, learner.device, learner.amp_dtype)
    # honest probabilities: the class-weighted loss shifted every logit by log(w1/w0); val/ metrics, best-epoch
    # selection and predictions_val.csv all see the corrected probability (the per-image loss stays the raw one)
    preds["prob"] = correct_prior(preds["prob"].to_numpy(), learner.prob_correction["logit_shift"])
    missing = np.setdiff1d(data.val_ids, preds["image_id"].to_numpy())
    if len(missing):
        raise RuntimeError(f"evaluation skipped {len(missing)} validation images (e.g. {missing[0]})")
    preds = preds.join(data.index[["study", "body_part"]], on="image_id")
    val = {f"val/{k}": float(v) for k, v in evaluate_predictions(preds[PRED_COLS]).items()}
    return {"val/loss": float(preds["loss"].mean()), **val}, preds


def _preempt(ckpts: RunCheckpoints | None, ctx: RunContext, epoch: int) -> Preempted:
    """Every rank calls this at the same step (the stop flag is agreed); rank 0 puts last.pt on disk."""
    if ckpts is not None:
        ckpts.preempted()
    # No rank exits before last.pt is written: torchrun stops the other workers when one exits.
    dist.barrier()
    return Preempted(ctx.out, epoch, ctx.stop.signal)


def selects_epoch(cfg: ExperimentConfig, fold: int | str) -> bool:
    """Whether the run keeps its best epoch (fold runs; final runs with train.final_epoch=best) or its last one
    (final runs by default: no selection on the small held-out slice, and no early stop)."""
    return fold != "final" or cfg.train.final_epoch == "best"


def _improved(state: TrainState, metric: float, epoch: int, selects: bool) -> bool:
    """Record the epoch as best.pt's: when the metric improved (selecting), or when it is the last (not)."""
    if selects:
        return state.improve(metric, epoch)
    state.best_metric, state.best_epoch = float(metric), epoch  # every epoch replaces the last: best.pt = last
    return True


def epoch_loop(
    ctx: RunContext, data: RunData, learner: Learner, state: TrainState, history: list[dict[str, Any]]
) -> pd.DataFrame | None:
    """Step 4: train and validate epoch by epoch until the last epoch, early stop or preemption.

    Rank 0 writes the epoch's record, the best predictions and the checkpoints (in the background);
    the other ranks do not wait for those writes: there is no barrier after them, and the next
    collective (the stop vote, or the first gradient all-reduce) comes right after rank 0 has only
    copied the state to the CPU.
    """
    tcfg, rcfg, info, stop = ctx.cfg.train, role_config(ctx.cfg, ctx.role), ctx.info, ctx.stop
    ckpts = RunCheckpoints(ctx.out, tcfg, to_dict(ctx.cfg), learner) if info.is_main else None
    curves = Curves(ctx.out, purge_step=state.epoch) if info.is_main else None
    last_preds: pd.DataFrame | None = None
    selects = selects_epoch(ctx.cfg, ctx.fold)
    try:
        for epoch in range(state.epoch, rcfg.epochs):
            t0 = time.perf_counter()
            seed_everything(tcfg.seed, epoch, info.rank)
            if hasattr(data.train_loader, "set_epoch"):
                data.train_loader.set_epoch(epoch)
            plan = getattr(data.train_loader, "plan", None)  # this rank's samples: the cached rows it reads
            learner.loss_fn.set_epoch(epoch, plan.rank_ids(epoch) if plan is not None else None)
            lr_now = learner.optimizer.param_groups[0]["lr"]
            stats = learner.train_epoch(data.train_loader, tcfg, stop, epoch)
            if stop.stopped:
                raise _preempt(ckpts, ctx, epoch)
            state.step += int(stats.pop("train/steps"))
            val, preds = _validate(learner, data)
            record: dict[str, Any] = {"epoch": epoch, "lr": lr_now, "time_s": round(time.perf_counter() - t0, 3)}
            record.update(stats)
            record.update(val)
            metric = record.get(tcfg.early_stop_metric)
            if metric is None:
                raise KeyError(f"train.early_stop_metric {tcfg.early_stop_metric!r} is not a metric: {sorted(record)}")
            improved = _improved(state, metric, epoch, selects)
            state.epoch = epoch + 1
            history.append(record)
            last_preds = preds
            log.info("%s", epoch_line(record, tcfg.early_stop_metric, improved))
            early_stop = selects and bool(tcfg.patience) and epoch - state.best_epoch >= tcfg.patience
            final = early_stop or state.epoch == rcfg.epochs
            if ckpts is not None:
                if ctx.lease is not None:
                    ctx.lease.check()  # another process took the run over: never a second writer
                with open(ctx.out / RUN_EPOCHS, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                if curves is not None:
                    curves.scalars(epoch, record)
                if improved:
                    atomic_write_csv(ctx.out / RUN_PREDICTIONS, preds[PRED_COLS])
                ckpts.end_of_epoch(state, improved, final)
                if ctx.on_epoch_end is not None:
                    ctx.on_epoch_end(epoch, record)
            if early_stop:
                log.info("early stop: no improvement of %s for %d epochs", tcfg.early_stop_metric, tcfg.patience)
                break
            if not final and stop.agreed():
                raise _preempt(ckpts, ctx, state.epoch)
    finally:
        if ckpts is not None:
            ckpts.close()
        if curves is not None:
            curves.close()
    return last_preds


def finish(
    ctx: RunContext,
    data: RunData,
    learner: Learner,
    state: TrainState,
    history: list[dict[str, Any]],
    last_preds: pd.DataFrame | None,
    elapsed_s: float,
) -> dict[str, float]:
    """Step 5: metrics.json (written last: the run is then completed) and the best metrics."""
    tcfg, info = ctx.cfg.train, ctx.info
    if state.best_epoch < 0:
        # The metric was never finite (e.g. one class only in val): keep the last epoch as "best".
        log.warning("%s was never finite; best.pt is the last epoch", tcfg.early_stop_metric)
        state.best_epoch = history[-1]["epoch"]
        if info.is_main:
            best = make_checkpoint(state, learner.model, to_dict(ctx.cfg))
            save_checkpoint(ctx.out / BEST, {**best, "prob_correction": learner.prob_correction})
            if last_preds is not None:
                atomic_write_csv(ctx.out / RUN_PREDICTIONS, last_preds[PRED_COLS])
    best = next(r for r in history if r["epoch"] == state.best_epoch)
    metrics = {k: float(v) for k, v in best.items() if k.startswith("val/")}
    summary = {
        "fold": ctx.fold,
        "role": ctx.role,
        "best_epoch": state.best_epoch,
        "epochs_run": len(history),
        "status": STATUS_COMPLETED,
        "metrics": metrics,
        "selection": {
            **data.selection,
            "epoch": "best on the validation side" if selects_epoch(ctx.cfg, ctx.fold) else "last (train.final_epoch)",
        },
        "prob_correction": learner.prob_correction,
        "distill": learner.distill,
        "teacher_outputs": learner.loss_fn.source,
        "model": learner.net_info,
        "world_size": info.world_size,
        "time_s": round(elapsed_s, 3),
        "job": slurm_task_id(),
    }
    if info.is_main:
        if ctx.lease is not None:
            ctx.lease.check()
        atomic_write_json(ctx.out / RUN_METRICS, summary)
    dist.barrier()
    log.info(
        "%s %s done: best epoch %d, %s %.4f",
        fold_name(ctx.fold),
        ctx.role,
        state.best_epoch,
        tcfg.early_stop_metric,
        metrics.get(tcfg.early_stop_metric, float("nan")),
    )
    return metrics


if __name__ == "__main__":  # the module entry moved to the command line layer (no import of it from here)
    import sys

    sys.stderr.write("python -m bonehpc.train: use `python -m bonehpc.cli.train ARGS` (or `bonehpc train ARGS`)\n")
    sys.exit(2)
