"""Checkpoints: weights_only round trip (model, optimizer, scheduler, RNG), atomic writes, clear errors."""

from __future__ import annotations

import argparse
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from bonehpc.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    TrainState,
    build_model_from_checkpoint,
    capture_rng,
    find_resume,
    load_checkpoint,
    load_training_checkpoint,
    make_checkpoint,
    model_spec,
    restore_rng,
    save_checkpoint,
    unwrap_model,
    weights_payload,
)
from bonehpc.models import create_model


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    net(torch.zeros(1, 3, 6, 6))
    net.bonehpc_spec = {"name": "toy", "kwargs": {"width": 4}}  # type: ignore[assignment]
    return net


def _state(net: torch.nn.Module) -> dict:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    net(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    sched.step()
    return {
        "format_version": 1,
        "model_spec": model_spec(net),
        "model": unwrap_model(net).state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "epoch": 3,
        "step": 42,
        "best_metric": float("nan"),
        "best_epoch": -1,
        "config": {"name": "x", "augment": {"mean": [0.1, 0.2, 0.3]}},
        "rng": capture_rng(),
        "fold": "final",
        "role": "student",
    }


def test_round_trip_weights_only_including_rng(tmp_path: Path) -> None:
    net = _net()
    state = _state(net)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    p = save_checkpoint(tmp_path / "run" / "last.pt", state)

    torch.rand(5), np.random.rand(5), random.random()  # move every generator on
    back = load_checkpoint(p)  # weights_only=True inside
    restore_rng(back["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]

    assert back["model_spec"] == {"name": "toy", "kwargs": {"width": 4}}
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v), k
    assert back["epoch"] == 3 and back["step"] == 42 and back["fold"] == "final"
    assert np.isnan(back["best_metric"])
    opt = torch.optim.AdamW(_net().parameters(), lr=1e-3)
    opt.load_state_dict(back["optimizer"])
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert back["scheduler"]["last_epoch"] == 1
    # The file is a plain torch zip, readable by torch.load(weights_only=True) directly.
    assert torch.load(p, weights_only=True)["config"]["augment"]["mean"] == [0.1, 0.2, 0.3]


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path: Path) -> None:
    net = _net()
    p = save_checkpoint(tmp_path / "last.pt", _state(net))
    before = p.read_bytes()
    bad = _state(net)
    bad["config"] = {"oops": lambda: None}  # torch.save cannot pickle a lambda: fails mid-write
    with pytest.raises(Exception, match="lambda|pickle|Can't"):
        save_checkpoint(p, bad)
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["last.pt"]


def test_corrupt_truncated_and_foreign_files_give_clear_errors(tmp_path: Path) -> None:
    p = save_checkpoint(tmp_path / "last.pt", _state(_net()))
    data = p.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.pt: corrupt or truncated"):
        load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a bonehpc checkpoint"):
        load_checkpoint(tmp_path / "other.pt")

    # The classic mistake: an argparse Namespace inside the checkpoint.
    torch.save(
        {"format_version": 1, "model_spec": {}, "model": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt"
    )
    with pytest.raises(CheckpointError, match="weights_only=True.*argparse.Namespace") as info:
        load_checkpoint(tmp_path / "pickled.pt")
    assert "False" not in str(info.value)  # never the advice to unpickle arbitrary code


def _one_line_error(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format_version": 2}, "format_version 2 is not one this bonehpc reads"),
        ({"format_version": "1"}, "format_version '1'"),
        ({"format_version": 0}, "format_version 0"),
        ({"model_spec": {"kwargs": {}}}, "model_spec must be"),
        ({"model_spec": None}, "model_spec must be"),
        ({"model": [1, 2]}, "'model' is not a state_dict"),
    ],
)
def test_incompatible_checkpoints_are_one_line_errors(tmp_path: Path, change: dict, match: str) -> None:
    state = {**_state(_net()), **change}
    torch.save(state, tmp_path / "x.pt")
    _one_line_error(tmp_path / "x.pt", match)


def test_truncated_and_keyless_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    p = save_checkpoint(tmp_path / "last.pt", _state(_net()))
    data = p.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 30):
        (tmp_path / "t.pt").write_bytes(data[:cut])
        _one_line_error(tmp_path / "t.pt", "corrupt or truncated")
    torch.save({"format_version": 1, "model": {}}, tmp_path / "k.pt")
    _one_line_error(tmp_path / "k.pt", "missing model_spec")
    state = _state(_net())
    del state["optimizer"]
    save_checkpoint(tmp_path / "w.pt", state)
    with pytest.raises(CheckpointError, match="missing optimizer"):
        load_training_checkpoint(tmp_path / "w.pt", "final", "student", "toy")
    with pytest.raises(CheckpointError, match="belongs to final/student, not 0/teacher"):
        load_training_checkpoint(p, 0, "teacher", "toy")


def test_saved_checkpoints_honour_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        p = save_checkpoint(tmp_path / "best.pt", _state(_net()))
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640  # group members read checkpoints on shared storage


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"checkpoint_path": "/etc/passwd"}, "checkpoint_path"),
        ({"pretrained_cfg": {"file": "x"}}, "pretrained_cfg"),
        ({"depth": 1, "banana": 3}, "banana"),
    ],
)
def test_model_spec_kwargs_must_be_documented(kwargs: dict, match: str) -> None:
    model = create_model("hybrid_tiny", img_size=32)
    state = {"format_version": 1, "model_spec": {"name": "hybrid_tiny", "kwargs": kwargs}, "model": model.state_dict()}
    with pytest.raises(CheckpointError, match=f"model_spec: model 'hybrid_tiny' takes no keyword.*{match}") as info:
        build_model_from_checkpoint(state)
    assert "\n" not in str(info.value)


def test_weights_that_do_not_fit_are_one_line_errors() -> None:
    model = create_model("hybrid_tiny", img_size=32)
    weights = model.state_dict()
    weights.pop(next(iter(weights)))
    state = {"format_version": 1, "model_spec": model.bonehpc_spec, "model": weights}
    with pytest.raises(CheckpointError, match="do not fit the model: missing 1") as info:
        build_model_from_checkpoint(state)
    assert "\n" not in str(info.value)


def test_weights_payload_and_background_writer(tmp_path: Path) -> None:
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    state = TrainState("final", "teacher", epoch=2, step=7, best_metric=0.5, best_epoch=1)
    full = make_checkpoint(state, net, {"name": "x"}, optimizer=opt, scheduler=None, scaler=None)
    best = weights_payload(full)
    assert full["payload"] == "training" and best["payload"] == "weights"
    assert not {"optimizer", "scheduler", "scaler", "rng"} & set(best)
    assert best["model_spec"] == full["model_spec"] and best["epoch"] == 2 and best["best_epoch"] == 1
    before = {k: v.clone() for k, v in full["model"].items()}
    with torch.no_grad():  # the payload is a copy: training may go on while it is written
        for p in net.parameters():
            p.add_(1.0)
    writer = CheckpointWriter()
    writer.submit([(tmp_path / "best.pt", best), (tmp_path / "last.pt", full)])
    writer.wait()
    back = load_checkpoint(tmp_path / "best.pt")
    assert all(torch.equal(back["model"][k], v) for k, v in before.items())
    assert "optimizer" in load_checkpoint(tmp_path / "last.pt")
    assert os.path.getsize(tmp_path / "best.pt") < os.path.getsize(tmp_path / "last.pt")
    writer.submit([(tmp_path / "bad.pt", {"model": {}})])  # lacks keys: the error reaches wait()
    with pytest.raises(CheckpointError, match="lacks format_version"):
        writer.wait()


def test_find_resume(tmp_path: Path) -> None:
    assert find_resume(tmp_path) is None
    save_checkpoint(tmp_path / "best.pt", _state(_net()))
    assert find_resume(tmp_path) is None
    save_checkpoint(tmp_path / "last.pt", _state(_net()))
    assert find_resume(tmp_path) == tmp_path / "last.pt"


def test_model_without_spec_is_refused() -> None:
    with pytest.raises(CheckpointError, match="create_model"):
        model_spec(torch.nn.Linear(2, 2))


def test_write_failure_is_one_line_and_leaves_the_old_file(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A full disk (torch's zip writer raises a RuntimeError mid-write) names the file and the free space."""
    p = save_checkpoint(tmp_path / "last.pt", _state(_net()))
    before = p.read_bytes()

    def full_disk(obj, f) -> None:  # noqa: ANN001
        f.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726\nmore")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"last\.pt: cannot write the checkpoint \(.* MB free there; ") as info:
        save_checkpoint(p, _state(_net()))
    assert "\n" not in str(info.value)
    assert p.read_bytes() == before and sorted(x.name for x in tmp_path.iterdir()) == ["last.pt"]
