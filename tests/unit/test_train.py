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
from bonehpc.cli.train import main
from bonehpc.config import apply_overrides, load_config, save_config
from bonehpc.constants import PREEMPTED_EXIT_CODE
from bonehpc.data.folds import read_folds, split_ids
from bonehpc.data.shards import ShardReader
from bonehpc.metrics import evaluate_predictions
from bonehpc.paths import ExperimentPaths
from bonehpc.train import run

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
    assert ckpt["payload"] == "weights" and "optimizer" not in ckpt and "rng" not in ckpt  # no optimizer state
    assert load_checkpoint(d / "last.pt")["payload"] == "training"
    assert ckpt["model_spec"]["name"] == summary["model"]["name"]
    log_text = (d / "train.log").read_text()
    assert "train" in log_text
    assert "shards verified: OK " in log_text and "VerifyReport(" not in log_text  # the readable summary
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


@pytest.mark.parametrize("every", [1, 0])
def test_preempted_run_resumes_to_the_same_result(tiny_cfg, tmp_path: Path, every: int) -> None:  # noqa: ANN001
    """SIGUSR2 during epoch 2 -> exit status 3; the restart ends exactly like an uninterrupted run.

    every=0: last.pt is not written at the end of epoch 1 (only at the end); the preemption writes it.
    """
    overrides = {
        "teacher.model": "hybrid_tiny",
        "teacher.epochs": 2,
        "teacher.warmup_epochs": 0.5,
        "train.num_threads": 2,
        "train.checkpoint_every_epochs": every,
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
    _assert_curves_match_jsonl(interrupted)  # the resumed run's curves: each epoch once, as in metrics.jsonl
    a, b = load_checkpoint(interrupted / "last.pt"), load_checkpoint(straight / "last.pt")
    assert a["step"] == b["step"]
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k


# ---------------------------------------------------------------------------------------------- selection, roles


def test_no_valid_split_image_is_evaluated_while_training(tiny_cfg, monkeypatch) -> None:  # noqa: ANN001
    """Fold and final runs of every role: the eval loader never holds an image of the official valid split
    (the holdout); the final run selects on held-out train patients and records how."""
    import bonehpc.train as train_mod

    seen: list[np.ndarray] = []
    real_evaluate = train_mod.evaluate

    def spy(model, loader, device, amp_dtype):  # noqa: ANN001, ANN202
        preds = real_evaluate(model, loader, device, amp_dtype)
        seen.append(preds["image_id"].to_numpy())
        return preds

    monkeypatch.setattr(train_mod, "evaluate", spy)
    cfg = apply_overrides(tiny_cfg, {"teacher.model": "hybrid_tiny", "train.max_steps_per_epoch": 1})
    index = ShardReader(cfg.data.shards).index
    valid = set(index.loc[index["split"] == "valid", "image_id"])
    train = index[index["split"] == "train"]
    for fold, role in ((0, "teacher"), ("final", "teacher"), ("final", "student"), ("final", "baseline")):
        run(cfg, fold, role)
    assert len(seen) == 4 and all(len(ids) for ids in seen)
    assert not set(np.concatenate(seen).tolist()) & valid

    paths = ExperimentPaths.of(cfg)
    summary = json.loads((paths.role_dir("final", "teacher") / "metrics.json").read_text())
    sel = summary["selection"]
    assert sel["method"].startswith("held-out train patients") and sel["val_frac"] == cfg.train.final_val_frac
    slice_ids = pd.read_csv(paths.role_dir("final", "teacher") / "predictions_val.csv")["image_id"]
    assert sel["images"] == len(slice_ids) and set(slice_ids) <= set(train["image_id"])
    held = set(train.loc[train["image_id"].isin(slice_ids), "patient"])
    assert sel["patients"] == len(held)
    # Patient-grouped: every image of a held-out patient is in the slice, none of the others.
    assert set(train.loc[train["patient"].isin(held), "image_id"]) == set(slice_ids)
    # The student and the baseline select on the same slice as the teacher.
    for role in ("student", "baseline"):
        other = pd.read_csv(paths.role_dir("final", role) / "predictions_val.csv")["image_id"]
        assert sorted(other) == sorted(slice_ids)
    fold_sel = json.loads((paths.role_dir(0, "teacher") / "metrics.json").read_text())["selection"]
    assert fold_sel["method"] == "cross-validation fold" and fold_sel["fold"] == 0


def test_baseline_is_the_student_without_a_teacher(tiny_cfg) -> None:  # noqa: ANN001
    """No teacher exists for fold 1: the baseline trains anyway (it loads none), with no KD term.

    Under umask 0o027 every file of the run is group-readable, 0o640 (shared storage)."""
    old = os.umask(0o027)
    try:
        run(tiny_cfg, 1, "baseline")
    finally:
        os.umask(old)
    d = ExperimentPaths.of(tiny_cfg).role_dir(1, "baseline")
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in d.iterdir()}
    assert set(modes.values()) == {"0o640"} and {"best.pt", "last.pt", "metrics.json"} <= set(modes), modes
    (rec,) = _records(d / "metrics.jsonl")
    assert rec["train/kd_loss"] == 0.0 and rec["train/loss"] == pytest.approx(rec["train/task_loss"])
    summary = json.loads((d / "metrics.json").read_text())
    assert summary["distill"] == "none" and summary["model"]["name"] == tiny_cfg.student.model
    assert load_checkpoint(d / "best.pt")["role"] == "baseline"
    assert not ExperimentPaths.of(tiny_cfg).role_dir(1, "teacher").exists()


def test_folds_come_from_the_shard_index(tiny_cfg) -> None:  # noqa: ANN001
    """folds.csv is made from the packed images; a fold patient with no packed image is left out, not fatal."""
    index = ShardReader(tiny_cfg.data.shards).index
    folds = pd.concat([_folds_of(tiny_cfg, index), pd.DataFrame({"patient": ["lost_in_packing"], "fold": [0]})])
    train_ids, val_ids = split_ids(index, folds, 0, tiny_cfg.data.num_folds)
    train = index[index["split"] == "train"]
    assert sorted([*train_ids, *val_ids]) == sorted(train["image_id"])


def _folds_of(cfg, index: pd.DataFrame) -> pd.DataFrame:  # noqa: ANN001
    from bonehpc.data.folds import make_folds

    return make_folds(index, cfg.data.num_folds, cfg.data.fold_seed)


def test_fold_out_of_range_fails_before_writing_anything(tiny_cfg, tmp_path: Path) -> None:  # noqa: ANN001
    """`python -m bonehpc.cli.train --fold 5` with 2 folds: one line, exit 2, no folds.csv, no run folder."""
    cfg_path = save_config(tiny_cfg, tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "bonehpc.cli.train", "--config", str(cfg_path), "--fold", "5", "--role", "teacher"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fold 5 is not in 0..1" in lines[0], proc.stderr
    assert not ExperimentPaths.of(tiny_cfg).root.exists()


def test_unwritable_run_folder_is_one_line_exit_2(tiny_cfg, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    if os.geteuid() == 0:
        out = Path("/sys/bonehpc-test/run")  # sysfs refuses new folders even to root
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "run"
    cfg_path = save_config(tiny_cfg, tmp_path / "cfg.yaml")
    rc = main(["--config", str(cfg_path), "--fold", "0", "--role", "teacher", "--run-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not writable" in err[0] and str(out) in err[0], err
    assert not ExperimentPaths.of(tiny_cfg).folds.exists()


def test_epoch_line_prints_each_metric_once() -> None:
    from bonehpc.train import epoch_line

    record = {
        "epoch": 3,
        "train/loss": 0.5,
        "val/loss": 0.4,
        "val/study_auroc": 0.75,
        "val/study_kappa": 0.3,
        "time_s": 2,
    }
    line = epoch_line(record, "val/study_auroc", improved=True)
    assert line.count("val/study_auroc") == 1 and "val/study_kappa" not in line and line.endswith("* best")
    line = epoch_line(record, "val/study_kappa", improved=False)
    assert line.count("val/study_auroc") == 1 and line.count("val/study_kappa 0.3000") == 1


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_last_checkpoint_cadence(tmp_path: Path, monkeypatch, device: str) -> None:  # noqa: ANN001
    """last.pt every N epochs and/or M minutes; a skipped epoch's state is kept for a preemption.

    device "cuda" (only the label: the tensors stay on the CPU) takes the background-writer path."""
    import bonehpc.train as train_mod
    from bonehpc.checkpoint import TrainState
    from bonehpc.config import TrainConfig
    from bonehpc.models import create_model

    model = create_model("hybrid_tiny", img_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    learner = train_mod.Learner(
        model, model, {}, None, "none", opt, train_mod.build_scheduler(opt, 1, 10),
        torch.amp.GradScaler("cpu", enabled=False), None, torch.device(device),
    )  # fmt: skip
    clock = [0.0]
    monkeypatch.setattr(train_mod.time, "monotonic", lambda: clock[0])
    state = TrainState(0, "teacher")

    def epoch(ckpts: train_mod.RunCheckpoints, improved: bool = False, final: bool = False) -> int | None:
        state.epoch += 1
        ckpts.end_of_epoch(state, improved, final)
        ckpts.close()
        return load_checkpoint(tmp_path / "last.pt")["epoch"] if (tmp_path / "last.pt").exists() else None

    ckpts = train_mod.RunCheckpoints(tmp_path, TrainConfig(checkpoint_every_epochs=2), {}, learner)
    assert epoch(ckpts, improved=True) is None and (tmp_path / "best.pt").is_file()
    assert ckpts.pending is not None and ckpts.pending["epoch"] == 1
    assert epoch(ckpts) == 2 and ckpts.pending is None
    assert epoch(ckpts) == 2
    assert epoch(ckpts, final=True) == 4  # the last epoch always writes last.pt

    (tmp_path / "last.pt").unlink()
    state.epoch = 0
    ckpts = train_mod.RunCheckpoints(
        tmp_path, TrainConfig(checkpoint_every_epochs=0, checkpoint_every_min=5), {}, learner
    )
    clock[0] = 299.0
    assert epoch(ckpts) is None
    clock[0] = 301.0
    assert epoch(ckpts) == 2
    clock[0] = 400.0
    assert epoch(ckpts) == 2
    ckpts.preempted()  # the newest state reaches the disk before the process exits
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3


def test_corrupt_resume_point_is_one_line_exit_2(tiny_cfg, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    cfg_path = save_config(tiny_cfg, tmp_path / "cfg.yaml")
    rc = main(["--config", str(cfg_path), "--fold", "0", "--role", "teacher", "--run-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "CheckpointError" in err[0] and "last.pt: corrupt or truncated" in err[0]
    assert (out / "last.pt").read_bytes() == b"PK\x03\x04 truncated"  # not ours to delete or replace


# ---------------------------------------------------------------------------------------------- live curves


def _curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """The scalars of a folder's TensorBoard event files, read with TensorBoard's own reader: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _assert_curves_match_jsonl(run_dir: Path) -> None:
    """Every numeric key of every metrics.jsonl record is a TensorBoard scalar with that value at step=epoch."""
    curves = _curves(run_dir)
    records = _records(run_dir / "metrics.jsonl")
    assert records
    for rec in records:
        for key, value in rec.items():
            if key == "epoch":
                continue
            assert key in curves, (key, sorted(curves))
            assert curves[key][rec["epoch"]] == pytest.approx(value, rel=1e-6, abs=1e-12, nan_ok=True), key
    assert {step for c in curves.values() for step in c} == {r["epoch"] for r in records}


def test_tensorboard_curves_hold_every_metric_of_metrics_jsonl(trained) -> None:  # noqa: ANN001
    cfg = trained[0]
    for role in ("teacher", "student"):
        _assert_curves_match_jsonl(ExperimentPaths.of(cfg).role_dir(0, role))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer thread's own raise
def test_curves_writer_never_fails_a_run(tmp_path: Path, monkeypatch, caplog) -> None:  # noqa: ANN001
    """A full disk (the writer thread's ENOSPC) and a missing tensorboard package are one warning each."""
    import errno
    import sys

    from tensorboard.summary.writer import record_writer

    from bonehpc.curves import Curves

    def full(self, data):  # noqa: ANN001, ANN202, ARG001
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(record_writer.RecordWriter, "write", full)
        curves = Curves(tmp_path / "full")
        for epoch in range(3):
            curves.scalars(epoch, {"train/loss": 1.0, "lr": 0.1})
        curves.close()
    assert not curves.enabled
    warned = [r.getMessage() for r in caplog.records if "curves" in r.getMessage()]
    assert len(warned) == 1 and "No space left on device" in warned[0], warned

    caplog.clear()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: the package is missing
    curves = Curves(tmp_path / "missing")
    curves.scalars(0, {"train/loss": 1.0})
    curves.close()
    assert not curves.enabled and not (tmp_path / "missing").exists()
    assert [r.levelname for r in caplog.records if "curves" in r.getMessage()] == ["WARNING"]


def test_final_model_keeps_its_last_epoch_unless_told_to_select(tiny_cfg, monkeypatch) -> None:  # noqa: ANN001
    """train.final_epoch=last (default): the final run's best.pt is its last epoch, whatever the slice says (a
    small slice cannot pick a bad epoch), no early stop; =best: the best epoch on the slice, as fold runs do."""
    import bonehpc.train as train_mod
    from bonehpc.config import ConfigError

    real = train_mod._validate
    scores = iter([0.9, 0.1, 0.9, 0.1])  # epoch 0 looks best on the slice

    def fake(learner, data):  # noqa: ANN001, ANN202
        val, preds = real(learner, data)
        return {**val, "val/study_auroc": next(scores)}, preds

    monkeypatch.setattr(train_mod, "_validate", fake)
    over = {"teacher.model": "hybrid_tiny", "teacher.epochs": 2, "train.max_steps_per_epoch": 1, "train.patience": 1}
    cfg = apply_overrides(tiny_cfg, {**over, "train.early_stop_metric": "val/study_auroc"})
    paths = ExperimentPaths.of(cfg)
    run(cfg, "final", "teacher")
    last = json.loads((paths.role_dir("final", "teacher") / "metrics.json").read_text())
    assert last["best_epoch"] == 1 and last["epochs_run"] == 2 and last["selection"]["epoch"].startswith("last")
    assert load_checkpoint(paths.role_dir("final", "teacher") / "best.pt")["epoch"] == 2
    run(apply_overrides(cfg, {"train.final_epoch": "best"}), "final", "teacher", paths.root / "sel")
    sel = json.loads((paths.root / "sel" / "metrics.json").read_text())
    assert sel["best_epoch"] == 0 and sel["selection"]["epoch"].startswith("best")
    with pytest.raises(ConfigError, match="train.final_epoch"):
        apply_overrides(cfg, {"train.final_epoch": "median"})
