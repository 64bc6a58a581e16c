"""Fault drills on the real dev Slurm cluster (issue 19), loader workers on, both backends side by side.

One experiment per backend (DALI CPU-only and torch, `data.num_workers=1`), fold 0 and fold 1 teachers:
- drill 1: `scancel --signal=USR2 --full` on fold 0 mid-run (the batch shell is signalled too): the task
  is requeued, resumes from last.pt and completes, never FAILED 0:12;
- cancel: `scancel` on fold 1 mid-run: 10 s later no process of that task is alive (`ps`, by the task's
  Slurm environment), torchrun, trainers and loader workers included;
- drill 5 (torch experiment): its evaluation waits (afterany) on both teachers; after the cancel,
  `resubmit` reruns fold 1 (teacher, then its student) with a new evaluation and cancels the old one,
  still queued behind the requeued fold 0: one evaluation runs, never two;
- after the drills every run folder's metrics.jsonl has strictly increasing epochs (one writer).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_submit_folds import _cfg, _row, _wait
from tinyexp import tiny_overrides

from bonehpc.paths import ExperimentPaths
from jobs.submit import resubmit, submit_folds

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
BACKENDS = ("dali", "torch")
EPOCHS = 8


def _first_epoch(history: Path, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (history.is_file() and history.read_text().strip()):
        assert time.monotonic() < deadline, f"{history}: no epoch finished in {timeout_s:.0f} s"
        time.sleep(0.1)


def task_processes(task_id: str) -> list[str]:
    """`pid args` of every process whose environment is that of Slurm array task `task_id` (ps eww)."""
    job, _, index = task_id.partition("_")
    out = subprocess.run(["ps", "-e", "ww", "e", "-o", "pid=,args="], capture_output=True, text=True, check=True)
    marks = (f"SLURM_ARRAY_JOB_ID={job} ", f"SLURM_ARRAY_TASK_ID={index} ")
    return [line[:200] for line in out.stdout.splitlines() if all(m in line + " " for m in marks)]


def epochs_of(history: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in history.read_text().splitlines() if line.strip()]


HOLD = (
    "import sys, time; from bonehpc.lease import RunLease; RunLease(sys.argv[1]).acquire(); "
    "print('held', flush=True); time.sleep(600)"
)


def test_full_signal_requeues_and_cancel_leaves_no_process(slurm_cluster, synth_root, shards_dir, tmp_path) -> None:
    only = {("fold0", "teacher"), ("fold1", "teacher")}
    t0 = time.monotonic()
    exps = {}
    # drill 2: another process writes the dali experiment's final teacher run (a trainer left behind):
    # the Slurm task of that run must not become a second writer
    held = tmp_path / "runs" / "faultdali" / "final" / "teacher"
    held.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(held)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    try:
        _drills(exps, only, synth_root, shards_dir, tmp_path)
        df = _wait(exps["dali"][0].root)
        final = _row(df, "final", "teacher")
        assert final["state"] == "FAILED", df.to_string()
        assert f"another process is writing this run: pid {holder.pid} on host" in final["error"], final["error"]
        assert not (held / "metrics.jsonl").exists()  # it wrote nothing
    finally:
        holder.kill()
        holder.wait()
    _concurrent_submits(synth_root, shards_dir, tmp_path)
    print(
        f"\n[timing] fault drills (USR2 --full, cancel, resubmit, second writer), both backends: "
        f"{time.monotonic() - t0:.0f} s"
    )


def _concurrent_submits(synth_root: Path, shards_dir: Path, tmp_path: Path) -> None:
    """Drill 3: two `submit folds` of one experiment at the same moment submit one job graph, not two; the
    other exits 2 naming the first, or finds everything pending and submits nothing."""
    cfg = _cfg(tmp_path / "runs", synth_root, shards_dir, "race")
    over = tiny_overrides(tmp_path / "runs", synth_root, shards_dir, "name=race", "cluster.mode=slurm")
    cmd = [sys.executable, "-m", "bonehpc", "submit", "folds", *over, "cluster.profile=dev"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
    outs = [(rc, err) for err, rc in outs]
    registry = json.loads(ExperimentPaths.of(cfg).jobs.read_text())
    submitted = [s for s in registry["submissions"] if s["jobs"]]
    ids = [j["job_id"] for s in submitted for j in s["jobs"]]
    subprocess.run(["scancel", *ids], check=False, timeout=60)  # the graph itself is not under test here
    assert len(submitted) == 1, registry["submissions"]
    codes = sorted(rc for rc, _ in outs)
    assert codes in ([0, 0], [0, 2]), outs
    if codes == [0, 2]:
        assert "another process is submitting to this experiment" in max(outs)[1], outs


def _drills(exps: dict, only: set, synth_root: Path, shards_dir: Path, tmp_path: Path) -> None:
    for backend in BACKENDS:
        cfg = _cfg(
            tmp_path / "runs",
            synth_root,
            shards_dir,
            f"fault{backend}",
            f"teacher.epochs={EPOCHS}",
            "train.patience=0",  # every epoch runs (no early stop before the drills land)
            f"data.backend={backend}",
            "data.num_workers=1",
        )
        selected = only | {("final", "teacher")} if backend == "dali" else only
        entry = submit_folds(cfg, only=selected, evaluate=backend == "torch")
        exps[backend] = (ExperimentPaths.of(cfg), [t["task_id"] for t in entry["jobs"][0]["tasks"]])
    for paths, (full, *_) in exps.values():
        _first_epoch(paths.role_dir(0, "teacher") / "metrics.jsonl")
        subprocess.run(["scancel", "--signal=USR2", "--full", full], check=True, timeout=60)
    cancelled = []  # both backends' fold 1 cancelled mid-run first, then one 10 s wait: a wait between them let
    for paths, (_, cancel, *_) in exps.values():  # the second run finish before its cancel on a quiet machine
        _first_epoch(paths.role_dir(1, "teacher") / "metrics.jsonl")
        assert task_processes(cancel), "the running task's processes are not visible to ps"
        subprocess.run(["scancel", cancel], check=True, timeout=60)
        cancelled.append((paths, cancel, time.monotonic()))
    for paths, cancel, cancelled_at in cancelled:
        time.sleep(max(0.0, 10 - (time.monotonic() - cancelled_at)))
        assert task_processes(cancel) == []
        assert not paths.role_completed(1, "teacher"), "the cancel came after the run had finished: no drill"
    # drill 5: the old evaluation still waits for fold 0 (requeued); resubmit replaces it
    paths, _ = exps["torch"]
    old_eval = json.loads(paths.jobs.read_text())["submissions"][0]["jobs"][-1]
    assert old_eval["kind"] == "evaluate"
    again = resubmit(paths.root)
    reran = [(j["role"], [t.get("fold") for t in j["tasks"]]) for j in again["jobs"]]
    assert reran[0] == ("teacher", ["fold1"]) and reran[-1] == ("", [None]), reran  # ... and the evaluation
    assert ("student", ["fold1"]) in reran, reran  # (after the teacher outputs stage, when it is on)
    for backend, (paths, _) in exps.items():
        df = _wait(paths.root)
        row = _row(df, "fold0", "teacher")
        assert row["state"] == "COMPLETED" and row["requeues"] >= 1, (backend, df.to_string())
        run0 = paths.role_dir(0, "teacher")
        assert "resumed from" in (run0 / "train.log").read_text()
        assert json.loads((run0 / "metrics.json").read_text())["epochs_run"] == EPOCHS
        for fold in (0, 1):  # strictly increasing, whatever the drills did
            got = epochs_of(paths.role_dir(fold, "teacher") / "metrics.jsonl")
            assert got == sorted(set(got)), got
        assert epochs_of(run0 / "metrics.jsonl") == list(range(EPOCHS))
        assert not (run0 / ".lease").exists()  # released at the end of the run
        if backend == "dali":
            assert _row(df, "fold1", "teacher")["state"] == "CANCELLED", df.to_string()
            continue  # its final teacher: checked by the caller
        assert set(df["state"]) == {"COMPLETED"}, df.to_string()  # fold 1 rerun, its student, the new evaluation
        assert epochs_of(paths.role_dir(1, "teacher") / "metrics.jsonl") == list(range(EPOCHS))
        old = subprocess.run(
            ["sacct", "-X", "-n", "-P", "--format=State", "-j", old_eval["job_id"]], capture_output=True, text=True
        ).stdout.splitlines()
        assert old and old[-1].startswith("CANCELLED"), old  # superseded while queued: it never ran
