"""Knowledge distillation as a loss wrapper: plain training (none) and soft / hard distillation share one loop.

The frozen teacher sees the very same augmented batch tensor as the student, inside the caller's autocast, so
the two are consistent; only the student gets gradients. With cached teacher outputs (`bonehpc.teacher_outputs`)
the teacher does not run at all: its logits on exactly these views were computed once, and are looked up by
(epoch, image id). When the teacher expects another input normalisation
than the loader's (`renormalisation`), one fused affine on the batch converts it; when they match, the batch
tensor itself goes to the teacher (no copy).

    none:  loss = task(student, y)
    soft:  kd = T^2 * KL(softmax(teacher / T) || softmax(student / T))   (batch mean)
           loss = (1 - alpha) * task + alpha * kd
    hard:  kd = CE(student, argmax teacher)
           loss = (1 - alpha) * task + alpha * kd
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from bonehpc.checkpoint import build_model_from_checkpoint, load_checkpoint

log = logging.getLogger(__name__)

KINDS = ("none", "soft", "hard")


def build_task_loss(class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> nn.CrossEntropyLoss:
    """Cross-entropy on the logits, optionally weighted per class (move it to the device with the model)."""
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
        if class_weights.ndim != 1 or not torch.all(class_weights > 0):
            raise ValueError(f"class_weights must be a 1-D tensor of positive values, got {class_weights}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)


def inverse_frequency_weights(labels: Sequence[int] | np.ndarray, num_classes: int = 2) -> torch.Tensor:
    """Class weights n / (num_classes * count_c) (sklearn's "balanced"), e.g. of the training images' labels.

    Raises:
        ValueError: A class has no example (its weight would be infinite).
    """
    y = np.asarray(labels, dtype=np.int64)
    classes = np.arange(num_classes)
    missing = sorted(set(classes.tolist()) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(f"inverse_frequency_weights: no example of class(es) {missing} among {len(y)} labels")
    return torch.tensor(compute_class_weight("balanced", classes=classes, y=y), dtype=torch.float32)


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode (BatchNorm statistics and dropout fixed); returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_frozen_teacher(checkpoint_path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a bonehpc checkpoint (``model_spec`` + ``model`` state_dict), frozen, in eval mode.

    The model's ``mean`` / ``std`` are the input normalisation it was trained with: the checkpoint
    config's ``augment.mean`` / ``augment.std`` when it records them (a bonehpc-trained teacher), else
    the model's own (timm ``pretrained_cfg``).

    Raises:
        FileNotFoundError: No checkpoint at the path (a student run needs its fold's teacher trained first).
        CheckpointError: The file is not a loadable bonehpc checkpoint (one line naming the problem).
    """
    path = os.fspath(checkpoint_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint {path} does not exist: train the teacher of this fold first")
    ckpt = load_checkpoint(path)
    model = build_model_from_checkpoint(ckpt)
    augment = (ckpt.get("config") or {}).get("augment") or {}
    if "mean" in augment and "std" in augment:
        model.mean = tuple(float(v) for v in augment["mean"])  # type: ignore[assignment]
        model.std = tuple(float(v) for v in augment["std"])  # type: ignore[assignment]
    log.info("teacher %s loaded from %s", ckpt["model_spec"]["name"], path)
    return freeze(model.to(device))


def teacher_and_input(
    checkpoint_path: str | os.PathLike[str],
    device: torch.device,
    channels_last: bool,
    loader_mean: Sequence[float],
    loader_std: Sequence[float],
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor] | None]:
    """The frozen teacher (channels_last on a GPU when the batches are) and its `renormalisation` from the loader's.

    The one way a teacher is made ready for batches: the online KD loss and the teacher-outputs job both use
    it, so the cached logits are the ones the online loss would compute.
    """
    teacher = load_frozen_teacher(checkpoint_path, device)
    if device.type == "cuda" and channels_last:  # same layout as the batches it sees
        teacher.to(memory_format=torch.channels_last)
    model_mean, model_std = teacher.mean, teacher.std  # plain attributes set by create_model
    renorm = renormalisation(loader_mean, loader_std, model_mean, model_std)  # type: ignore[arg-type]
    if renorm is not None:
        log.info(
            "teacher input renormalised from mean/std %s/%s to %s/%s", loader_mean, loader_std, model_mean, model_std
        )
    return teacher, renorm


def renormalisation(
    loader_mean: Sequence[float], loader_std: Sequence[float], model_mean: Sequence[float], model_std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift), each [1, C, 1, 1], with ``scale * x + shift`` = the batch normalised for the model.

    A batch x = (raw - loader_mean) / loader_std becomes (raw - model_mean) / model_std; None when the
    two normalisations are the same (the batch is then used as it is, no copy).
    """
    lm, ls, mm, ms = (
        torch.tensor([float(v) for v in t], dtype=torch.float64)
        for t in (loader_mean, loader_std, model_mean, model_std)
    )
    if torch.allclose(lm, mm, rtol=0, atol=1e-7) and torch.allclose(ls, ms, rtol=0, atol=1e-7):
        return None
    scale, shift = ls / ms, (lm - mm) / ms
    return scale.float().view(1, -1, 1, 1), shift.float().view(1, -1, 1, 1)


class DistillationLoss(nn.Module):
    """Task loss plus, for kind soft or hard, a distillation term from a frozen teacher.

    Called as ``loss_fn(images, logits, labels, ids=None) -> {"loss", "task_loss", "kd_loss"}`` (tensors; kd_loss is a
    zero tensor for kind none). The teacher is a registered submodule (``loss_fn.to(device)`` moves it) but
    ``train()`` never takes it out of eval mode, and its parameters never require gradients.

    Args:
        task_loss: Loss on (logits, labels), e.g. `build_task_loss(...)`.
        teacher: The teacher model (frozen here); required for soft and hard, ignored for none.
        kind: none, soft or hard.
        alpha: Weight of the distillation term (the task loss gets 1 - alpha).
        tau: Temperature of soft distillation.
        teacher_input: (scale, shift) from `renormalisation` when the teacher expects another input
            normalisation than the batches have (one fused affine per batch); None: the batch as it is.
        cached: the teacher's logits read from the fold's teacher-outputs file
            (`bonehpc.teacher_outputs.CachedTeacherOutputs`: ``set_epoch(e)``, ``lookup(ids)``) instead of a
            teacher forward; the loss is then called with the batch's image ids.
    """

    input_scale: torch.Tensor | None
    input_shift: torch.Tensor | None

    def __init__(
        self,
        task_loss: nn.Module,
        teacher: nn.Module | None,
        kind: str = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
        teacher_input: tuple[torch.Tensor, torch.Tensor] | None = None,
        cached: Any = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"distillation kind must be one of {KINDS}, got {kind!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"distillation tau must be > 0, got {tau}")
        if kind != "none" and teacher is None and cached is None:
            raise ValueError(f"distillation kind {kind!r} needs a teacher model or cached teacher outputs")
        self.task_loss = task_loss
        self.kind = kind
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.teacher = freeze(teacher) if teacher is not None and kind != "none" and cached is None else None
        self.cached = cached if kind != "none" else None
        scale, shift = teacher_input if teacher_input is not None and self.teacher is not None else (None, None)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)

    def train(self, mode: bool = True) -> DistillationLoss:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on the batch, as float32, without autograd."""
        if self.teacher is None:
            raise RuntimeError("no teacher (distillation kind none)")
        with torch.no_grad():
            if self.input_scale is not None and self.input_shift is not None:
                dtype = images.dtype
                images = torch.addcmul(self.input_shift.to(dtype), images, self.input_scale.to(dtype))
            return self.teacher(images).float()

    @property
    def source(self) -> str:
        """Where the teacher logits come from: cached, online or none."""
        return "cached" if self.cached is not None else "online" if self.teacher is not None else "none"

    def set_epoch(self, epoch: int, ids: Any = None) -> None:
        """The epoch of the next batches and this rank's ids in it (cached outputs: read and looked up by id)."""
        if self.cached is not None:
            self.cached.set_epoch(epoch, ids)

    def forward(
        self, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        task = self.task_loss(logits, labels)
        if self.teacher is None and self.cached is None:
            return {"loss": task, "task_loss": task.detach(), "kd_loss": torch.zeros((), device=task.device)}
        if self.cached is not None:
            if ids is None:
                raise RuntimeError("cached teacher outputs are looked up by image id: call the loss with the ids")
            t_logits = self.cached.lookup(ids)
        else:
            t_logits = self.teacher_logits(images)
        s_logits = logits.float()
        if self.kind == "soft":
            kd = F.kl_div(
                F.log_softmax(s_logits / self.tau, dim=1),
                F.log_softmax(t_logits / self.tau, dim=1),
                reduction="batchmean",
                log_target=True,
            ) * (self.tau**2)
        else:
            kd = F.cross_entropy(s_logits, t_logits.argmax(dim=1))
        loss = (1.0 - self.alpha) * task + self.alpha * kd
        return {"loss": loss, "task_loss": task.detach(), "kd_loss": kd.detach()}
