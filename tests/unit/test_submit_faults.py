"""Submissions under faults (issue 19): the experiment submit lock, per-task student dependencies, the
superseded evaluation, tune top-up and its dry run, pack on a CPU partition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tinyexp import tiny_overrides

from bonehpc import slurm
from bonehpc.config import apply_overrides, load_config
from bonehpc.constants import INPUT_ERROR_EXIT_CODE
from bonehpc.paths import ExperimentPaths

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}


def _cfg(tmp_path: Path, synth_root: Path, shards_dir: Path, *extra: str):
    over = tiny_overrides(tmp_path / "runs", synth_root, shards_dir, "cluster.mode=slurm", "cluster.profile=dev")
    return load_config(None, [*over, *extra])


def _register(paths: ExperimentPaths, tasks: list[tuple[str, str, str, str]]) -> None:
    """A registry of earlier (local-mode) submissions: (fold, role, task id, recorded state)."""
    jobs = [
        {
            "kind": "evaluate" if role == "evaluate" else "train",
            "role": "" if role == "evaluate" else role,
            "job_id": tid.split("_")[0],
            "tasks": [{"task_id": tid, "state": state, **({} if role == "evaluate" else {"fold": fold})}],
        }
        for fold, role, tid, state in tasks
    ]
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.jobs.write_text(json.dumps({"submissions": [{"mode": "local", "jobs": jobs}]}))


def test_student_k_waits_for_teacher_k_only_and_the_old_evaluation_is_superseded(
    tmp_path, synth_root, shards_dir
) -> None:
    cfg = _cfg(tmp_path, synth_root, shards_dir)
    paths = ExperimentPaths.of(cfg)
    # fold 0's teacher still runs from an earlier submission, and so waits its evaluation
    _register(paths, [("fold0", "teacher", "55_0", "RUNNING"), ("holdout", "evaluate", "56", "PENDING")])
    with slurm.dry_run() as scripts:
        entry = from_jobs_submit().submit_folds(cfg)
    task_of = {(j["role"], t["fold"]): t["task_id"] for j in entry["jobs"] for t in j["tasks"] if "fold" in t}
    task_of[("teacher", "fold0")] = "55_0"  # still running from the earlier submission
    upstream = {"outputs": "teacher", "student": "outputs" if ("outputs", "fold0") in task_of else "teacher"}
    stages = [j for j in entry["jobs"] if j["role"] in upstream]
    assert {t["fold"] for j in stages for t in j["tasks"]} == {"fold0", "fold1", "final"}
    for job in stages:  # each task waits for its own fold's upstream task, and for nothing else
        assert len(job["tasks"]) == 1, job  # the folds' upstream tasks are in different jobs: one job per fold
        fold = job["tasks"][0]["fold"]
        assert job["dependency"] == f"afterok:{task_of[(upstream[job['role']], fold)]}", (job, task_of)
    ev = entry["jobs"][-1]
    assert ev["kind"] == "evaluate" and set(ev["dependency"].removeprefix("afterany:").split(":")) == {
        "55_0",
        *(j["job_id"] for j in entry["jobs"][:-1]),
    }
    assert len(scripts) == len(entry["jobs"])
    plan = from_jobs_submit().plan_folds(cfg, paths)
    assert plan.superseded == ["56"]  # the queued evaluation waits on the old tasks only: replaced


def from_jobs_submit():
    import jobs.submit

    return jobs.submit


HOLD = (
    "import sys, time; from bonehpc.lease import submit_lock\n"
    "with submit_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"
)


def test_concurrent_submit_of_one_experiment_exits_2_naming_the_holder(tmp_path, synth_root, shards_dir) -> None:
    over = tiny_overrides(tmp_path / "runs", synth_root, shards_dir, "name=locked", "cluster.mode=local")
    root = tmp_path / "runs" / "locked"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        res = subprocess.run(
            [sys.executable, "-m", "bonehpc", "submit", "folds", *over],
            capture_output=True,
            text=True,
            env=ENV,
            cwd=ROOT,
            timeout=120,
        )
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == INPUT_ERROR_EXIT_CODE, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]  # the error is one line (after the preflight's info line)
    assert f"another process is submitting to this experiment: pid {holder.pid}" in last
    assert not (root / "jobs.json").exists() and not (root / "fold0").exists()


def test_tune_tops_up_to_trials_and_its_dry_run_writes_nothing(tmp_path, synth_root, shards_dir) -> None:
    from bonehpc import tune
    from jobs.submit import submit_tune

    cfg = _cfg(tmp_path, synth_root, shards_dir, "tune.trials=5", "tune.parallel=2", "tune.folds=[0]")
    for fold in cfg.tune.folds:  # the search reuses trained teachers; prepare() checks only that they exist
        d = ExperimentPaths.of(cfg).role_dir(fold, "teacher")
        d.mkdir(parents=True)
        (d / "best.pt").write_bytes(b"")
        (d / "metrics.json").write_text('{"status": "completed"}')
    journal = ExperimentPaths.of(cfg).tune_journal

    def tune_tasks(entry: dict) -> int:
        return sum(len(j["tasks"]) for j in entry["jobs"] if j["role"] == "tune")

    with slurm.dry_run():
        entry = submit_tune(cfg)
    assert tune_tasks(entry) == 5
    assert not journal.exists() and not tune.study_dir(cfg).exists()  # a dry run creates no study

    study = tune.prepare(cfg)
    for value in (0.5, 0.6):
        trial = study.ask()
        study.tell(trial, value)
    study.tell(study.ask(), state=tune.TrialState.FAIL)  # failed, not retried: it used up its slot
    with slurm.dry_run():
        entry = submit_tune(cfg)
    assert tune_tasks(entry) == 2  # 5 - 3, not another 5
    done = apply_overrides(cfg, {"tune.trials": 3})
    with slurm.dry_run():
        assert submit_tune(done)["jobs"] == []


def test_pack_on_a_cpu_partition_drops_the_gpu_nodes_options(tmp_path) -> None:
    prof = slurm.load_profile("example-gpu")
    train = prof.for_kind("train")
    assert train.constraint == "a100" and train.additional == {"hint": "nomultithread"}
    pack = prof.for_kind("pack")
    assert pack.partition == "cpu" and pack.constraint == "" and pack.additional == {}
    same = tmp_path / "same.yaml"
    same.write_text("partition: gpu\nconstraint: a100\nadditional: {hint: nomultithread}\n")
    assert slurm.load_profile(str(same)).for_kind("pack").constraint == "a100"  # same partition: kept


def test_make_status_and_report_take_the_run_root() -> None:
    out = subprocess.run(
        ["make", "-n", "status", "report", "resubmit", "EXP=e", "RUN_ROOT=/elsewhere"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    cmds = [line for line in out.splitlines() if "bonehpc " in line]
    assert len(cmds) == 3 and all("--exp 'e' --run-root '/elsewhere'" in c for c in cmds), cmds


def test_a_time_limit_without_room_to_progress_is_refused(tmp_path, synth_root, shards_dir) -> None:
    """Drill 2's cause: a 1-minute limit gets USR2 right after start-up, every requeued run again."""
    from bonehpc.preflight import PreflightError
    from jobs.submit import submit_folds

    short = tmp_path / "short.yaml"
    short.write_text("partition: debug\ntime_min: 1\nsignal_delay_s: 25\nsave_wait_s: 15\nstartup_s: 30\n")
    cfg = _cfg(tmp_path, synth_root, shards_dir, f"cluster.profile={short}")
    with pytest.raises(PreflightError) as err:
        submit_folds(cfg)
    msg = str(err.value)
    assert "time_min=1 (60 s)" in msg and "startup_s=30 s" in msg and "need time_min >= 2" in msg
    assert not ExperimentPaths.of(cfg).root.exists()  # nothing written
    short.write_text("partition: debug\ntime_min: 2\nsignal_delay_s: 25\nsave_wait_s: 15\nstartup_s: 30\n")
    with slurm.dry_run():
        assert submit_folds(cfg)["jobs"]


def test_a_second_evaluation_of_one_experiment_is_refused(tiny_cfg, tmp_path) -> None:
    """Drill 5's two evaluations at once on one folder: the second stops naming the first, writes nothing."""
    from bonehpc.config import save_config
    from bonehpc.lease import LeaseHeldError
    from jobs.evaluate import EvaluateTask

    paths = ExperimentPaths.of(tiny_cfg)
    cfg_path = tmp_path / "config.yaml"
    save_config(tiny_cfg, cfg_path)
    paths.holdout.mkdir(parents=True)
    hold = (
        "import sys, time; from bonehpc.lease import RunLease; RunLease(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    cmd = [sys.executable, "-c", hold, str(paths.holdout)]
    holder = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeldError, match=f"evaluating this experiment: pid {holder.pid}"):
            EvaluateTask(str(cfg_path))()
    finally:
        holder.kill()
        holder.wait()
    assert not (paths.holdout / "outcome.json").exists()
