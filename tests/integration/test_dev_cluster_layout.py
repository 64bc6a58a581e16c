"""Issue 19, drill 4: concurrent jobs of the shipped `dev` profile launch their srun steps on a fragmented node.

The dev cluster used to declare 8 CPUs on this 2-core VM (`config_overrides`) with core binding: slurmd folds
the declared cores onto the real ones, so a `-c 2` job given two cores that fold onto one real core (left
free by `-c 1` jobs ending at different times) failed to launch its step (`srun: error: ... Unable to layout
tasks on given cpus`, exit 65). The node now declares the machine's own layout and shares cores instead.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slurm]

PROFILE = Path(__file__).resolve().parents[2] / "slurm" / "clusters" / "dev.yaml"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
# the step line of bonehpc's job scripts (submitit's srun, SRUN_CPUS_PER_TASK from the allocation)
STEP = (
    "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK\n"
    "srun --unbuffered python3 -u -c 'import os; print(\"affinity\", len(os.sched_getaffinity(0)))'\n"
)


def _sbatch(tmp_path: Path, name: str, cpus: int, script: str) -> str:
    body = f"#!/bin/bash\n#SBATCH -J {name}\n#SBATCH -c {cpus}\n#SBATCH --mem=200M\n#SBATCH -o {tmp_path}/{name}.out\n"
    path = tmp_path / f"{name}.sh"
    path.write_text(body + script)
    res = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=True)
    return res.stdout.strip().split(";")[0]


def _steps(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    out = subprocess.run(
        ["sacct", "-n", "-P", "--format=JobID,State,ExitCode", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {r.split("|")[0]: (r.split("|")[1].split()[0], r.split("|")[2]) for r in out.splitlines() if r.strip()}


def test_concurrent_dev_profile_jobs_launch_on_a_fragmented_node(slurm_cluster, tmp_path) -> None:
    cpus = int(yaml.safe_load(PROFILE.read_text())["cpus_per_task"])
    assert cpus >= 2, "the drill needs a multi-CPU task, like the profile's training tasks"
    # fragment the node: single-CPU jobs side by side, every other one ending first
    for i in range(8):
        _sbatch(tmp_path, f"one{i}", 1, f"sleep {8 if i % 2 == 0 else 1}\n")
    time.sleep(3)
    jobs = [_sbatch(tmp_path, f"two{i}", cpus, STEP) for i in range(3)]
    deadline = time.monotonic() + 90
    while True:
        steps = _steps(jobs)
        if all(steps.get(j, ("PENDING", ""))[0] in TERMINAL for j in jobs):
            break
        assert time.monotonic() < deadline, f"jobs not finished after 90 s: {steps}"
        time.sleep(1)
    time.sleep(2)  # the step records reach the database after the job's
    steps = _steps(jobs)
    for i, job in enumerate(jobs):
        log = (tmp_path / f"two{i}.out").read_text()
        assert "Unable to layout tasks" not in log and "srun: error" not in log, log
        assert steps.get(f"{job}.0") == ("COMPLETED", "0:0"), (job, steps)
        # bound to as many real CPUs as it asked for (no two allocated cores folded onto one)
        assert f"affinity {cpus}" in log, log
