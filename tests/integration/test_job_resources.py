"""What a task gets on the dev cluster (task/affinity, TaskPluginParam=Cores, fake GRES GPUs), checked at its start.

- a GPU profile on a node whose GPUs torch cannot use fails at once, in one line naming the driver, torch's
  CUDA and CUDA_VISIBLE_DEVICES (no silent CPU training on a GPU allocation);
- a step without SRUN_CPUS_PER_TASK is pinned to one core by task/affinity and fails the affinity check;
- the failure line is what `bonehpc status` shows for the task.
Both jobs fail before torchrun starts, so the test takes seconds of cluster time.
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
from bonehpc.config import load_config
from bonehpc.paths import ExperimentPaths
from bonehpc.resources import task_failure_line
from jobs.submit import submit_folds

pytestmark = [pytest.mark.slurm]

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def _submit(tmp_path: Path, synth_root: Path, shards_dir: Path, name: str, profile_text: str) -> tuple[str, Path]:
    profile = tmp_path / f"{name}.yaml"
    profile.write_text(profile_text)
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path / "runs",
            synth_root,
            shards_dir,
            f"name={name}",
            "cluster.mode=slurm",
            f"cluster.profile={profile}",
        ),
    )
    entry = submit_folds(cfg, only={("fold0", "teacher")}, evaluate=False)
    return entry["jobs"][0]["tasks"][0]["task_id"], ExperimentPaths.of(cfg).root


def _wait_failed(exp: Path, timeout_s: float = 180.0) -> str:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        df = experiment_status(exp)
        if len(df) and set(df["state"]) <= TERMINAL:
            return str(df["state"].iloc[0])
        time.sleep(1)
    raise AssertionError(f"{exp}: task not finished after {timeout_s:.0f} s")


def test_gpu_and_cpu_shortfalls_fail_at_task_start(slurm_cluster, synth_root, shards_dir, tmp_path) -> None:
    base = "partition: debug\nmem_gb: 3\ntime_min: 10\nsignal_delay_s: 30\nsave_wait_s: 15\nnproc_per_node: 1\n"
    gpu_task, gpu_exp = _submit(tmp_path, synth_root, shards_dir, "gpu", base + "cpus_per_task: 1\ngpus_per_node: 1\n")
    # the step without SRUN_CPUS_PER_TASK: what every Slurm >= 22.05 site did to bonehpc before
    cpu_task, cpu_exp = _submit(
        tmp_path, synth_root, shards_dir, "cpu", base + "cpus_per_task: 2\nsetup:\n  - unset SRUN_CPUS_PER_TASK\n"
    )
    assert _wait_failed(gpu_exp) == "FAILED"
    assert _wait_failed(cpu_exp) == "FAILED"

    gpu_line = task_failure_line(gpu_exp / "submitit", gpu_task)
    assert gpu_line.startswith("bonehpc.resources.ResourceError: the task asked for 1 GPU(s)"), gpu_line
    for part in ("torch sees 0", "NVIDIA driver ", "torch CUDA ", "CUDA_VISIBLE_DEVICES=0", "not falling back to CPU"):
        assert part in gpu_line
    cpu_line = task_failure_line(cpu_exp / "submitit", cpu_task)
    assert "CPU affinity is 1 CPU(s)" in cpu_line and "asked for 2" in cpu_line, cpu_line
    # nothing was trained: the check runs before torchrun
    assert not (gpu_exp / "fold0" / "teacher" / "last.pt").exists()

    # `bonehpc status` shows the line of the failed task
    out = subprocess.run(
        [sys.executable, "-m", "bonehpc", "status", "--exp", str(gpu_exp), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (task,) = json.loads(out)["tasks"]
    assert task["state"] == "FAILED" and "torch sees 0" in task["error"], task


def test_local_submit_shows_the_exception_line_of_a_failed_task(synth_root, shards_dir, tmp_path) -> None:
    # no Slurm: submitit's local executor runs torchrun; the run folder of fold 0 cannot be created
    cfg = load_config(None, tiny_overrides(tmp_path / "runs", synth_root, shards_dir, "name=loc", "cluster.mode=local"))
    paths = ExperimentPaths.of(cfg)
    paths.root.mkdir(parents=True)
    (paths.root / "fold0").write_text("in the way")
    entry = submit_folds(cfg, only={("fold0", "teacher")}, evaluate=False)
    (task,) = entry["jobs"][0]["tasks"]
    assert task["state"] == "FAILED"
    # the trainer's own exception, not torchrun's "ChildFailedError" nor "torchrun exited with 1"
    assert "fold0" in task["error"] and "torchrun exited" not in task["error"], task["error"]
    assert "Error" in task["error"] and "not writable" in task["error"], task["error"]
    df = experiment_status(paths.root)
    assert df.set_index(["fold", "role"]).loc[("fold0", "teacher"), "error"] == task["error"]
    print(f"\nlocal failure line: {task['error']}")
