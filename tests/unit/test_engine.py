"""engine.train_one_epoch / evaluate on a real small model and in-memory batches (CPU, single process)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from bonehpc.dist import StopFlag
from bonehpc.engine import NonFiniteLossError, evaluate, train_one_epoch
from bonehpc.models import create_model

DEV = torch.device("cpu")


def _batches(n: int, bs: int = 4, size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        labels = torch.randint(0, 2, (bs,), generator=g)
        images = torch.randn(bs, 3, size, size, generator=g) + labels.view(-1, 1, 1, 1).float()
        out.append((images, labels, torch.arange(i * bs, (i + 1) * bs)))
    return out


def _ce(images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    assert ids.shape == labels.shape  # the loss gets the batch's image ids (cached teacher outputs look them up)
    loss = F.cross_entropy(logits, labels)
    return {"loss": loss, "task_loss": loss, "kd_loss": torch.zeros_like(loss)}


def _setup(steps_total: int = 100):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps_total)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, opt, sched, scaler


def _train(model, opt, sched, scaler, batches, **kw):  # noqa: ANN001, ANN202
    args = {"amp_dtype": None, "grad_clip": 1.0, "log_every": 2, "max_steps": 0, "stop_flag": None, **kw}
    return train_one_epoch(model, batches, _ce, opt, sched, scaler, DEV, **args)


def test_train_one_epoch_updates_and_reports() -> None:
    model, opt, sched, scaler = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    stats = _train(model, opt, sched, scaler, _batches(5))
    assert set(stats) == {"train/loss", "train/task_loss", "train/kd_loss", "train/img_per_s", "train/steps"}
    assert stats["train/steps"] == 5 and sched.last_epoch == 5
    assert stats["train/loss"] == pytest.approx(stats["train/task_loss"]) and stats["train/kd_loss"] == 0.0
    assert 0 < stats["train/loss"] < 10 and stats["train/img_per_s"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_max_steps_caps_the_epoch() -> None:
    model, opt, sched, scaler = _setup()
    assert _train(model, opt, sched, scaler, _batches(5), max_steps=3)["train/steps"] == 3
    assert sched.last_epoch == 3


def test_non_finite_loss_raises_with_the_step() -> None:
    model, opt, sched, scaler = _setup()
    batches = _batches(6)
    batches[3][0][0, 0, 0, 0] = float("nan")  # a corrupt image at step 3
    with pytest.raises(NonFiniteLossError, match="step 3"):
        _train(model, opt, sched, scaler, batches, log_every=100)  # detected at the end-of-epoch sync


def test_stop_flag_ends_the_epoch_at_a_step_boundary() -> None:
    model, opt, sched, scaler = _setup()
    flag = StopFlag(DEV)
    flag.set(12)
    stats = _train(model, opt, sched, scaler, _batches(5), stop_flag=flag)
    assert stats["train/steps"] == 1 and flag.stopped and flag.signal == 12


def test_evaluate_returns_each_image_once_sorted() -> None:
    model, *_ = _setup()
    model.train()
    batches = list(reversed(_batches(3)))
    df = evaluate(model, batches, DEV, None)
    assert list(df.columns) == ["image_id", "label", "prob", "loss"]
    assert df["image_id"].tolist() == list(range(12))
    assert df["prob"].between(0, 1).all() and (df["loss"] >= 0).all()
    assert model.training  # evaluate switched to eval mode and back
    with pytest.raises(RuntimeError, match="more than once"):
        evaluate(model, batches + batches[:1], DEV, None)
