"""Optuna tuning: search space, trial configs, journal storage under concurrent workers, dead-trial retry
from the checkpoint dir, best-params export, and a small real study with the tiny training."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from bonehpc.config import ConfigError, ExperimentConfig, load_config
from bonehpc.paths import ExperimentPaths
from bonehpc.tune import (
    LOCK_GRACE_S,
    TuneError,
    build_storage,
    check_space,
    open_study,
    owner_alive,
    prepare,
    run_task,
    space_distributions,
    study_dir,
    study_status,
    suggest_params,
    trial_config,
    trial_dir,
    trial_run_dir,
    write_best_params,
)

ROOT = Path(__file__).resolve().parents[2]
SPACE = {
    "student.lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    "distill.alpha": {"type": "float", "low": 0.1, "high": 0.9, "step": 0.2},
    "train.batch_size": {"type": "int", "low": 8, "high": 64, "log": True},
    "train.patience": {"type": "int", "low": 0, "high": 6, "step": 3},
    "distill.kind": {"type": "categorical", "choices": ["soft", "hard", "none"]},
}


def _cfg(tmp_path: Path, *extra: str) -> ExperimentConfig:
    """A config whose study lives under tmp_path (no data needed: the objective in these tests is cheap)."""
    return load_config(
        None,
        [
            "name=tunetest",
            f"run_root={tmp_path / 'runs'}",
            "tune.trials=4",
            "tune.epochs=3",
            "tune.folds=[0, 1]",
            "tune.metric=val/study_auroc",
            *extra,
        ],
    )


def cheap_fold(cfg: ExperimentConfig, fold: int, run_dir: Path, on_epoch_end: Any) -> dict[str, float]:
    """A cheap, real objective with train.run's contract: per-epoch reports, resume marker in run_dir.

    The value peaks at lr = 1e-3 and alpha = 0.5, so TPE and the pruner have something to find.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    quality = 1.0 - 0.1 * (math.log10(cfg.student.lr) + 3) ** 2 - (cfg.distill.alpha - 0.5) ** 2
    value = 0.0
    for epoch in range(cfg.student.epochs):
        value = quality * (epoch + 1) / cfg.student.epochs
        with open(run_dir / "epochs.txt", "a") as f:
            f.write(f"{epoch}\n")
        on_epoch_end(epoch, {"val/study_auroc": value, "epoch": epoch})
    (run_dir / "metrics.json").write_text(json.dumps({"status": "completed", "metrics": {"val/study_auroc": value}}))
    return {"val/study_auroc": value}


# ----------------------------------------------------------------------------------------------
# Search space and trial configs


def test_space_sampling_types_ranges_log_and_steps() -> None:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    samples = []
    for _ in range(60):
        trial = study.ask()
        samples.append(suggest_params(trial, SPACE))
        study.tell(trial, 0.0)
    lrs = [s["student.lr"] for s in samples]
    assert all(isinstance(v, float) and 1e-5 <= v <= 1e-1 for v in lrs)
    # log scale: about half of the draws fall below the geometric mean 1e-3 (uniform would give ~1 %)
    assert 15 <= sum(v < 1e-3 for v in lrs) <= 45
    alphas = {round(s["distill.alpha"], 6) for s in samples}
    assert alphas <= {0.1, 0.3, 0.5, 0.7, 0.9} and len(alphas) >= 3
    assert all(type(s["train.batch_size"]) is int and 8 <= s["train.batch_size"] <= 64 for s in samples)
    assert {s["train.patience"] for s in samples} <= {0, 3, 6}
    assert {s["distill.kind"] for s in samples} == {"soft", "hard", "none"}
    dists = space_distributions(SPACE)
    assert dists["student.lr"].log and dists["train.batch_size"].log  # type: ignore[attr-defined]
    assert study.trials[0].distributions == dists


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "float", "low": 0.1, "high": 1.0, "lo": 3}, r"tune.space.k: unknown field\(s\) lo"),
        ({"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}, "tune.space.k"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "tune.space.k"),
        ({"type": "int", "low": 1.5, "high": 4}, "low must be an integer"),
        ({"type": "categorical", "choices": []}, "choices"),
        ({"type": "uniform", "low": 0, "high": 1}, "type must be float, int or categorical"),
    ],
)
def test_space_errors_name_the_key(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        space_distributions({"k": spec})


def test_trial_config_applies_params_and_tune_epochs(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    out = trial_config(cfg, {"student.lr": 0.002, "distill.kind": "hard", "train.batch_size": 16})
    assert (out.student.lr, out.distill.kind, out.train.batch_size, out.student.epochs) == (0.002, "hard", 16, 3)
    assert cfg.student.lr != 0.002  # the experiment config is not modified
    assert trial_config(cfg, {"distill.kind": "none"}).distill.kind == "none"  # the no-KD student as a choice
    with pytest.raises(ConfigError, match="student.lrr"):
        trial_config(cfg, {"student.lrr": 0.1})
    bad = _cfg(tmp_path, 'tune.space={"student.nope": {"type": "float", "low": 0.1, "high": 0.2}}')
    with pytest.raises(ConfigError, match="student.nope"):
        check_space(bad)
    # the high end of the range gives an invalid config (drop_rate must be < 1): found before submitting
    edge = _cfg(tmp_path, 'tune.space={"student.drop_rate": {"type": "float", "low": 0.0, "high": 1.0}}')
    with pytest.raises(ConfigError, match="drop_rate"):
        check_space(edge)


def test_prepare_lists_missing_teachers_before_anything_is_created(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(TuneError) as err:
        prepare(cfg)
    text = str(err.value)
    assert "fold0/teacher/best.pt" in text and "fold1/teacher/best.pt" in text
    assert not ExperimentPaths.of(cfg).tune_journal.exists()
    with pytest.raises(ConfigError, match="SQLite"):
        build_storage(_cfg(tmp_path, f"tune.storage=sqlite:///{tmp_path}/x.db"))
    with pytest.raises(ConfigError, match="tune.folds"):
        prepare(_cfg(tmp_path, "tune.folds=[7]"))


def _fake_teachers(cfg: ExperimentConfig) -> None:
    from bonehpc.paths import ExperimentPaths

    for fold in cfg.tune.folds:
        d = ExperimentPaths.of(cfg).role_dir(fold, "teacher")
        d.mkdir(parents=True, exist_ok=True)
        (d / "best.pt").write_bytes(b"")  # prepare() only checks that the teacher exists and completed
        (d / "metrics.json").write_text('{"status": "completed"}')


def test_study_identity_is_kept(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _fake_teachers(cfg)
    prepare(cfg)
    prepare(cfg)  # the same search again: fine
    other = _cfg(tmp_path, "tune.metric=val/study_kappa")
    with pytest.raises(TuneError, match="different tune.metric"):
        prepare(other)
    assert prepare(_cfg(tmp_path, "tune.metric=val/study_kappa", "tune.study_name=s2")).study_name == "s2"


# ----------------------------------------------------------------------------------------------
# Storage under concurrency, retries, failures


def _worker(cfg_path: str, indexes: list[int]) -> None:
    cfg = load_config(cfg_path)
    for i in indexes:
        run_task(cfg, i, train_fold=cheap_fold)


def test_two_concurrent_workers_on_the_journal(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tune.trials=24", "tune.folds=[0]", "tune.pruner=median")
    _fake_teachers(cfg)
    prepare(cfg)
    cfg_path = str(study_dir(cfg) / "config.yaml")
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(cfg_path, list(range(w, 24, 2)))) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    wall = time.perf_counter() - t0
    study = open_study(cfg)
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(24)), numbers  # no duplicate, no lost trial number
    states = {t.state for t in study.trials}
    assert states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    workers = {t.user_attrs["task"] % 2 for t in study.trials}
    assert workers == {0, 1}
    for line in ExperimentPaths.of(cfg).tune_journal.read_text().splitlines():
        json.loads(line)
    # every trial's run dir holds exactly the epochs it reported
    for t in study.trials:
        epochs = (trial_run_dir(cfg, t.number, 0) / "epochs.txt").read_text().split()
        assert len(epochs) == len(t.intermediate_values)
    print(f"24 trials by 2 processes in {wall:.1f} s")


def test_stale_lock_file_does_not_hang(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tune.folds=[0]")
    _fake_teachers(cfg)
    prepare(cfg)
    lock = Path(str(ExperimentPaths.of(cfg).tune_journal) + ".lock")
    lock.write_text("")  # what a process killed while appending leaves behind
    t0 = time.perf_counter()
    results = run_task(cfg, 0, train_fold=cheap_fold)
    waited = time.perf_counter() - t0
    assert results[0]["state"] == "COMPLETE"
    assert waited < LOCK_GRACE_S + 10
    assert not lock.exists()


class Preemptable:
    """First call: two epochs, then train.run's Preempted (as on SIGUSR2); later calls resume after them."""

    def __call__(self, cfg: ExperimentConfig, fold: int, run_dir: Path, on_epoch_end: Any) -> dict[str, float]:
        from bonehpc.train import Preempted

        run_dir.mkdir(parents=True, exist_ok=True)
        marker = run_dir / "last.txt"
        start = int(marker.read_text()) if marker.exists() else 0
        for epoch in range(start, cfg.student.epochs):
            on_epoch_end(epoch, {"val/study_auroc": 0.5 + 0.1 * epoch})
            marker.write_text(str(epoch + 1))
            if start == 0 and epoch == 1:
                raise Preempted(run_dir, epoch + 1, signal.SIGUSR2)
        return {"val/study_auroc": 0.5 + 0.1 * (cfg.student.epochs - 1), "resumed_at": start}


def test_preempted_trial_is_retried_in_its_own_run_dir(tmp_path: Path) -> None:
    from bonehpc.train import Preempted

    cfg = _cfg(tmp_path, "tune.folds=[0]", "tune.epochs=4", "tune.pruner=none")
    _fake_teachers(cfg)
    prepare(cfg)
    with pytest.raises(Preempted):
        run_task(cfg, 0, train_fold=Preemptable())
    study = open_study(cfg)
    first, retry = study.trials
    assert first.state.name == "FAIL" and retry.state.name == "WAITING"
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == first.params
    assert retry.intermediate_values == {0: 0.5, 1: 0.6}  # inherited: the pruner keeps its history
    results = run_task(cfg, 0, train_fold=Preemptable())  # the requeued task
    assert [r["trial"] for r in results] == [1] and results[0]["state"] == "COMPLETE"
    done = open_study(cfg).trials[1]
    assert done.value == pytest.approx(0.8)
    assert sorted(done.intermediate_values) == [0, 1, 2, 3]
    assert (trial_run_dir(cfg, 0, 0) / "last.txt").read_text() == "4"  # resumed in trials/0
    assert not trial_dir(cfg, 1).exists()


def test_crashing_trial_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tune.folds=[0]")
    _fake_teachers(cfg)
    prepare(cfg)

    def crash(*_: Any) -> dict[str, float]:
        raise ValueError("loader exploded")

    assert run_task(cfg, 0, train_fold=crash)[0]["state"] == "FAIL"
    assert run_task(cfg, 1, train_fold=cheap_fold)[0]["state"] == "COMPLETE"
    status = study_status(open_study(cfg))
    assert status["states"]["FAIL"] == 1 and status["states"]["COMPLETE"] == 1
    assert status["trials"][0]["error"] == "ValueError: loader exploded"
    assert status["best"]["number"] == 1


SLEEPER = """
import sys, time
from bonehpc.config import load_config
from bonehpc.tune import run_task

def slow_fold(cfg, fold, run_dir, on_epoch_end):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "started").write_text("1")
    time.sleep(600)

run_task(load_config(sys.argv[1]), int(sys.argv[2]), train_fold=slow_fold)
"""


def _start_and_kill(cfg: ExperimentConfig, index: int, tmp_path: Path) -> None:
    """Run task `index` in a process and SIGKILL it while its trial trains (nothing can clean up)."""
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    proc = subprocess.Popen([sys.executable, str(script), str(study_dir(cfg) / "config.yaml"), str(index)], cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not list(study_dir(cfg).glob("trials/*/fold0/student/started")):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()


def test_killed_task_restarting_fails_and_resumes_its_trial(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tune.folds=[0]")
    _fake_teachers(cfg)
    prepare(cfg)
    _start_and_kill(cfg, 3, tmp_path)
    assert open_study(cfg).trials[0].state.name == "RUNNING"
    results = run_task(cfg, 3, train_fold=cheap_fold)  # Slurm requeued array task 3
    trials = open_study(cfg).trials
    assert trials[0].state.name == "FAIL"
    assert [r["trial"] for r in results] == [1] and trials[1].system_attrs["retry_history"] == [0]
    assert (trial_run_dir(cfg, 0, 0) / "metrics.json").is_file()  # trained in trial 0's dir


def test_dead_worker_of_another_task_is_found_and_its_trial_retried(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tune.folds=[0]")
    _fake_teachers(cfg)
    prepare(cfg)
    _start_and_kill(cfg, 0, tmp_path)
    attrs = open_study(cfg).trials[0].user_attrs
    assert attrs["pid"] and attrs["pid_start"] and owner_alive(attrs, {}) is False
    results = run_task(cfg, 1, train_fold=cheap_fold)
    # task 1 found trial 0's process gone before asking, so the retry of trial 0 was its trial, in trials/0
    trials = open_study(cfg).trials
    assert trials[0].state.name == "FAIL"
    assert results == [{"task": 1, "trial": 1, "state": "COMPLETE", "value": trials[1].value}]
    assert trials[1].system_attrs["failed_trial"] == 0
    assert (trial_run_dir(cfg, 0, 0) / "metrics.json").is_file()
    assert not trial_dir(cfg, 1).exists()


def test_owner_of_a_slurm_trial_is_asked_of_the_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    from bonehpc.tune import owner_attrs

    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    other = {"slurm_job": "77_3", "host": "gpu12", "pid": 4242, "pid_start": "99"}
    assert owner_alive(other, {"77_3": "RUNNING"}) is True
    assert owner_alive(other, {"77_3": "REQUEUED"}) is True  # it may still run
    assert owner_alive(other, {"77_3": "NODE_FAIL"}) is False
    assert owner_alive(other, {"77_3": "CANCELLED"}) is False
    assert owner_alive(other, {}) is None  # neither sacct nor squeue knows it: never taken from a live worker
    assert owner_alive({"slurm_job": "77_3"}, {"77_3": "FAILED"}) is None  # attributes not all written yet
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    earlier_run = {**owner_attrs(), "pid": 1}  # this requeued task's previous process
    assert owner_alive(earlier_run, {"77_3": "RUNNING"}) is False
    assert owner_alive(owner_attrs(), {"77_3": "RUNNING"}) is True
    assert owner_alive({"slurm_job": "", "host": "elsewhere", "pid": 1, "pid_start": "1"}, {}) is None


def test_dead_slurm_owner_found_through_accounting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bonehpc.accounting as accounting
    from bonehpc.tune import fail_dead_trials

    cfg = _cfg(tmp_path, "tune.folds=[0]")
    _fake_teachers(cfg)
    prepare(cfg)
    study = open_study(cfg)
    for job in ("10_0", "10_1"):
        trial = study.ask()
        for key, value in {"slurm_job": job, "host": "n1", "pid": 7, "pid_start": "5"}.items():
            trial.set_user_attr(key, value)
    asked: list[set[str]] = []

    def states(ids: Any) -> dict[str, str]:
        asked.append(set(ids))
        return {"10_0": "TIMEOUT", "10_1": "RUNNING"}

    monkeypatch.setattr(accounting, "job_states", states)
    assert fail_dead_trials(cfg, study) == [0]
    assert asked == [{"10_0", "10_1"}]  # one query for every running trial
    trials = open_study(cfg).trials
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "WAITING"]
    assert trials[2].system_attrs["failed_trial"] == 0


def test_task_runs_retries_enqueued_after_its_own_trial(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tune.folds=[0]", "tune.pruner=none")
    _fake_teachers(cfg)
    prepare(cfg)
    study = open_study(cfg)
    seen: list[int] = []

    def fold_that_sees_a_death(cfg_: ExperimentConfig, fold: int, run_dir: Path, hook: Any) -> dict[str, float]:
        seen.append(int(run_dir.parent.parent.name))
        if len(seen) == 1:  # while this trial trains, another task's trial dies and is retried
            dead = study.ask()
            study.tell(dead, state=optuna.trial.TrialState.FAIL)
            from bonehpc.tune import retry_callback

            retry_callback(cfg)(study, study.trials[dead.number])
        return cheap_fold(cfg_, fold, run_dir, hook)

    results = run_task(cfg, 0, train_fold=fold_that_sees_a_death)
    assert [r["state"] for r in results] == ["COMPLETE", "COMPLETE"]
    assert seen == [0, 1]  # trial 2 retried trial 1 in trial 1's run dir
    assert open_study(cfg).trials[2].system_attrs["retry_history"] == [1]


# ----------------------------------------------------------------------------------------------
# Best params -> submit-folds config


def test_best_params_yaml_round_trips_into_load_config(tmp_path: Path) -> None:
    from bonehpc.config import apply_overrides

    cfg = apply_overrides(_cfg(tmp_path, "tune.folds=[0]"), {"tune.space": SPACE})
    _fake_teachers(cfg)
    prepare(cfg)
    for i in range(3):
        run_task(cfg, i, train_fold=cheap_fold)
    study = open_study(cfg)
    auto = study_dir(cfg) / "best_params.yaml"
    assert auto.is_file()  # written by the tasks
    out = write_best_params(study, tmp_path / "best.yaml")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("name: final\nstudent:\n  lr: 0.5\ndistill:\n  kind: soft\n")
    loaded = load_config(experiment, params=out)
    best = study.best_params
    assert loaded.student.lr == pytest.approx(best["student.lr"])
    assert loaded.distill.alpha == pytest.approx(best["distill.alpha"])
    assert loaded.train.batch_size == best["train.batch_size"]
    assert loaded.distill.kind == best["distill.kind"]
    assert loaded.name == "final"
    # CLI: status table and export
    from bonehpc.cli import main

    exported = tmp_path / "exported.yaml"
    rc = main(["tune", "status", "--exp", cfg.name, "--run-root", cfg.run_root, "--export", str(exported)])
    assert rc == 0 and exported.read_text() == out.read_text()


# ----------------------------------------------------------------------------------------------
# The real thing: tiny KD training on the synthetic set, local executor


@pytest.mark.slow
def test_local_study_with_real_training_prunes(tiny_cfg: ExperimentConfig, tmp_path: Path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bonehpc import train
    from bonehpc.config import apply_overrides
    from jobs.submit import submit_tune

    cfg = apply_overrides(
        tiny_cfg,
        {
            "cluster.mode": "local",
            "cluster.profile": "local",
            "tune.trials": 3,
            "tune.parallel": 1,
            "tune.epochs": 2,
            "tune.folds": [0],
            "tune.metric": "val/image_auroc",
            "tune.sampler_seed": 3,
            "tune.space": {
                "student.lr": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True},
                "distill.alpha": {"type": "float", "low": 0.1, "high": 0.9},
            },
        },
    )
    with pytest.raises(TuneError, match="fold0/teacher/best.pt"):
        submit_tune(cfg, workdir=ROOT)
    t0 = time.perf_counter()
    train.run(cfg, 0, "teacher")
    t_teacher = time.perf_counter() - t0
    entry = submit_tune(cfg, workdir=ROOT)
    t_study = time.perf_counter() - t0 - t_teacher
    # the teacher outputs of fold 0 first (one task), then the trials, which all read them
    assert [(j["role"], [t["state"] for t in j["tasks"]]) for j in entry["jobs"]] == [
        ("outputs", ["COMPLETED"]),
        ("tune", ["COMPLETED"] * 3),
    ]
    study = open_study(cfg)
    assert sorted(t.number for t in study.trials) == list(range(3))
    names = [t.state.name for t in study.trials]
    assert set(names) <= {"COMPLETE", "PRUNED"} and "PRUNED" in names and "COMPLETE" in names
    for t in study.trials:
        assert sorted(t.intermediate_values) == ([0] if t.state.name == "PRUNED" else [0, 1])
        # the pruner's values as live curves of the trial (TensorBoard's own reader)
        acc = EventAccumulator(str(trial_dir(cfg, t.number)))
        acc.Reload()
        curve = {e.step: e.value for e in acc.Scalars("tune/val/image_auroc")}
        assert curve == pytest.approx(t.intermediate_values, rel=1e-6)
        saved = load_config(trial_dir(cfg, t.number) / "config.yaml")
        assert saved.student.lr == pytest.approx(t.params["student.lr"]) and saved.student.epochs == 2
        log = (trial_run_dir(cfg, t.number, 0) / "train.log").read_text()
        assert "teacher outputs: cached" in log and "teacher resnet18 loaded" not in log  # no teacher forward
    assert (study_dir(cfg) / "best_params.yaml").is_file()
    with capsys.disabled():
        print(f"\nteacher {t_teacher:.1f} s, 3-trial local study {t_study:.1f} s: {names}")
    # a trial pruned at its first epoch never trained the second one
    for t in study.trials:
        lines = (trial_run_dir(cfg, t.number, 0) / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == (1 if t.state.name == "PRUNED" else 2)


def test_named_studies_keep_their_trials_apart(tmp_path: Path) -> None:
    from bonehpc.cli import main
    from bonehpc.tune import load_tune_config

    main_cfg = _cfg(tmp_path, "tune.folds=[0]")
    other = _cfg(tmp_path, "tune.folds=[0]", "tune.study_name=wide")
    _fake_teachers(main_cfg)
    for cfg in (main_cfg, other):
        prepare(cfg)
        run_task(cfg, 0, train_fold=cheap_fold)
    assert ExperimentPaths.of(main_cfg).tune_journal == ExperimentPaths.of(other).tune_journal
    assert trial_run_dir(other, 0, 0) == study_dir(main_cfg) / "studies/wide/trials/0/fold0/student"
    assert (trial_run_dir(main_cfg, 0, 0) / "metrics.json").is_file()
    assert (trial_run_dir(other, 0, 0) / "metrics.json").is_file()
    exp = Path(main_cfg.run_root) / main_cfg.name
    assert load_tune_config(exp).tune.study_name == ""
    assert load_tune_config(exp, "wide").tune.study_name == "wide"
    with pytest.raises(TuneError, match="studies here: wide"):
        load_tune_config(exp, "nope")
    assert main(["tune", "status", "--exp", str(exp), "--study", "wide", "--json"]) == 0


def test_submit_all_dry_run_shows_the_whole_chain(tmp_path: Path, synth_root: Path, shards_dir: Path) -> None:
    """folds, then the trials waiting for the teacher of tune.folds, then the tuned folds after the study."""
    from tinyexp import tiny_overrides

    from bonehpc import slurm
    from jobs.submit import submit_all, submit_tune

    over = tiny_overrides(tmp_path / "runs", synth_root, shards_dir, "cluster.mode=slurm", "cluster.profile=dev")
    cfg = load_config(None, [*over, "tune.trials=3", "tune.folds=[1]"])
    with slurm.dry_run(), pytest.raises(TuneError, match="neither trained nor queued"):
        submit_tune(cfg)  # alone: the teacher of fold 1 is neither trained nor queued
    with slurm.dry_run() as scripts:
        entry = submit_all(cfg)
    assert [s.splitlines()[0] for s in scripts] == [
        "##### train teacher job DRY1: array of 3 (fold0, fold1, final)",
        "##### train outputs job DRY2: array of 3 (fold0, fold1, final)",
        "##### train student job DRY3: array of 3 (fold0, fold1, final)",
        "##### evaluate job DRY4",
        "##### tune tune job DRY5: array of 3 (0, 1, 2)",  # no second outputs task for fold 1: it waits for DRY2_1
        "##### submit tuned job DRY6",
    ]
    assert "#SBATCH --dependency=afterok:DRY2_1" in scripts[4] and "#SBATCH --kill-on-invalid-dep=yes" in scripts[4]
    assert "#SBATCH --dependency=afterany:DRY5" in scripts[5] and "--gpus" not in scripts[5]
    assert [j["dependency"] for j in entry["jobs"]][4:] == ["afterok:DRY2_1", "afterany:DRY5"]
    assert not ExperimentPaths.of(cfg).root.exists()  # a dry run writes nothing
