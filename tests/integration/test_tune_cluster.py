"""Optuna tuning on the real dev Slurm cluster: a study as one array job, a trial killed by USR2 and
resumed, and the study storage in the cluster's MariaDB.

Real tiny training (64 px, resnet18 teacher / hybrid_tiny student) through submitit and sacct.
Run through slurm/dev/with-cluster.sh; skipped without a cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from bonehpc.accounting import query
from bonehpc.config import ExperimentConfig, apply_overrides, load_config
from bonehpc.tune import build_storage, open_study, prepare, run_task, study_dir, trial_dir, trial_run_dir
from jobs.submit import submit_tune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_tune import _start_and_kill, _worker, cheap_fold  # noqa: E402
from tinyexp import tiny_overrides  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
FINISHED = {"COMPLETE", "PRUNED", "FAIL"}


@pytest.fixture(scope="module")
def exp_cfg(tmp_path_factory: pytest.TempPathFactory, synth_root: Path, shards_dir: Path) -> ExperimentConfig:
    """A tiny experiment whose fold-0 teacher is trained (once, here) for the studies to reuse."""
    from bonehpc import train
    from bonehpc.outputs_job import compute

    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path_factory.mktemp("tune") / "runs",
            synth_root,
            shards_dir,
            "name=tunec",
            "student.epochs=15",
            "cluster.mode=slurm",
            "cluster.profile=dev",
            "tune.folds=[0]",
            "tune.metric=val/image_auroc",
            "tune.sampler_seed=3",
        ),
    )
    cfg = apply_overrides(
        cfg,
        {
            "tune.space": {
                "student.lr": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True},
                "distill.alpha": {"type": "float", "low": 0.1, "high": 0.9},
            }
        },
    )
    train.run(cfg, 0, "teacher")
    compute(cfg, 0)  # its teacher outputs (the fold graph's outputs stage): the studies submit no outputs job
    return cfg


def _wait_study(cfg: ExperimentConfig, n_finished: int, timeout_s: float) -> list[optuna.trial.FrozenTrial]:
    t0 = time.monotonic()
    while True:
        trials = open_study(cfg).trials
        done = [t for t in trials if t.state.name in FINISHED]
        if len(done) >= n_finished and not any(t.state.name in ("RUNNING", "WAITING") for t in trials):
            return trials
        if time.monotonic() - t0 > timeout_s:
            states = [(t.number, t.state.name) for t in trials]
            raise AssertionError(f"study not finished after {timeout_s:.0f} s: {states}")
        time.sleep(3)


def _wait_tasks(job_id: str, n: int, timeout_s: float = 60.0) -> dict:
    """sacct records of the array's tasks once all n are COMPLETED (accounting lags the controller)."""
    t0 = time.monotonic()
    while True:
        records = query([job_id])
        if len(records) == n and all(r.state == "COMPLETED" for r in records.values()):
            return records
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"array {job_id}: {[(k, r.state) for k, r in records.items()]}")
        time.sleep(2)


def test_study_as_one_array_job(slurm_cluster: str, exp_cfg: ExperimentConfig, capsys) -> None:
    cfg = apply_overrides(exp_cfg, {"tune.trials": 6, "tune.parallel": 2, "tune.epochs": 2, "tune.study_name": "array"})
    t0 = time.monotonic()
    entry = submit_tune(cfg, workdir=ROOT)
    job = entry["jobs"][0]
    assert entry["mode"] == "slurm" and len(job["tasks"]) == 6
    assert [t["task_id"] for t in job["tasks"]] == [f"{job['job_id']}_{i}" for i in range(6)]
    trials = _wait_study(cfg, 6, timeout_s=600)
    wall = time.monotonic() - t0
    assert sorted(t.number for t in trials) == list(range(6))  # no duplicate, no lost trial number
    states = [t.state.name for t in trials]
    assert set(states) <= {"COMPLETE", "PRUNED"} and "PRUNED" in states, states
    assert {t.user_attrs["task"] for t in trials} == set(range(6))  # one trial per array task
    assert all(t.user_attrs["slurm_job"].startswith(f"{job['job_id']}_") for t in trials)
    records = _wait_tasks(job["job_id"], 6)
    assert set(records) == {f"{job['job_id']}_{i}" for i in range(6)}
    assert (study_dir(cfg) / "best_params.yaml").is_file()
    assert (study_dir(cfg) / "jobs.json").is_file()
    with capsys.disabled():
        print(f"\n6-trial study, parallelism 2, on the dev cluster: {wall:.0f} s; states {states}")


# Enough epochs that the signal, sent right after the first one, lands mid-run even on an idle machine
# (one epoch of the tiny student takes ~0.25 s there).
EPOCHS = 30


def test_trial_killed_by_usr2_is_retried_from_its_checkpoint(
    slurm_cluster: str, exp_cfg: ExperimentConfig, capsys
) -> None:
    cfg = apply_overrides(
        exp_cfg,
        {
            "tune.trials": 1,
            "tune.parallel": 1,
            "tune.epochs": EPOCHS,
            "tune.pruner": "none",
            "tune.study_name": "kill",
            "train.patience": 0,  # every epoch runs: the count below checks that none is redone or lost
        },
    )
    t0 = time.monotonic()
    entry = submit_tune(cfg, workdir=ROOT)
    # 30 epochs: more than fold 0's cache covers, so an outputs task extends it first and the trial waits for it
    outputs, tune_job = entry["jobs"]
    assert outputs["role"] == "outputs" and tune_job["dependency"] == f"afterok:{outputs['job_id']}"
    task_id = tune_job["tasks"][0]["task_id"]
    jsonl = trial_run_dir(cfg, 0, 0) / "metrics.jsonl"
    while not (jsonl.is_file() and jsonl.read_text().strip()):  # one epoch done: last.pt exists
        assert time.monotonic() - t0 < 300, "trial 0 did not finish an epoch"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", task_id], check=True, timeout=30)
    t_kill = time.monotonic() - t0
    trials = _wait_study(cfg, 2, timeout_s=420)
    wall = time.monotonic() - t0
    first, retry = trials
    assert first.state.name == "FAIL" and retry.state.name == "COMPLETE"
    assert retry.system_attrs["retry_history"] == [0] and retry.params == first.params
    run_dir = trial_run_dir(cfg, 0, 0)
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and "teacher outputs: cached" in log
    assert len(jsonl.read_text().splitlines()) == EPOCHS  # every epoch once: nothing redone, nothing lost
    assert not trial_dir(cfg, 1).exists()
    records = query([task_id.split("_")[0]])
    assert records[task_id].requeues >= 1
    with capsys.disabled():
        print(f"\nUSR2 at {t_kill:.0f} s; retried trial complete at {wall:.0f} s; requeues {records[task_id].requeues}")


def _mariadb(sql: str) -> None:
    sock = Path(os.environ.get("SLURM_CI_ROOT", "/tmp/bonehpc-slurm")) / "mysql-run" / "mysqld.sock"
    if not sock.exists():
        pytest.skip(f"no MariaDB socket at {sock} (the dev cluster's database)")
    subprocess.run(["mariadb", f"--socket={sock}", "-u", "root", "-e", sql], check=True, timeout=30)


def test_study_in_mariadb(slurm_cluster: str, exp_cfg: ExperimentConfig, tmp_path: Path) -> None:
    import multiprocessing as mp

    _mariadb(
        "DROP DATABASE IF EXISTS optuna; CREATE DATABASE optuna; "
        "CREATE USER IF NOT EXISTS 'optuna'@'127.0.0.1' IDENTIFIED BY 'optunapw'; "
        "GRANT ALL ON optuna.* TO 'optuna'@'127.0.0.1'; FLUSH PRIVILEGES;"
    )
    url = "mysql+pymysql://optuna:optunapw@127.0.0.1:3306/optuna"
    cfg = apply_overrides(
        exp_cfg,
        {
            "tune.storage": url,
            "tune.trials": 12,
            "tune.study_name": "rdb",
            "tune.metric": "val/study_auroc",
            "run_root": str(tmp_path / "runs"),
        },
    )
    from bonehpc.paths import ExperimentPaths

    teacher = ExperimentPaths.of(cfg).role_dir(0, "teacher")
    teacher.mkdir(parents=True)
    (teacher / "best.pt").write_bytes(b"")  # the cheap objective below does not read it
    (teacher / "metrics.json").write_text('{"status": "completed"}')  # prepare() reuses completed teachers only
    prepare(cfg)
    assert not ExperimentPaths.of(cfg).tune_journal.exists()  # the RDB holds the study
    # two concurrent worker processes (cheap objective), as in the journal unit test
    ctx = mp.get_context("spawn")
    cfg_file = str(study_dir(cfg) / "config.yaml")
    procs = [ctx.Process(target=_worker, args=(cfg_file, list(range(w, 12, 2)))) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    trials = open_study(cfg).trials
    assert sorted(t.number for t in trials) == list(range(12))
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    # a task killed mid-trial (its process is gone) is failed by the next task and retried
    _start_and_kill(cfg, 12, tmp_path)
    storage = build_storage(cfg)
    assert isinstance(storage, optuna.storages.RDBStorage)
    results = run_task(cfg, 13, train_fold=cheap_fold, storage=storage)
    trials = open_study(cfg).trials
    assert trials[12].state.name == "FAIL"
    assert results[0]["trial"] == 13 and trials[13].system_attrs["failed_trial"] == 12
    assert results[0]["state"] in ("COMPLETE", "PRUNED")
