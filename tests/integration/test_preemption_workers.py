"""Preemption with loader workers on the real dev Slurm cluster (issue 15 item 4).

Slurm signals every process of a step, loader workers included. These runs train with
``data.num_workers=1`` on both real backends (DALI in its CPU-only mode, torch DataLoader): the fold
requeue (USR2 -> last.pt -> requeue -> resume -> same metrics as an uninterrupted run), the preemption
by the urgent partition, and a tune trial stopped by USR2 and retried. The cluster-side helpers come
from test_submit_folds / test_tune_cluster.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from test_submit_folds import _cfg, _row, _wait, node_cpus
from test_tune_cluster import _wait_study, exp_cfg  # noqa: F401 (exp_cfg is a fixture used below)

from bonehpc.config import apply_overrides
from bonehpc.paths import ExperimentPaths
from bonehpc.tune import trial_run_dir
from jobs.submit import submit_folds, submit_tune

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("dali", "torch")
# Enough epochs that a signal sent after the first one lands mid-run on an idle machine.
EPOCHS = 5
# What a worker killed by the signal looks like in the trainer's log (torch / DALI).
WORKER_DEATH = ("exited unexpectedly", "Worker data receiving interrupted")


def _workers(backend: str) -> tuple[str, ...]:
    return (f"data.backend={backend}", "data.num_workers=1")


def _after_first_epoch(history: Path, signal_it: list[str], timeout_s: float = 300.0) -> None:
    """Run `signal_it` once the first epoch is recorded in `history` (metrics.jsonl): mid-run."""
    deadline = time.monotonic() + timeout_s
    while not (history.is_file() and history.read_text().strip()):
        assert time.monotonic() < deadline, "the training never finished its first epoch"
        time.sleep(0.1)
    subprocess.run(signal_it, check=True, timeout=60)


def _check_loader_log(log: str, backend: str, runs: int) -> None:
    """Workers were used, none died, and each run built one DALI pipeline per loader (train, eval)."""
    assert not [w for w in WORKER_DEATH if w in log], log[-3000:]
    if backend == "torch":
        assert "torch loader (train): starting 1 workers" in log
    else:
        builds = [line for line in log.splitlines() if "DALI pipeline" in line and "built" in line]
        assert any("1 Python workers" in line for line in builds), builds
        # train + eval at construction in every run, not one per epoch; a resumed run rebuilds its train
        # pipeline once (the jump to the resumed epoch)
        assert len(builds) == 2 + 3 * (runs - 1), builds


@pytest.mark.parametrize("backend", BACKENDS)
def test_requeue_with_workers_resumes_with_same_metrics(
    slurm_cluster, synth_root, shards_dir, tmp_path, backend: str
) -> None:
    extra = (f"teacher.epochs={EPOCHS}", *_workers(backend))
    ref_cfg = _cfg(tmp_path / "runs", synth_root, shards_dir, f"ref{backend}", *extra)
    rq_cfg = _cfg(tmp_path / "runs", synth_root, shards_dir, f"rq{backend}", *extra)
    only = {("fold0", "teacher")}
    t0 = time.monotonic()
    submit_folds(ref_cfg, only=only, evaluate=False)
    rq = submit_folds(rq_cfg, only=only, evaluate=False)
    task_id = rq["jobs"][0]["tasks"][0]["task_id"]
    rq_dir = ExperimentPaths.of(rq_cfg).role_dir(0, "teacher")
    _after_first_epoch(rq_dir / "metrics.jsonl", ["scancel", "--signal=USR2", task_id])

    df = _wait(ExperimentPaths.of(rq_cfg).root)
    ref_df = _wait(ExperimentPaths.of(ref_cfg).root)
    print(f"\n[timing] requeue with {backend} workers {time.monotonic() - t0:.0f} s")
    row = _row(df, "fold0", "teacher")
    assert row["state"] == "COMPLETED" and row["requeues"] >= 1, df.to_string()
    log = (rq_dir / "train.log").read_text()
    assert "resumed from" in log
    _check_loader_log(log, backend, runs=2)
    ref_dir = ExperimentPaths.of(ref_cfg).role_dir(0, "teacher")
    _check_loader_log((ref_dir / "train.log").read_text(), backend, runs=1)
    assert _row(ref_df, "fold0", "teacher")["requeues"] == 0
    got = json.loads((rq_dir / "metrics.json").read_text())
    want = json.loads((ref_dir / "metrics.json").read_text())
    assert got["epochs_run"] == want["epochs_run"] == EPOCHS
    assert got["metrics"].keys() == want["metrics"].keys()
    for key, value in want["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_urgent_preemption_with_workers_resumes(slurm_cluster, synth_root, shards_dir, tmp_path, backend: str) -> None:
    # the urgent job asks every CPU of the node, so it preempts the task (urgent does not share cores with debug)
    profile = tmp_path / "fill.yaml"
    profile.write_text(
        "partition: debug\ncpus_per_task: 2\nmem_gb: 3\ntime_min: 30\nsignal_delay_s: 60\nsave_wait_s: 15\n"
    )
    cfg = _cfg(
        tmp_path / "runs",
        synth_root,
        shards_dir,
        f"pre{backend}",
        f"teacher.epochs={EPOCHS}",
        f"cluster.profile={profile}",
        *_workers(backend),
    )
    submit_folds(cfg, only={("fold0", "teacher")}, evaluate=False)
    paths = ExperimentPaths.of(cfg)
    run_dir = paths.role_dir(0, "teacher")
    urgent = [
        "sbatch",
        "--parsable",
        "-p",
        "urgent",
        "-c",
        node_cpus(),
        "-J",
        "urgent",
        "-o",
        str(tmp_path / "urgent.out"),
    ]
    _after_first_epoch(run_dir / "metrics.jsonl", [*urgent, "--wrap", "sleep 3"])
    df = _wait(paths.root)
    row = _row(df, "fold0", "teacher")
    assert row["state"] == "COMPLETED" and row["requeues"] >= 1, df.to_string()
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log
    _check_loader_log(log, backend, runs=2)
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_run"] == EPOCHS


# Enough epochs that the signal, sent after the first one, lands mid-run (a tiny student epoch with a
# worker takes well under a second on an idle machine).
TUNE_EPOCHS = 20


def test_tune_trial_with_workers_is_retried_after_usr2(slurm_cluster: str, exp_cfg, capsys) -> None:  # noqa: F811
    backend = "dali"  # the backend whose workers are started by a library (torch's are covered above)
    cfg = apply_overrides(
        exp_cfg,
        {
            "tune.trials": 1,
            "tune.parallel": 1,
            "tune.epochs": TUNE_EPOCHS,
            "tune.pruner": "none",
            "tune.study_name": "killworkers",
            "train.patience": 0,
            "data.backend": backend,
            "data.num_workers": 1,
        },
    )
    t0 = time.monotonic()
    entry = submit_tune(cfg, workdir=ROOT)
    # the tune array (after the teacher outputs job of tune.folds, when the graph has that stage)
    task_id = next(j for j in entry["jobs"] if j["role"] == "tune")["tasks"][0]["task_id"]
    run_dir = trial_run_dir(cfg, 0, 0)
    _after_first_epoch(run_dir / "metrics.jsonl", ["scancel", "--signal=USR2", task_id])
    trials = _wait_study(cfg, 2, timeout_s=420)
    first, retry = trials
    assert first.state.name == "FAIL" and retry.state.name == "COMPLETE", [t.state.name for t in trials]
    assert retry.system_attrs["retry_history"] == [0] and retry.params == first.params
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log
    _check_loader_log(log, backend, runs=2)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == TUNE_EPOCHS  # nothing redone or lost
    with capsys.disabled():
        print(f"\ntune trial with {backend} workers: retried and complete at {time.monotonic() - t0:.0f} s")
