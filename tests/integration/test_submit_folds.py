"""The fold job graph on the real dev Slurm cluster: order, failure + resubmit, idempotency, requeue + resume.

Runs real training (tiny: 64 px, resnet18 / hybrid_tiny, 1-3 epochs) through submitit, torchrun and sacct.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinyexp import tiny_overrides

from bonehpc.accounting import experiment_status
from bonehpc.config import ExperimentConfig, load_config
from bonehpc.paths import ExperimentPaths
from jobs.submit import resubmit, submit_folds

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def node_cpus() -> str:
    """The dev node's CPU count (the machine's own: slurm/dev/up.sh declares its real layout)."""
    return subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True).stdout.split()[0]


def _cfg(root: Path, synth_root: Path, shards_dir: Path, name: str, *extra: str) -> ExperimentConfig:
    overrides = tiny_overrides(
        root, synth_root, shards_dir, f"name={name}", "cluster.mode=slurm", "cluster.profile=dev"
    )
    return load_config(None, [*overrides, *extra])


def _wait(exp: Path, timeout_s: float = 420.0, until: set[str] = TERMINAL):
    """Poll the status table until every task is in `until`; returns it."""
    t0 = time.monotonic()
    while True:
        df = experiment_status(exp)
        if len(df) and set(df["state"]) <= until:
            return df
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"tasks not finished after {timeout_s:.0f} s:\n{df.to_string()}")
        time.sleep(3)


def _row(df, fold: str, role: str):
    return df.set_index(["fold", "role"]).loc[(fold, role)]


def test_graph_failure_resubmit_and_idempotency(slurm_cluster, synth_root, shards_dir, tmp_path) -> None:
    cfg = _cfg(tmp_path / "runs", synth_root, shards_dir, "graph")
    paths = ExperimentPaths.of(cfg)
    paths.root.mkdir(parents=True)
    # forced failure of fold 1: its run folder cannot be created (a file where the folder should be)
    (paths.root / "fold1").write_text("in the way")
    t0 = time.monotonic()
    first = submit_folds(cfg)
    kinds = [(j["kind"], j["role"], [t["fold"] for t in j["tasks"] if "fold" in t]) for j in first["jobs"]]
    assert kinds == [
        ("train", "teacher", ["fold0", "fold1", "final"]),
        ("train", "outputs", ["fold0", "fold1", "final"]),
        ("train", "student", ["fold0", "fold1", "final"]),
        ("evaluate", "", []),
    ]
    # teacher -> outputs -> students, task by task (aftercorr): the teacher-outputs stage is its own array
    teacher_id, outputs_id = first["jobs"][0]["job_id"], first["jobs"][1]["job_id"]
    assert first["jobs"][1]["dependency"] == f"aftercorr:{teacher_id}"
    assert first["jobs"][2]["dependency"] == f"aftercorr:{outputs_id}"
    assert first["jobs"][3]["dependency"].startswith("afterany:") and outputs_id in first["jobs"][3]["dependency"]

    df = _wait(paths.root)
    t_first = time.monotonic() - t0
    assert _row(df, "fold1", "teacher")["state"] == "FAILED"
    # a failed teacher cancels its outputs task, and so its student (their dependencies can never be met)
    assert _row(df, "fold1", "outputs")["state"] == "CANCELLED"
    assert _row(df, "fold1", "student")["state"] == "CANCELLED"
    for fold in ("fold0", "final"):
        for role in ("teacher", "outputs", "student"):
            assert _row(df, fold, role)["state"] == "COMPLETED", df.to_string()
        assert _row(df, fold, "teacher")["end"] <= _row(df, fold, "outputs")["start"]
        assert _row(df, fold, "outputs")["end"] <= _row(df, fold, "student")["start"]
        student = json.loads((paths.role_dir(0 if fold == "fold0" else fold, "student") / "metrics.json").read_text())
        assert student["teacher_outputs"] == "cached"  # the students never ran the teacher
    # the evaluation ran although a fold failed, after everything else, and recorded the failure
    ev = _row(df, "holdout", "evaluate")
    assert ev["state"] == "COMPLETED"
    for fold in ("fold0", "final"):
        assert _row(df, fold, "teacher")["end"] <= _row(df, fold, "student")["start"]
    assert ev["start"] >= max(e for e in df["end"] if e and e != ev["end"])
    outcome = json.loads((paths.holdout / "outcome.json").read_text())
    assert outcome["failed"] == ["fold1/teacher", "fold1/student"]
    # every task logged what it got; under task/affinity the step kept both CPUs of the task (SRUN_CPUS_PER_TASK)
    teacher0 = first["jobs"][0]["tasks"][0]["task_id"]
    start = "".join(p.read_text() for p in (paths.submitit / teacher0).glob("*_log.err"))
    assert "task resources: cpus=2 affinity=0-1 (asked 2) gpus=0 (asked 0)" in start, start[-3000:]
    assert "nproc=1 nnodes=1 world_size=1" in start

    # the CLI status shows the failure too
    out = subprocess.run(
        [sys.executable, "-m", "bonehpc", "status", "--exp", str(paths.root), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    states = {(t["fold"], t["role"]): t["state"] for t in json.loads(out)["tasks"]}
    assert states[("fold1", "teacher")] == "FAILED"

    # fix the cause; resubmit reruns only fold 1 (teacher, then its student) and the evaluation
    (paths.root / "fold1").unlink()
    t1 = time.monotonic()
    second = resubmit(paths.root)
    assert [(j["role"], [t.get("fold") for t in j["tasks"]]) for j in second["jobs"]] == [
        ("teacher", ["fold1"]),
        ("outputs", ["fold1"]),
        ("student", ["fold1"]),
        ("", [None]),
    ]
    df = _wait(paths.root)
    t_second = time.monotonic() - t1
    assert set(df["state"]) == {"COMPLETED"}, df.to_string()
    for fold in ("fold0", "fold1", "final"):
        for role in ("teacher", "student"):
            metrics = json.loads(
                (paths.role_dir(fold if fold == "final" else int(fold[-1]), role) / "metrics.json").read_text()
            )
            assert metrics["status"] == "completed" and "val/study_kappa" in metrics["metrics"]

    # everything is done: a second submit submits nothing
    third = submit_folds(cfg)
    assert third["jobs"] == []
    assert third["skipped"]["fold0/teacher"] == "completed" and third["skipped"]["holdout/evaluate"] == "completed"
    registry = json.loads(paths.jobs.read_text())
    assert [s["kind"] for s in registry["submissions"]] == ["folds", "resubmit"]
    assert all(s["git_sha"] and s["config_hash"] and s["profile"] == "dev" for s in registry["submissions"])
    print(f"\n[timing] first graph {t_first:.0f} s, resubmit {t_second:.0f} s")


def test_baseline_role_runs_through_the_graph(slurm_cluster, synth_root, shards_dir, tmp_path) -> None:
    """distill.baseline=true: a third array, the student without KD (no teacher dependency); the evaluation
    waits for it too (afterany) and records it."""
    # online teacher: no outputs stage here (the graph test above has it), which keeps this test short
    extra = ("distill.baseline=true", "distill.teacher_outputs=online")
    cfg = _cfg(tmp_path / "runs", synth_root, shards_dir, "base", *extra)
    paths = ExperimentPaths.of(cfg)
    entry = submit_folds(cfg)
    assert [(j["kind"], j["role"]) for j in entry["jobs"]] == [
        ("train", "teacher"),
        ("train", "student"),
        ("train", "baseline"),
        ("evaluate", ""),
    ]
    base, ev = entry["jobs"][2], entry["jobs"][3]
    assert base["dependency"] == "" and [t["fold"] for t in base["tasks"]] == ["fold0", "fold1", "final"]
    assert ev["dependency"].startswith("afterany:") and base["job_id"] in ev["dependency"].split(":")
    df = _wait(paths.root)
    assert set(df["state"]) == {"COMPLETED"}, df.to_string()
    for fold in (0, 1, "final"):
        metrics = json.loads((paths.role_dir(fold, "baseline") / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["distill"] == "none"
    ends = [_row(df, f, "baseline")["end"] for f in ("fold0", "fold1", "final")]
    assert _row(df, "holdout", "evaluate")["start"] >= max(ends)
    outcome = json.loads((paths.holdout / "outcome.json").read_text())
    assert {"fold0/baseline", "fold1/baseline", "final/baseline"} <= set(outcome["completed"])


# Epochs of the interrupted trainings: the signal is sent right after the first epoch and must land
# mid-run even on an idle machine (a 64 px resnet18 epoch of the tiny set takes ~1 s there).
EPOCHS = 6


def test_requeued_training_resumes_with_same_metrics(slurm_cluster, synth_root, shards_dir, tmp_path) -> None:
    extra = (f"teacher.epochs={EPOCHS}",)
    ref_cfg = _cfg(tmp_path / "runs", synth_root, shards_dir, "ref", *extra)
    rq_cfg = _cfg(tmp_path / "runs", synth_root, shards_dir, "rq", *extra)
    only = {("fold0", "teacher")}
    t0 = time.monotonic()
    submit_folds(ref_cfg, only=only, evaluate=False)
    rq = submit_folds(rq_cfg, only=only, evaluate=False)
    task_id = rq["jobs"][0]["tasks"][0]["task_id"]
    rq_paths = ExperimentPaths.of(rq_cfg)
    history = rq_paths.role_dir(0, "teacher") / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (history.is_file() and history.read_text().strip()):  # first epoch done: mid-run
        assert time.monotonic() < deadline, "the training never finished its first epoch"
        time.sleep(0.1)
    # SIGTERM: what a site without PreemptParameters=send_user_signal sends on preemption (and scontrol
    # requeue); the task handles it like USR2 (the preemption test below covers USR2 through TrainTask)
    subprocess.run(["scancel", "--signal=TERM", task_id], check=True)

    df = _wait(rq_paths.root)
    ref_df = _wait(ExperimentPaths.of(ref_cfg).root)
    print(f"\n[timing] requeue test {time.monotonic() - t0:.0f} s")
    row = _row(df, "fold0", "teacher")
    assert row["state"] == "COMPLETED" and row["requeues"] >= 1, df.to_string()
    assert _row(ref_df, "fold0", "teacher")["requeues"] == 0
    log = (rq_paths.role_dir(0, "teacher") / "train.log").read_text()
    assert "resumed from" in log
    got = json.loads((rq_paths.role_dir(0, "teacher") / "metrics.json").read_text())
    want = json.loads((ExperimentPaths.of(ref_cfg).role_dir(0, "teacher") / "metrics.json").read_text())
    assert got["epochs_run"] == want["epochs_run"] == EPOCHS
    assert got["metrics"].keys() == want["metrics"].keys()
    for key, value in want["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key


def test_preempted_by_urgent_partition_resumes(slurm_cluster, synth_root, shards_dir, tmp_path) -> None:
    # the urgent job below asks every CPU of the node, so it preempts the task (urgent does not share cores with
    # debug jobs). The time limit is long
    # enough that submitit calls the signal a preemption (not a timeout: it does not use up max_num_timeout)
    profile = tmp_path / "fill.yaml"
    profile.write_text(
        "partition: debug\ncpus_per_task: 2\nmem_gb: 3\ntime_min: 30\nsignal_delay_s: 60\nsave_wait_s: 15\n"
    )
    cfg = _cfg(
        tmp_path / "runs", synth_root, shards_dir, "pre", f"teacher.epochs={EPOCHS}", f"cluster.profile={profile}"
    )
    entry = submit_folds(cfg, only={("fold0", "teacher")}, evaluate=False)
    paths = ExperimentPaths.of(cfg)
    history = paths.role_dir(0, "teacher") / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (history.is_file() and history.read_text().strip()):
        assert time.monotonic() < deadline, "the training never finished its first epoch"
        time.sleep(0.1)
    urgent = subprocess.run(
        [
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
            "--wrap",
            "sleep 3",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    df = _wait(paths.root)
    row = _row(df, "fold0", "teacher")
    assert row["state"] == "COMPLETED" and row["requeues"] >= 1, df.to_string()
    task_id = entry["jobs"][0]["tasks"][0]["task_id"]
    logs = "".join(p.read_text() for p in (paths.submitit / task_id).glob("*.out"))
    assert "this job is preempted" in logs and "(3 remaining timeouts)" in logs
    assert json.loads((paths.role_dir(0, "teacher") / "metrics.json").read_text())["epochs_run"] == EPOCHS
    sacct = subprocess.run(
        ["sacct", "-X", "-n", "-P", "--format=State", "-j", urgent], capture_output=True, text=True, check=True
    ).stdout
    assert sacct.split() == ["COMPLETED"]
