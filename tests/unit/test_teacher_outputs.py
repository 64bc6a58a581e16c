"""Teacher outputs: cached logits equal the online teacher's, cached and online students agree, resume is exact."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from tinyexp import tiny_overrides

from bonehpc.cli.train import main as train_main
from bonehpc.config import apply_overrides, load_config, save_config
from bonehpc.constants import PREEMPTED_EXIT_CODE
from bonehpc.outputs_job import compute
from bonehpc.paths import OUTPUTS_FILE, ExperimentPaths
from bonehpc.teacher_outputs import (
    TeacherOutputsError,
    check_tune_space,
    open_for_run,
    outputs_current,
    read_header,
)
from bonehpc.train import run

CPU = torch.device("cpu")
TIMING_KEYS = {"time_s", "train/img_per_s"}


@pytest.fixture(scope="module")
def exp(tmp_path_factory: pytest.TempPathFactory, synth_root: Path, shards_dir: Path):  # noqa: ANN201
    """Fold 0's teacher (1 epoch) and its teacher outputs for a 2-epoch student, made once for this module."""
    tmp = tmp_path_factory.mktemp("outputs")
    cfg = load_config(
        None, tiny_overrides(tmp / "runs", synth_root, shards_dir, "student.epochs=2", "train.num_threads=2")
    )
    run(cfg, 0, "teacher")
    summary = compute(cfg, 0)
    return cfg, summary


def _records(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_outputs_file_holds_every_view_with_its_key(exp) -> None:  # noqa: ANN001
    cfg, summary = exp
    path = ExperimentPaths.of(cfg).outputs_dir(0) / OUTPUTS_FILE
    key, epochs = read_header(path)
    assert epochs == 2 == summary["epochs"] and summary["status"] == "completed"
    assert key["seed"] == cfg.train.seed and key["image_size"] == 64 and key["backend"] == "torch"
    with h5py.File(path) as f:
        ids, logits = f["ids"][...], f["logits"][...]
    assert logits.shape == (2, len(ids), 2) and key["train_images"] == len(ids)
    assert np.all(np.diff(ids) > 0) and np.isfinite(logits).all()
    assert not np.allclose(logits[0], logits[1])  # another epoch, other views
    assert outputs_current(cfg, 0)
    assert not outputs_current(apply_overrides(cfg, {"train.seed": 1}), 0)


@pytest.mark.parametrize("world_size", [1, 2])
def test_cached_logits_equal_the_online_teacher_on_every_step(exp, world_size: int) -> None:  # noqa: ANN001
    """fp32 CPU: the cache gives the online teacher's logits on each student batch (max abs diff <= 1e-4),
    for every rank of a 1- or 2-process plan."""
    from bonehpc.data.loaders import build_loader
    from bonehpc.data.shards import ShardReader
    from bonehpc.distill import DistillationLoss, build_task_loss, teacher_and_input
    from bonehpc.teacher_outputs import fold_train_ids

    cfg, _ = exp
    ids = fold_train_ids(cfg, 0)
    teacher, renorm = teacher_and_input(
        ExperimentPaths.of(cfg).role_dir(0, "teacher") / "best.pt", CPU, False, cfg.augment.mean, cfg.augment.std
    )
    online = DistillationLoss(build_task_loss(), teacher, "soft", teacher_input=renorm)
    cached = open_for_run(cfg, 0, ids, CPU)
    assert cached is not None
    reader = ShardReader(cfg.data.shards)
    worst, steps = 0.0, 0
    for rank in range(world_size):
        loader = build_loader(
            cfg, reader, ids, train=True, rank=rank, world_size=world_size, device=CPU, seed=cfg.train.seed
        )
        for epoch in (1, 0):
            loader.set_epoch(epoch)
            cached.set_epoch(epoch, loader.plan.rank_ids(epoch))  # this rank's rows only
            assert len(cached.table) == len(loader.plan.rank_ids(epoch))
            for images, _, batch_ids in loader:
                worst = max(worst, float((online.teacher_logits(images) - cached.lookup(batch_ids)).abs().max()))
                steps += 1
        loader.close()
    assert steps >= 4 and worst <= 1e-4
    with pytest.raises(TeacherOutputsError, match="not cached"):  # never a wrong row for an unknown id
        cached.set_epoch(0, np.array([ids.max() + 1000]))


def test_cached_student_matches_online_and_resumes_exactly(exp, tmp_path: Path) -> None:  # noqa: ANN001
    """Same seed: the cached student's metrics.jsonl equals the online one's within what a re-run of the online
    student shows (plus float noise); SIGUSR2 in epoch 1 of a cached run, then a resume, equals a straight run."""
    cfg, _ = exp
    online_cfg = apply_overrides(cfg, {"distill.teacher_outputs": "online"})
    cached_cfg = apply_overrides(cfg, {"distill.teacher_outputs": "cached"})
    run(online_cfg, 0, "student", tmp_path / "online")
    run(online_cfg, 0, "student", tmp_path / "online2")
    run(cached_cfg, 0, "student", tmp_path / "cached")
    on, on2, ca = (_records(tmp_path / d / "metrics.jsonl") for d in ("online", "online2", "cached"))
    assert json.loads((tmp_path / "cached" / "metrics.json").read_text())["teacher_outputs"] == "cached"
    assert json.loads((tmp_path / "online" / "metrics.json").read_text())["teacher_outputs"] == "online"
    assert len(on) == len(ca) == 2
    for r_on, r_on2, r_ca in zip(on, on2, ca, strict=True):
        for k, v in r_on.items():
            if isinstance(v, float) and np.isfinite(v):
                rerun = abs(v - r_on2[k])
                assert abs(v - r_ca[k]) <= rerun + 1e-4 * max(1.0, abs(v)), (k, v, r_ca[k], rerun)

    cfg_path = save_config(cached_cfg, tmp_path / "cfg.yaml")
    interrupted = tmp_path / "interrupted"

    def send_when_epoch_zero_is_logged() -> None:
        jsonl = interrupted / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if jsonl.is_file() and jsonl.read_text().count("\n") >= 1:
                os.kill(os.getpid(), signal.SIGUSR2)
                return
            time.sleep(0.005)

    sender = threading.Thread(target=send_when_epoch_zero_is_logged, daemon=True)
    sender.start()
    rc = train_main(["--config", str(cfg_path), "--fold", "0", "--role", "student", "--run-dir", str(interrupted)])
    sender.join(timeout=5)
    assert rc == PREEMPTED_EXIT_CODE and not (interrupted / "metrics.json").exists()
    run(cached_cfg, 0, "student", interrupted)
    assert _records(interrupted / "metrics.jsonl") == ca


def test_a_mismatch_is_never_used(exp, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    """cached refuses a cache of other views (the field named); auto runs the teacher online and says why."""
    from bonehpc.teacher_outputs import fold_train_ids

    cfg, _ = exp
    ids = fold_train_ids(cfg, 0)
    for change, field in (({"train.seed": 7}, "seed"), ({"data.image_size": 48}, "image_size")):
        with pytest.raises(TeacherOutputsError, match=field):
            open_for_run(apply_overrides(cfg, {**change, "distill.teacher_outputs": "cached"}), 0, ids, CPU)
        with caplog.at_level(logging.WARNING, logger="bonehpc.teacher_outputs"):
            assert open_for_run(apply_overrides(cfg, change), 0, ids, CPU) is None
        assert "teacher outputs: online" in caplog.text and field in caplog.text
        caplog.clear()
    longer = apply_overrides(cfg, {"student.epochs": 3, "distill.teacher_outputs": "cached"})
    with pytest.raises(TeacherOutputsError, match="covers 2 epochs, the run has 3"):
        open_for_run(longer, 0, ids, CPU)
    with caplog.at_level(logging.INFO, logger="bonehpc.teacher_outputs"):
        assert open_for_run(apply_overrides(cfg, {"student.epochs": 1}), 0, ids, CPU) is not None  # a prefix
    assert "teacher outputs: cached" in caplog.text


def test_outputs_job_resumes_after_a_stop_and_extends(exp, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """SIGUSR2 after epoch 0 of the outputs job: exit as preempted with epoch 0 kept in the partial file; the
    rerun continues and gives the straight run's logits; more epochs later extend the same file."""
    import bonehpc.outputs_job as to
    from bonehpc.train import Preempted

    cfg, _ = exp
    paths = ExperimentPaths.of(cfg)
    path = paths.outputs_dir(0) / OUTPUTS_FILE
    with h5py.File(path) as f:
        straight = f["logits"][...]
    moved = tmp_path / "straight.h5"
    os.replace(path, moved)
    try:
        real_append = to._Writer.append

        def append_then_stop(self, logits) -> None:  # noqa: ANN001
            real_append(self, logits)
            os.kill(os.getpid(), signal.SIGUSR2)

        monkeypatch.setattr(to._Writer, "append", append_then_stop)
        with pytest.raises(Preempted):
            compute(cfg, 0)
        monkeypatch.setattr(to._Writer, "append", real_append)
        assert not path.exists() and read_header(path.with_name(OUTPUTS_FILE + ".partial"))[1] == 1
        summary = compute(cfg, 0)
        assert summary["epochs_computed"] == 1
        with h5py.File(path) as f:
            assert np.array_equal(f["logits"][...], straight)
        longer = apply_overrides(cfg, {"student.epochs": 3})
        assert compute(longer, 0)["epochs_computed"] == 1 and read_header(path)[1] == 3
        with h5py.File(path) as f:
            assert np.array_equal(f["logits"][:2], straight)
    finally:
        os.replace(moved, path)


def test_tune_space_over_the_views_is_refused_with_cached(exp) -> None:  # noqa: ANN001
    cfg, _ = exp
    space = {"augment.rotate_deg": {"type": "float", "low": 0.0, "high": 20.0}}
    with pytest.raises(TeacherOutputsError, match="augment.rotate_deg"):
        check_tune_space(apply_overrides(cfg, {"tune.space": space, "distill.teacher_outputs": "cached"}))
    assert check_tune_space(apply_overrides(cfg, {"tune.space": space})) == ["augment.rotate_deg"]
    assert check_tune_space(cfg) == []


def test_report_cost_table_puts_outputs_beside_students(exp, tmp_path: Path) -> None:  # noqa: ANN001
    """The report's distillation-cost section: the outputs job's time, views and img/s per fold, beside the
    student (here fold 0 only, trained in the fold folder); an experiment without the stage says so."""
    from bonehpc.report.distill_cost import section_distill_cost
    from bonehpc.report.experiment import load_experiment

    cfg, _ = exp
    summary = json.loads((ExperimentPaths.of(cfg).outputs_dir(0) / "metrics.json").read_text())
    run(cfg, 0, "student")
    sec = section_distill_cost(load_experiment(ExperimentPaths.of(cfg).root))
    (table,) = [b for b in sec.blocks if hasattr(b, "df")]
    row = table.df.set_index("fold").loc["fold0"]
    assert row["outputs s"] == pytest.approx(summary["time_s"]) and row["outputs img/s"] == summary["img_per_s"]
    assert row["outputs views"] == summary["epochs"] * summary["images_per_epoch"]
    assert row["student teacher logits"] == "cached"
    assert row["student s"] > 0 and "total" in table.df["fold"].tolist()
    other = apply_overrides(cfg, {"name": "plain", "distill.teacher_outputs": "online"})
    ExperimentPaths.of(other).root.mkdir(parents=True)
    save_config(other, ExperimentPaths.of(other).config)
    sec = section_distill_cost(load_experiment(ExperimentPaths.of(other).root))
    assert not [b for b in sec.blocks if hasattr(b, "df")] and "No teacher-outputs stage" in str(sec.blocks)


def test_students_wait_for_their_own_folds_outputs_task() -> None:
    """teacher -> outputs -> student per fold: aftercorr on one outputs array with the students' folds; otherwise
    afterok on each student's own outputs task (new or still active), never on the teacher."""
    from types import SimpleNamespace

    from jobs.submit import Plan, student_groups

    ctx = SimpleNamespace(mode="slurm")
    teacher = {"job_id": "5", "tasks": [{"fold": "fold0", "task_id": "5_0"}, {"fold": "fold1", "task_id": "5_1"}]}
    one = {"job_id": "9", "tasks": [{"fold": "fold0", "task_id": "9_0"}, {"fold": "fold1", "task_id": "9_1"}]}
    plan = Plan([0, 1], [0, 1], True, {}, {}, outputs=[0, 1])
    assert student_groups(ctx, plan, teacher, one) == [([0, 1], "aftercorr:9")]
    merged = {"job_id": "", "tasks": [{"fold": "fold0", "task_id": "11_0"}]}  # several outputs jobs
    plan = Plan([], [0, 1], True, {}, {("fold1", "outputs"): "7_1"}, outputs=[0])
    assert student_groups(ctx, plan, None, merged) == [([0], "afterok:11_0"), ([1], "afterok:7_1")]
    plan = Plan([1], [1], True, {}, {}, outputs=[])  # no outputs stage (online): the teacher
    assert student_groups(ctx, plan, {"job_id": "5", "tasks": teacher["tasks"][1:]}, None) == [([1], "aftercorr:5")]
