"""One training epoch and one evaluation pass: explicit arguments, no host-device sync between log points."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812

from bonehpc import dist
from bonehpc.checkpoint import unwrap_model
from bonehpc.log import MetricLogger

log = logging.getLogger(__name__)

LossFn = Callable[..., dict[str, torch.Tensor]]
"""loss_fn(images, logits, labels, ids) -> {"loss", "task_loss"?, "kd_loss"?} (ids: the batch's image ids)."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


def amp_dtype_of(amp: str, device: torch.device) -> torch.dtype | None:
    """torch dtype of autocast for train.amp (None: full precision)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def _take(loader: Iterable[Any], n: int) -> Iterator[Any]:
    return islice(loader, n) if n else iter(loader)


def train_one_epoch(
    model: torch.nn.Module,
    loader: Any,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None,
    grad_clip: float,
    log_every: int,
    max_steps: int = 0,
    stop_flag: dist.StopFlag | None = None,
    header: str = "train",
) -> dict[str, float]:
    """Train for one pass over `loader` (at most `max_steps` steps; 0: all).

    Losses are summed on the device and read back only at log points and at the end. The stop flag
    is checked after every step in a single process and at log points under DDP (it costs a
    collective there); when it is agreed the epoch ends early and `stop_flag.stopped` is true.

    Returns:
        train/loss, train/task_loss, train/kd_loss (means over the steps of all ranks), train/img_per_s
        (this rank), train/steps.

    Raises:
        NonFiniteLossError: a loss was NaN/inf; the message gives the first such step.
    """
    model.train()
    total = min(len(loader), max_steps) if max_steps else len(loader)
    sums = torch.zeros(3, device=device)  # loss, task_loss, kd_loss
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    steps = 0
    meter = MetricLogger(log)

    def sync() -> None:  # the only host-device syncs of the epoch
        bad = int(first_bad.item())
        if bad >= 0:
            raise NonFiniteLossError(f"{header}: non-finite loss at step {bad} of the epoch (lr, data or AMP?)")
        if steps:
            means = (sums / steps).tolist()
            meter.update(loss=means[0], task=means[1], kd=means[2], lr=optimizer.param_groups[0]["lr"])

    for step, (images, labels, ids) in enumerate(
        meter.log_every(_take(loader, total), log_every, header, total, on_log=sync)
    ):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            out = loss_fn(images, logits, labels, ids)
        loss = out["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        parts = torch.stack(
            [loss.detach(), out.get("task_loss", loss).detach(), out.get("kd_loss", torch.zeros_like(loss)).detach()]
        ).float()
        sums += parts
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(parts[0]), step, first_bad)
        steps += 1
        check = not dist.is_dist() or steps % log_every == 0
        if stop_flag is not None and check and stop_flag.agreed():
            log.warning("%s: stop requested (signal %s) after step %d", header, stop_flag.signal, step)
            break
    sync()
    counts = torch.tensor([float(steps)], device=device)
    if dist.is_dist():  # means over all ranks' steps
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(counts)
    means = (sums / counts.clamp(min=1)).tolist()
    return {
        "train/loss": means[0],
        "train/task_loss": means[1],
        "train/kd_loss": means[2],
        "train/img_per_s": meter.img_per_s,
        "train/steps": float(steps),
    }


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, loader: Iterable[Any], device: torch.device, amp_dtype: torch.dtype | None
) -> pd.DataFrame:
    """Predict every image of `loader` on every rank and gather the results.

    The unwrapped model is used (a DDP forward could start a collective on ranks that have a
    different number of evaluation batches). The eval loader visits each image once across ranks,
    so nothing is de-duplicated silently: a duplicate id is an error.

    Returns:
        DataFrame sorted by image_id with image_id, label, prob (abnormal class) and loss (per-image
        cross-entropy), identical on every rank.
    """
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    ids, labels, probs, losses = [], [], [], []
    for images, y, idx in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = net(images)
        logits = logits.float()
        y = y.to(logits.device)
        ids.append(idx)
        labels.append(y)
        probs.append(torch.softmax(logits, dim=1)[:, 1])
        losses.append(F.cross_entropy(logits, y, reduction="none"))
    net.train(was_training)

    def cat(xs: list[torch.Tensor], dtype: Any) -> np.ndarray:
        return torch.cat(xs).cpu().numpy().astype(dtype) if xs else np.zeros(0, dtype=dtype)

    local = {
        "image_id": cat(ids, np.int64),
        "label": cat(labels, np.int64),
        "prob": cat(probs, np.float64),
        "loss": cat(losses, np.float64),
    }
    parts = dist.all_gather_object(local)
    df = pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in local})
    dup = df["image_id"].duplicated()
    if dup.any():
        raise RuntimeError(
            f"evaluation saw {int(dup.sum())} image(s) more than once (e.g. image_id "
            f"{int(df.loc[dup, 'image_id'].iloc[0])}): the eval loader must not pad or repeat across ranks"
        )
    return df.sort_values("image_id", kind="stable").reset_index(drop=True)
