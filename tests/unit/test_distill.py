"""DistillationLoss maths against hand-computed values, teacher freezing, gradients, checkpoint loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from bonehpc.checkpoint import CheckpointError
from bonehpc.distill import (
    DistillationLoss,
    build_task_loss,
    inverse_frequency_weights,
    load_frozen_teacher,
    renormalisation,
)
from bonehpc.models import create_model


def identity_teacher() -> nn.Module:
    """A real (linear) teacher whose logits are its input: the test chooses the teacher logits as the 'images'."""
    t = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        t.weight.copy_(torch.eye(2))
    return t


def softmax(v: list[float]) -> list[float]:
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def ce(logits: list[float], label: int) -> float:
    return -math.log(softmax(logits)[label])


S = [[1.0, 0.0], [0.5, 1.5]]  # student logits
T_LOGITS = [[0.0, 2.0], [3.0, -1.0]]  # teacher logits
Y = [1, 0]


def soft_kd_by_hand(tau: float) -> float:
    total = 0.0
    for s, t in zip(S, T_LOGITS, strict=True):
        ps = softmax([x / tau for x in s])
        pt = softmax([x / tau for x in t])
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    return total / len(S) * tau**2


def test_soft_matches_hand_computation() -> None:
    loss_fn = DistillationLoss(build_task_loss(), identity_teacher(), kind="soft", alpha=0.5, tau=2.0)
    out = loss_fn(torch.tensor(T_LOGITS), torch.tensor(S, requires_grad=True), torch.tensor(Y))
    kd = soft_kd_by_hand(2.0)
    task = (ce(S[0], 1) + ce(S[1], 0)) / 2
    assert out["kd_loss"].item() == pytest.approx(kd, rel=1e-5)
    assert out["task_loss"].item() == pytest.approx(task, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * task + 0.5 * kd, rel=1e-5)


def test_soft_single_row_known_value() -> None:
    loss_fn = DistillationLoss(build_task_loss(), identity_teacher(), kind="soft", alpha=0.5, tau=2.0)
    out = loss_fn(torch.tensor([T_LOGITS[0]]), torch.tensor([S[0]]), torch.tensor([1]))
    # Worked out on paper: p_t = (0.26894, 0.73106), p_s = (0.62246, 0.37754), KL = 0.25741, x T^2 = 1.02964.
    assert out["kd_loss"].item() == pytest.approx(1.02964, abs=1e-4)
    assert out["task_loss"].item() == pytest.approx(1.31326, abs=1e-4)  # log(1 + e)
    assert out["loss"].item() == pytest.approx(0.5 * 1.31326 + 0.5 * 1.02964, abs=1e-4)


def test_hard_matches_hand_computation() -> None:
    loss_fn = DistillationLoss(build_task_loss(), identity_teacher(), kind="hard", alpha=0.25, tau=5.0)
    out = loss_fn(torch.tensor(T_LOGITS), torch.tensor(S), torch.tensor(Y))
    # teacher decisions: row 0 -> class 1, row 1 -> class 0 (tau plays no part)
    kd = (ce(S[0], 1) + ce(S[1], 0)) / 2
    task = (ce(S[0], Y[0]) + ce(S[1], Y[1])) / 2
    assert out["kd_loss"].item() == pytest.approx(kd, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.75 * task + 0.25 * kd, rel=1e-6)
    # A label disagreeing with the teacher: task and kd differ.
    out = loss_fn(torch.tensor([T_LOGITS[0]]), torch.tensor([S[0]]), torch.tensor([0]))
    assert out["task_loss"].item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert out["kd_loss"].item() == pytest.approx(math.log(1 + math.e), rel=1e-6)


def test_none_is_exactly_the_task_loss() -> None:
    weights = torch.tensor([0.7, 1.8])
    task = build_task_loss(weights)
    loss_fn = DistillationLoss(task, identity_teacher(), kind="none", alpha=0.9, tau=3.0)
    logits, labels = torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
    out = loss_fn(torch.randn(5, 2), logits, labels)
    assert torch.equal(out["loss"], nn.CrossEntropyLoss(weight=weights)(logits, labels))
    assert out["kd_loss"].item() == 0.0 and out["kd_loss"].ndim == 0
    assert loss_fn.teacher is None  # no teacher forward passes are spent on plain training


def test_alpha_extremes() -> None:
    args = (torch.tensor(T_LOGITS), torch.tensor(S), torch.tensor(Y))
    only_task = DistillationLoss(build_task_loss(), identity_teacher(), "soft", alpha=0.0, tau=2.0)(*args)
    only_kd = DistillationLoss(build_task_loss(), identity_teacher(), "soft", alpha=1.0, tau=2.0)(*args)
    assert only_task["loss"].item() == pytest.approx(only_task["task_loss"].item())
    assert only_kd["loss"].item() == pytest.approx(only_kd["kd_loss"].item())


def test_gradients_reach_the_student_only_and_teacher_stays_frozen() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    loss_fn = DistillationLoss(build_task_loss(), teacher, kind="soft", alpha=0.5, tau=2.0)
    loss_fn.train()  # the engine may call train() on everything; the teacher must stay in eval
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    running = teacher[2].running_mean.clone()
    images = torch.randn(6, 3, 2, 2)
    out = loss_fn(images, student(images), torch.tensor([0, 1, 0, 1, 1, 0]))
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert torch.equal(teacher[2].running_mean, running)  # eval-mode BatchNorm: statistics untouched
    assert not out["task_loss"].requires_grad and not out["kd_loss"].requires_grad


def test_under_autocast_teacher_logits_are_float() -> None:
    torch.manual_seed(0)
    teacher = create_model("hybrid_tiny", img_size=64)
    student = create_model("hybrid_tiny", img_size=64)
    loss_fn = DistillationLoss(build_task_loss(), teacher, kind="soft", alpha=0.5, tau=2.0)
    images = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(images)
        assert loss_fn.teacher_logits(images).dtype == torch.float32
        out = loss_fn(images, logits, torch.tensor([0, 1]))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


@pytest.mark.parametrize(
    ("kind", "teacher", "alpha", "tau", "match"),
    [
        ("medium", True, 0.5, 1.0, "kind"),
        ("soft", False, 0.5, 1.0, "needs a teacher"),
        ("soft", True, 1.5, 1.0, "alpha"),
        ("hard", True, 0.5, 0.0, "tau"),
    ],
)
def test_bad_arguments(kind: str, teacher: bool, alpha: float, tau: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillationLoss(build_task_loss(), identity_teacher() if teacher else None, kind, alpha, tau)


def test_task_loss_class_weights_and_smoothing() -> None:
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 1, 1])
    w = torch.tensor([1.0, 3.0])
    per = [ce([2.0, 0.0], 0), ce([0.0, 1.0], 1), ce([1.0, 1.0], 1)]
    expected = (1.0 * per[0] + 3.0 * per[1] + 3.0 * per[2]) / (1.0 + 3.0 + 3.0)
    assert build_task_loss(w)(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert build_task_loss(None, label_smoothing=0.1)(logits, labels).item() > build_task_loss()(logits, labels).item()
    with pytest.raises(ValueError, match="positive"):
        build_task_loss(torch.tensor([1.0, 0.0]))


def test_inverse_frequency_weights() -> None:
    w = inverse_frequency_weights([0, 0, 0, 1])
    assert w.tolist() == pytest.approx([4 / 6, 4 / 2])
    # MURA-like 60/40 split: the abnormal class weighs 1.5x the normal one
    w = inverse_frequency_weights([0] * 60 + [1] * 40)
    assert (w[1] / w[0]).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="no example"):
        inverse_frequency_weights([0, 0, 0])


def _checkpoint(model: nn.Module, prefix: str = "") -> dict:
    return {
        "format_version": 1,
        "model_spec": model.bonehpc_spec,
        "config": {"augment": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}},
        "model": {prefix + k: v for k, v in model.state_dict().items()},
    }


@pytest.mark.parametrize("prefix", ["", "module."])
def test_load_frozen_teacher(tmp_path, prefix: str) -> None:
    torch.manual_seed(1)
    model = create_model("hybrid_tiny", img_size=64, depth=1).eval()
    path = tmp_path / "best.pt"
    torch.save(_checkpoint(model, prefix), path)
    teacher = load_frozen_teacher(path, "cpu")
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    # The normalisation it was trained with (its checkpoint's config), not the model's default.
    assert teacher.mean == (0.5, 0.5, 0.5) and teacher.std == (0.25, 0.25, 0.25)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model(x))


def test_load_frozen_teacher_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train the teacher"):
        load_frozen_teacher(tmp_path / "missing.pt")
    torch.save({"model": {}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing format_version, model_spec"):
        load_frozen_teacher(tmp_path / "bad.pt")


class RecordingTeacher(nn.Module):
    """A teacher whose logits are the channel means of what it is given; it keeps its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return self.head(x.mean(dim=(2, 3)))


def test_teacher_gets_its_own_normalisation_in_one_affine() -> None:
    torch.manual_seed(0)
    raw = torch.rand(4, 3, 8, 8)  # 0..1 pixels
    loader_mean, loader_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    teacher_mean, teacher_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # e.g. an inception-style timm model
    batch = (raw - torch.tensor(loader_mean).view(1, 3, 1, 1)) / torch.tensor(loader_std).view(1, 3, 1, 1)
    renorm = renormalisation(loader_mean, loader_std, teacher_mean, teacher_std)
    assert renorm is not None
    teacher = RecordingTeacher()
    loss_fn = DistillationLoss(build_task_loss(), teacher, "soft", 0.5, 2.0, teacher_input=renorm)
    loss_fn(batch, torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    expected = (raw - 0.5) / 0.5
    assert torch.allclose(teacher.seen[-1], expected, atol=1e-6)

    # Same statistics: no affine, the very batch tensor (no second copy) reaches the teacher.
    assert renormalisation(loader_mean, loader_std, loader_mean, loader_std) is None
    same = DistillationLoss(build_task_loss(), teacher, "soft", 0.5, 2.0, teacher_input=None)
    same(batch, torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    assert teacher.seen[-1] is batch
    assert same.input_scale is None
