"""bonehpc.resources: the start-of-task check, OpenMP threads, the rendezvous port and the failure line of a log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bonehpc.resources import (
    RDZV_PORT_BASE,
    RDZV_PORT_SPAN,
    ResourceError,
    asked_cpus,
    asked_gpus,
    check_task,
    ephemeral_port_range,
    last_error_line,
    omp_threads,
    rendezvous_port,
    task_failure_line,
    thread_env,
)


def test_start_line_names_affinity_gpus_and_world_size() -> None:
    line = check_task(cpus=4, gpus=0, nproc=2, nnodes=2, affinity=[0, 1, 2, 3, 8], env={})
    assert line == (
        "task resources: cpus=5 affinity=0-3,8 (asked 4) gpus=0 (asked 0) CUDA_VISIBLE_DEVICES=- nproc=2 "
        "nnodes=2 world_size=4"
    )


def test_affinity_below_the_asked_cpus_fails_in_one_line() -> None:
    # what a Slurm >= 22.05 step without SRUN_CPUS_PER_TASK looks like under task/affinity: one core
    with pytest.raises(ResourceError, match=r"CPU affinity is 1 CPU\(s\) \[0\] but the task asked for 8") as err:
        check_task(cpus=8, gpus=0, nproc=1, affinity=[0], env={})
    assert "\n" not in str(err.value) and "SRUN_CPUS_PER_TASK" in str(err.value)


@pytest.mark.parametrize(("count", "nproc"), [(0, 1), (0, 4), (2, 4)])
def test_gpu_profile_without_usable_gpus_fails_naming_driver_torch_cuda_and_devices(count: int, nproc: int) -> None:
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    with pytest.raises(ResourceError) as err:
        check_task(cpus=0, gpus=4, nproc=nproc, device_count=count, env=env, affinity=[0])
    msg = str(err.value)
    assert "\n" not in msg
    assert f"torch sees {count}" in msg and "NVIDIA driver " in msg and "torch CUDA " in msg
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in msg and "not falling back to CPU" in msg


def test_gpu_check_on_this_machine_uses_torch() -> None:
    # no device_count given: torch is asked. A CPU machine has none and must fail; a GPU one passes.
    import torch

    if torch.cuda.device_count():
        assert "gpus=" in check_task(cpus=0, gpus=1, nproc=1)
    else:
        with pytest.raises(ResourceError, match="torch sees 0"):
            check_task(cpus=0, gpus=1, nproc=1)


def test_cpu_profile_never_imports_torch() -> None:
    code = (
        "import sys; from bonehpc.resources import check_task; check_task(cpus=1, gpus=0, nproc=1); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_asked_resources_from_the_slurm_environment() -> None:
    env = {"SLURM_CPUS_PER_TASK": "16", "SLURM_GPUS_ON_NODE": "4"}
    assert (asked_cpus(env), asked_gpus(env)) == (16, 4)
    assert asked_gpus({"SLURM_GPUS_PER_NODE": "a100:2"}) == 2
    assert (asked_cpus({}), asked_gpus({})) == (0, 0)  # outside Slurm: nothing asked, nothing checked


def test_omp_threads_share_the_cpus_and_respect_the_user() -> None:
    assert omp_threads(2, 1, env={}) == "2"  # make demo: one CPU trainer on 2 cores uses both
    assert omp_threads(32, 4, env={}) == "8"
    assert omp_threads(2, 4, env={}) == "1"
    assert omp_threads(32, 4, env={}, num_threads=3) == "3"  # train.num_threads
    assert omp_threads(32, 4, env={"OMP_NUM_THREADS": "5"}, num_threads=3) == "5"  # the user's export wins


def test_thread_env_passive_waiting_only_outside_slurm() -> None:
    assert thread_env(2, 1, env={}) == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    assert thread_env(2, 2, env={}) == {"OMP_NUM_THREADS": "1"}  # one thread: nothing to wait for
    assert thread_env(32, 4, env={"SLURM_JOB_ID": "7"}) == {"OMP_NUM_THREADS": "8"}  # the task owns its cores
    assert thread_env(2, 1, env={"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_NUM_THREADS": "2"}


def test_rendezvous_port_below_the_ephemeral_range_and_distinct_for_neighbouring_jobs() -> None:
    low, _ = ephemeral_port_range()
    ports = {rendezvous_port(j) for j in range(123_400, 123_400 + 500)}
    assert len(ports) == 500
    assert all(RDZV_PORT_BASE <= p < RDZV_PORT_BASE + RDZV_PORT_SPAN < low for p in ports)
    assert rendezvous_port("4242") == rendezvous_port(4242)


TORCHRUN_LOG = """\
I1130 04:22:24 bonehpc.train] epoch 1
Traceback (most recent call last):
  File "/x/bonehpc/data/shards.py", line 40, in open
    raise ShardError(f"{path}: missing")
bonehpc.data.shards.ShardError: /data/shards/manifest.json: missing
E1130 04:23:47.474000 23251 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1)
Traceback (most recent call last):
  File "/x/torch/distributed/run.py", line 1142, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
bonehpc.train FAILED
------------------------------------------------------------
Traceback (most recent call last):
RuntimeError: training teacher of 0 failed (torchrun exited with 1)
"""


def test_last_error_line_skips_the_wrappers() -> None:
    assert last_error_line(TORCHRUN_LOG) == "bonehpc.data.shards.ShardError: /data/shards/manifest.json: missing"
    assert last_error_line("[rank1]: ValueError: bad batch\n") == "ValueError: bad batch"
    assert last_error_line("x\nbonehpc.train: data.shards: /nope is not a folder\n") == (
        "bonehpc.train: data.shards: /nope is not a folder"
    )
    assert last_error_line("bonehpc train: TrainError: /r/fold0: not writable\nE1130 x\n") == (
        "bonehpc train: TrainError: /r/fold0: not writable"
    )
    assert last_error_line("all fine\n") == ""


def test_task_failure_line_reads_the_submitit_logs(tmp_path: Path) -> None:
    folder = tmp_path / "submitit" / "17_2"
    folder.mkdir(parents=True)
    (folder / "17_2_0_log.out").write_text("starting\n")
    (folder / "17_2_0_log.err").write_text(TORCHRUN_LOG)
    assert task_failure_line(tmp_path / "submitit", "17_2").endswith("manifest.json: missing")
    assert task_failure_line(tmp_path / "submitit", "18") == ""
