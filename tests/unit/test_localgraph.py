"""The local job graph: Slurm-style dependencies, tasks at once within the machine, failures isolated."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest

from bonehpc.config import ConfigError
from bonehpc.localgraph import LocalGraph, Share, parse_dependency, plan_share, visible_gpus
from bonehpc.slurm import ResourceSpec, make_executor


def test_dependency_strings_are_read_the_slurm_way() -> None:
    assert parse_dependency("") == []
    assert parse_dependency("aftercorr:L1.1,afterok:L1.2_0:L1.2_1") == [
        ("aftercorr", ["L1.1"]),
        ("afterok", ["L1.2_0", "L1.2_1"]),
    ]
    for bad in ("afterok:1?afterany:2", "after:5", "afterok:", "singleton"):
        with pytest.raises(ConfigError, match="dependency"):
            parse_dependency(bad)


def test_machine_is_shared_out() -> None:
    # the project's 2-core VM: two tasks of one thread each
    assert plan_share("auto", cores=2, gpus=[], workers=1) == Share(2, 1, (), 2, 1)
    assert plan_share(1, cores=2, gpus=[], workers=1).threads == 2  # one at a time: both cores
    # an 8-GPU workstation: one task per GPU, its CUDA_VISIBLE_DEVICES, the loader workers paid from the cores
    share = plan_share("auto", cores=64, gpus=list(range(8)), workers=4)
    assert (share.slots, share.threads, share.gpus) == (8, 4, tuple((g,) for g in range(8)))
    assert share.slots * (share.threads + share.workers) <= 64
    assert plan_share("auto", cores=64, gpus=[0, 1, 2, 3], gpus_per_task=2, workers=2).gpus == ((0, 1), (2, 3))
    assert plan_share(16, cores=64, gpus=[0, 1], workers=2).slots == 2  # never more tasks than GPUs
    assert plan_share("auto", cores=32, gpus=[], mem_gb=8, mem_total_gb=40).slots == 5  # memory bounds it
    assert plan_share("auto", cores=4, gpus=[], user_threads=True).threads == 0  # OMP_NUM_THREADS set: kept
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,1"}) == [3, 1]
    assert visible_gpus({}, count=lambda: 2) == [0, 1]
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-0f3a"})
    from bonehpc.config import load_config

    assert load_config(None, ["cluster.local_parallel=3"]).cluster.local_parallel == 3
    for bad in ("0", "many"):
        with pytest.raises(ConfigError, match="cluster.local_parallel"):
            load_config(None, [f"cluster.local_parallel={bad}"])


def _graph(tmp_path: Path, share: Share) -> tuple[LocalGraph, object]:
    executor = make_executor(ResourceSpec(time_min=5, signal_delay_s=100), tmp_path / "%j", "local", "t")
    return LocalGraph(share, tmp_path), executor


def _add(graph: LocalGraph, executor, fn, items, name: str, dependency: str = "") -> dict:  # noqa: ANN001
    record: dict = {"tasks": []}
    graph.add(executor, fn, items, record, what=lambda i, e: f"{name} {i}", dependency=dependency)
    return record


def test_graph_runs_ready_tasks_at_once_and_a_failure_skips_only_its_dependents(tmp_path: Path) -> None:
    graph, ex = _graph(tmp_path, Share(2, 3, ((5,), (7,)), 2, 0))
    # "teacher" 1 fails (sleep("x"): TypeError); its student is cancelled, the others go on
    teacher = _add(graph, ex, time.sleep, [1.5, "x", 1.5], "teacher")
    student = _add(graph, ex, time.sleep, [0.1, 0.1, 0.1], "student", f"aftercorr:{teacher['job_id']}")
    env = _add(graph, ex, os.getenv, ["CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"], "env")
    ids = ":".join(r["job_id"] for r in (teacher, student, env))
    last = _add(graph, ex, functools.partial(time.sleep, 0.1), None, "evaluate", f"afterany:{ids}")
    graph.run()

    t, s = teacher["tasks"], student["tasks"]
    assert [x["state"] for x in t] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert "TypeError" in t[1]["error"]
    assert [x["state"] for x in s] == ["COMPLETED", "CANCELLED", "COMPLETED"]
    assert s[1]["reason"] == "dependency never satisfied: teacher 1 FAILED"
    for i in (0, 2):
        assert s[i]["start"] >= t[i]["end"]  # student k after teacher k, not after the whole teacher array
    assert t[1]["start"] < t[0]["end"]  # two at once
    assert s[0]["start"] < t[2]["end"]  # student 0 did not wait for teacher 2
    assert last["tasks"][0]["state"] == "COMPLETED"
    assert last["tasks"][0]["start"] >= max(x.get("end", 0) for x in t + s + env["tasks"])
    # each task got its own GPU and its share of threads
    results = [graph.tasks[x["task_id"]].result for x in env["tasks"]]
    assert results[0] in ("5", "7") and results[1] == "3"


# ---------------------------------------------------------------------------------------------- real training

ROOT = Path(__file__).resolve().parents[2]
TIMING = {"time_s", "train/img_per_s"}
RUN_FOLD0 = (
    "import logging, sys\n"
    "from bonehpc.config import load_config\n"
    "from jobs.submit import submit_folds\n"
    "logging.basicConfig(level=logging.INFO)\n"
    "submit_folds(load_config(sys.argv[1]), only={('fold0', 'teacher'), ('fold0', 'student')}, evaluate=False)\n"
)


def _records(run_dir: Path) -> list[dict]:
    import json

    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in (run_dir / "metrics.jsonl").open()]


def _alive(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (the experiment's config path)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                out.append(int(cmdline.parent.name))
        except OSError:
            continue
    return out


@pytest.mark.slow
def test_ctrl_c_stops_every_task_a_rerun_resumes_and_concurrent_folds_match_one_alone(tiny_cfg, tmp_path) -> None:  # noqa: ANN001
    """Fold 0 alone (1 task at a time), interrupted by Ctrl-C in its teacher's second epoch and run again, gives
    the same epoch records as fold 0's teacher run beside fold 1's (2 at a time), for the same seed and threads
    (an interrupted run resumes to the same result: test_train's preemption test)."""
    import json
    import signal
    import subprocess
    import sys

    from bonehpc.config import apply_overrides, save_config
    from bonehpc.paths import ExperimentPaths
    from jobs.submit import submit_folds

    base = {"cluster.mode": "local", "cluster.profile": "local", "teacher.epochs": 2, "train.num_threads": 1}
    alone = apply_overrides(tiny_cfg, {**base, "cluster.local_parallel": 1, "run_root": str(tmp_path / "a")})
    paths = ExperimentPaths.of(alone)
    cfg_path = save_config(alone, tmp_path / "alone.yaml")
    # the terminal's Ctrl-C goes to the whole foreground process group: so does this one
    # SIGINT at its default, as in a terminal: a shell without job control (slurm/dev/with-cluster.sh runs the
    # suite in the background) starts its children with SIGINT ignored, and Python then keeps ignoring it
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_FOLD0, str(cfg_path)],
        cwd=ROOT,
        start_new_session=True,
        env=dict(os.environ),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    jsonl = paths.role_dir(0, "teacher") / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (jsonl.is_file() and jsonl.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=200) in (-signal.SIGINT, 128 + signal.SIGINT)
    time.sleep(1)
    assert _alive(str(cfg_path)) == [] and _alive(str(paths.config)) == []  # every task and trainer ended
    (entry,) = json.loads(paths.jobs.read_text())["submissions"]
    tasks = {job["role"]: job["tasks"][0] for job in entry["jobs"]}  # teacher (outputs) student
    assert tasks["teacher"]["state"] == "CANCELLED" and "interrupted" in tasks["teacher"]["reason"]
    assert tasks["student"]["state"] == "CANCELLED" and "before it started" in tasks["student"]["reason"]
    assert (paths.role_dir(0, "teacher") / "last.pt").is_file() and not paths.role_completed(0, "teacher")

    again = submit_folds(alone, only={("fold0", "teacher")}, evaluate=False)
    assert [t["state"] for job in again["jobs"] for t in job["tasks"]] == ["COMPLETED"]
    assert "resumed from" in (paths.role_dir(0, "teacher") / "train.log").read_text()

    both = apply_overrides(tiny_cfg, {**base, "cluster.local_parallel": 2, "run_root": str(tmp_path / "b")})
    entry = submit_folds(both, only={("fold0", "teacher"), ("fold1", "teacher")}, evaluate=False)
    teachers = entry["jobs"][0]["tasks"]
    assert [t["state"] for t in teachers] == ["COMPLETED"] * 2
    assert teachers[1]["start"] < teachers[0]["end"]  # the two ran at once
    assert _records(paths.role_dir(0, "teacher")) == _records(ExperimentPaths.of(both).role_dir(0, "teacher"))
