"""`make submit-all` on the real dev cluster: folds and tune queued in one command before any teacher finished;
trials run after their teacher; a failed teacher cancels the trials that need it, and `tune status` says why."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from tinyexp import tiny_overrides

from bonehpc.accounting import query
from bonehpc.cli.tune import task_lines
from bonehpc.config import apply_overrides, load_config
from bonehpc.paths import ExperimentPaths
from bonehpc.tune import study_dir
from jobs.submit import submit_all, submit_tune

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _wait(job_id: str, n: int, done: set[str], timeout_s: float = 300) -> dict:
    """sacct records of tasks 0..n-1 of the job once every one is in a state of `done`."""
    t0 = time.monotonic()
    ids = [f"{job_id}_{i}" for i in range(n)] if n > 1 else [job_id]
    while True:
        records = query([job_id])
        if all(i in records and records[i].state in done for i in ids):
            return records
        assert time.monotonic() - t0 < timeout_s, f"job {job_id}: {[(k, r.state) for k, r in records.items()]}"
        time.sleep(2)


def test_folds_and_tune_queued_at_once(slurm_cluster: str, tmp_path: Path, synth_root, shards_dir, monkeypatch) -> None:  # noqa: ANN001
    over = ("name=chain", "cluster.mode=slurm", "cluster.profile=dev", "train.max_steps_per_epoch=2")
    cfg = load_config(None, tiny_overrides(tmp_path / "runs", synth_root, shards_dir, *over))
    cfg = apply_overrides(
        cfg,
        {
            "tune.trials": 2,
            "tune.parallel": 2,
            "tune.epochs": 1,
            "tune.folds": [0],
            "tune.metric": "val/image_auroc",
            "tune.space": {"student.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        },
    )
    paths = ExperimentPaths.of(cfg)
    paths.root.mkdir(parents=True)
    (paths.root / "fold1").write_text("not a folder\n")  # fold 1's teacher cannot create its run folder: it fails
    # queued on hold, so that nothing can have finished before both submissions are in
    monkeypatch.setenv("SBATCH_HOLD", "1")
    entry = submit_all(cfg, workdir=ROOT)  # one command: folds, the study, the tuned folds after it
    needs1 = apply_overrides(cfg, {"tune.study_name": "needs1", "tune.folds": [1]})
    other = submit_tune(needs1, workdir=ROOT)  # fold 1's teacher is queued, not trained: accepted
    monkeypatch.delenv("SBATCH_HOLD")
    jobs = {f"{j['kind']} {j['role']}".strip(): j for j in entry["jobs"]}
    teacher, outputs, trials = jobs["train teacher"], jobs["train outputs"], jobs["tune tune"]
    tuned = jobs["submit tuned"]
    # trials wait for the teacher outputs of their fold (which wait for the teacher): no second outputs job
    assert trials["dependency"] == f"afterok:{outputs['job_id']}_0"
    assert tuned["dependency"] == f"afterany:{trials['job_id']}"
    assert [j["dependency"] for j in other["jobs"]] == [f"afterok:{outputs['job_id']}_1"]
    # what this test does not look at would only load the 2 cores: the students, evaluate, the final model
    spare = [j["job_id"] for j in entry["jobs"] if j["role"] == "student" or j["kind"] == "evaluate"]
    subprocess.run(["scancel", *spare, f"{teacher['job_id']}_2", f"{outputs['job_id']}_2"], check=True, timeout=30)
    ids = [teacher["job_id"], outputs["job_id"], trials["job_id"], tuned["job_id"], other["jobs"][0]["job_id"]]
    subprocess.run(["scontrol", "release", *ids], check=False, timeout=30)  # rc 1: the cancelled task is done

    t = _wait(teacher["job_id"], 2, {"COMPLETED", "FAILED"})
    assert [t[f"{teacher['job_id']}_{i}"].state for i in range(2)] == ["COMPLETED", "FAILED"]
    o = _wait(outputs["job_id"], 2, {"COMPLETED", "CANCELLED"})
    assert o[f"{outputs['job_id']}_0"].state == "COMPLETED" and o[f"{outputs['job_id']}_1"].state == "CANCELLED"
    done = _wait(trials["job_id"], 2, {"COMPLETED"})
    for i in range(2):  # every trial ran after the teacher it reuses (and its outputs)
        assert done[f"{trials['job_id']}_{i}"].last.start >= o[f"{outputs['job_id']}_0"].last.end
    _wait(other["jobs"][0]["job_id"], 2, {"CANCELLED"}, timeout_s=120)
    (line,) = task_lines(study_dir(needs1))
    assert "2 CANCELLED" in line and f"task {outputs['job_id']}_1 CANCELLED; fix the teacher" in line, line

    # the last job wrote the best params and submitted the folds of chain-tuned (held: inherited SBATCH_HOLD)
    _wait(tuned["job_id"], 1, {"COMPLETED"}, timeout_s=120)
    assert (study_dir(cfg) / "best_params.yaml").is_file()
    registry = json.loads((paths.root.parent / "chain-tuned" / "jobs.json").read_text())
    again = [j["job_id"] for j in registry["submissions"][0]["jobs"]]
    assert len(again) == 4  # teacher, outputs, student, evaluate of the tuned experiment
    subprocess.run(["scancel", *again], check=True, timeout=30)
