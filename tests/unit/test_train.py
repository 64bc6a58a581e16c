"""train.run on the tiny synthetic set (CPU): the files of a run, KD, idempotence, preemption + resume, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tinyexp import tiny_overrides

from bonehpc.checkpoint import load_checkpoint
from bonehpc.config import apply_overrides, load_config, save_config
from bonehpc.data.folds import read_folds
from bonehpc.data.shards import ShardReader
from bonehpc.metrics import evaluate_predictions
from bonehpc.paths import ExperimentPaths
from bonehpc.cli.train import main
from bonehpc.constants import PREEMPTED_EXIT_CODE
from bonehpc.train import run, split_ids

ROOT = Path(__file__).resolve().parents[2]
RUN_FILES = {"config.yaml", "metrics.jsonl", "metrics.json", "predictions_val.csv", "last.pt", "best.pt", "train.log"}
# Values that depend on the wall clock, not on the computation.
TIMING_KEYS = {"time_s", "train/img_per_s"}


def _tiny(tmp: Path, synth_root: Path, shards_dir: Path, *extra: str):  # noqa: ANN202 - ExperimentConfig
    """The tiny_cfg of conftest, for module-scoped fixtures (tiny_cfg itself is per test)."""
    return load_config(None, tiny_overrides(tmp / "runs", synth_root, shards_dir, *extra))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synth_root: Path, shards_dir: Path):  # noqa: ANN201
    """Fold 0 teacher, then its KD student, trained once for the tests of this module."""
    cfg = _tiny(tmp_path_factory.mktemp("trained"), synth_root, shards_dir)
    t0 = time.perf_counter()
    teacher = run(cfg, 0, "teacher")
    t1 = time.perf_counter()
    student = run(cfg, 0, "student")
    t2 = time.perf_counter()
    return cfg, teacher, student, (t1 - t0, t2 - t1)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_run_dir(d: Path, role: str, val_ids: np.ndarray) -> dict:
    assert {p.name for p in d.iterdir()} >= RUN_FILES, sorted(p.name for p in d.iterdir())
    (rec,) = _records(d / "metrics.jsonl")
    for key in (
        "epoch",
        "lr",
        "time_s",
        "train/loss",
        "train/task_loss",
        "train/kd_loss",
        "train/img_per_s",
        "val/loss",
        "val/study_kappa",
        "val/study_auroc",
        "val/image_auroc",
        "val/study_n",
    ):
        assert key in rec, key
    summary = json.loads((d / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["role"] == role and summary["fold"] == 0
    assert summary["best_epoch"] == 0 and summary["epochs_run"] == 1
    assert summary["model"]["params"] > 0 and summary["model"]["gflops"] > 0
    assert summary["metrics"] == {k: v for k, v in rec.items() if k.startswith("val/")}
    preds = pd.read_csv(d / "predictions_val.csv")
    assert list(preds.columns) == ["image_id", "study", "body_part", "label", "prob"]
    assert sorted(preds["image_id"]) == sorted(val_ids.tolist())  # every validation image once
    recomputed = evaluate_predictions(preds)
    assert recomputed["study_auroc"] == pytest.approx(summary["metrics"]["val/study_auroc"], nan_ok=True)
    ckpt = load_checkpoint(d / "best.pt")  # weights_only=True
    assert ckpt["role"] == role and ckpt["fold"] == 0 and ckpt["epoch"] == 1
    assert ckpt["model_spec"]["name"] == summary["model"]["name"]
    assert "train" in (d / "train.log").read_text()
    return rec


def _val_ids(cfg) -> np.ndarray:  # noqa: ANN001
    reader = ShardReader(cfg.data.shards)
    return split_ids(reader.index, read_folds(ExperimentPaths.of(cfg).folds), 0, cfg.data.num_folds)[1]


def test_teacher_run_writes_every_file(trained) -> None:  # noqa: ANN001
    cfg, metrics, _, _ = trained
    paths = ExperimentPaths.of(cfg)
    assert paths.folds.is_file()  # created on first use
    rec = _check_run_dir(paths.role_dir(0, "teacher"), "teacher", _val_ids(cfg))
    assert rec["train/kd_loss"] == 0.0
    assert set(metrics) == {k for k in rec if k.startswith("val/")}


def test_student_distils_from_the_fold_teacher(trained) -> None:  # noqa: ANN001
    cfg, _, metrics, _ = trained
    rec = _check_run_dir(ExperimentPaths.of(cfg).role_dir(0, "student"), "student", _val_ids(cfg))
    assert rec["train/kd_loss"] > 0  # soft KD against the teacher's logits
    assert rec["train/loss"] == pytest.approx(0.5 * rec["train/task_loss"] + 0.5 * rec["train/kd_loss"], rel=1e-4)


def test_completed_run_is_not_trained_again(trained) -> None:  # noqa: ANN001
    cfg, teacher, _, _ = trained
    d = ExperimentPaths.of(cfg).role_dir(0, "teacher")
    stamp = (d / "last.pt").stat().st_mtime_ns, (d / "metrics.jsonl").read_text()
    t0 = time.perf_counter()
    again = run(cfg, 0, "teacher")
    assert time.perf_counter() - t0 < 1.0
    assert again == pytest.approx(teacher, nan_ok=True)
    assert ((d / "last.pt").stat().st_mtime_ns, (d / "metrics.jsonl").read_text()) == stamp


def test_student_without_teacher_names_the_missing_step(tiny_cfg) -> None:  # noqa: ANN001
    with pytest.raises(FileNotFoundError, match="train the teacher of fold1 first"):
        run(tiny_cfg, 1, "student")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_torchrun_two_processes_give_the_same_predictions(trained, tmp_path: Path) -> None:  # noqa: ANN001
    """The same best.pt evaluated by 2 gloo ranks (each half of the images) and by 1 process."""
    cfg, *_ = trained
    d = ExperimentPaths.of(cfg).role_dir(0, "teacher")
    cfg_path = save_config(cfg, tmp_path / "cfg.yaml")
    out = tmp_path / "preds_ddp.csv"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "bonehpc.evaluate",
        "--config",
        str(cfg_path),
        "--checkpoint",
        str(d / "best.pt"),
        "--fold",
        "0",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = pd.read_csv(out)
    single = pd.read_csv(d / "predictions_val.csv")  # written by the 1-process run from the same weights
    assert ddp["image_id"].tolist() == single["image_id"].tolist()
    np.testing.assert_allclose(ddp["prob"], single["prob"], atol=1e-5)
    m_ddp, m_one = evaluate_predictions(ddp), evaluate_predictions(single)
    for key in ("study_auroc", "study_kappa", "image_auroc", "study_n", "image_n"):
        assert m_ddp[key] == pytest.approx(m_one[key], abs=1e-6, nan_ok=True), key


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_preempted_run_resumes_to_the_same_result(tiny_cfg, tmp_path: Path) -> None:  # noqa: ANN001
    """SIGUSR2 during epoch 2 -> exit status 3; the restart ends exactly like an uninterrupted run."""
    overrides = {
        "teacher.model": "hybrid_tiny",
        "teacher.epochs": 2,
        "teacher.warmup_epochs": 0.5,
        "train.num_threads": 2,
    }
    cfg = apply_overrides(tiny_cfg, overrides)
    cfg_path = save_config(cfg, tmp_path / "cfg.yaml")
    straight = tmp_path / "straight"
    interrupted = tmp_path / "interrupted"
    ref = run(cfg, 0, "teacher", straight)

    def send_when_epoch_one_is_logged() -> None:
        jsonl = interrupted / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if jsonl.is_file() and jsonl.read_text().count("\n") >= 1:
                os.kill(os.getpid(), signal.SIGUSR2)
                return
            time.sleep(0.005)

    sender = threading.Thread(target=send_when_epoch_one_is_logged, daemon=True)
    sender.start()
    rc = main(["--config", str(cfg_path), "--fold", "0", "--role", "teacher", "--run-dir", str(interrupted)])
    sender.join(timeout=5)
    assert rc == PREEMPTED_EXIT_CODE
    assert not (interrupted / "metrics.json").exists()
    assert len(_records(interrupted / "metrics.jsonl")) == 1
    assert load_checkpoint(interrupted / "last.pt")["epoch"] == 1
    assert (
        "preempted" in (interrupted / "train.log").read_text().lower()
        or "stop requested" in (interrupted / "train.log").read_text()
    )

    resumed = run(cfg, 0, "teacher", interrupted)
    assert resumed == pytest.approx(ref, nan_ok=True)
    assert _comparable(_records(interrupted / "metrics.jsonl")) == _comparable(_records(straight / "metrics.jsonl"))
    a, b = load_checkpoint(interrupted / "last.pt"), load_checkpoint(straight / "last.pt")
    assert a["step"] == b["step"]
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
