"""The seam of issue 13: a study that loses every image in packing must not break folds, training or the report.

Synthetic data with unusable files (one train patient's only study loses all its images) -> `bonehpc pack`
-> `bonehpc submit folds` in local mode (every task a subprocess, like a cluster job) -> `bonehpc report`.
Every task completes, the lost patient is in no fold, and the report counts packed, rejected and lost.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from tinyexp import TINY_OVERRIDES

from bonehpc.cli import main as cli_main
from bonehpc.data.synthetic import read_marker

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_lost_study_crosses_pack_folds_training_and_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, shards, runs = tmp_path / "mura", tmp_path / "shards", tmp_path / "runs"
    cfg = [
        *TINY_OVERRIDES,
        "cluster.mode=local",
        "cluster.profile=local",
        f"run_root={runs}",
        f"data.mura_root={root}",
        f"data.shards={shards}",
        "data.min_side=16",
        "data.max_reject_frac=0.2",
        "distill.teacher_outputs=online",  # no outputs stage: this test is about the data (keeps it short)
    ]
    monkeypatch.chdir(REPO)  # local jobs run in the working directory (slurm/clusters/local.yaml resolves here)
    assert cli_main(["synth", "--out", str(root), "--patients", "14", "--seed", "3", "--max-side", "128"]) == 0
    (lost_study,) = read_marker(root)["lost_studies"]  # the default --bad-frac loses one whole study
    assert cli_main(["pack", *cfg, "--quiet"]) == 0
    lost = pd.read_csv(shards / "lost_studies.csv")
    assert lost["study"].tolist() == [lost_study]
    lost_patient = lost["patient"].iloc[0]

    assert cli_main(["submit", "folds", *cfg]) == 0
    exp = runs / "tiny"
    folds = pd.read_csv(exp / "folds.csv")
    assert lost_patient not in set(folds["patient"]) and folds["fold"].nunique() == 2
    entry = json.loads((exp / "jobs.json").read_text())["submissions"][-1]
    states = {
        f"{job['kind']} {job['role']} {task.get('fold', '')}".strip(): task["state"]
        for job in entry["jobs"]
        for task in job["tasks"]
    }
    assert len(states) == 7 and set(states.values()) == {"COMPLETED"}, states  # 2 folds + final, 2 roles, evaluate
    for model in ("final_teacher", "final_student", "ensemble_teacher", "ensemble_student"):
        assert json.loads((exp / "holdout" / model / "metrics.json").read_text())["status"] == "completed", model

    assert cli_main(["report", "--exp", "tiny", "--run-root", str(runs)]) == 0
    report = (exp / "report" / "report.md").read_text()
    assert "rejected" in report and "lost" in report and "synthetic" in report
