"""What a job task was given (CPUs, GPUs, processes) and the checks made at its start; torch-light.

The start-of-task check (`check_task`) runs in every training task before torchrun starts, and logs one
line a user can compare with `scontrol show job`:

    task resources: cpus=2 affinity=0-1 (asked 2) gpus=0 (asked 0) CUDA_VISIBLE_DEVICES=- nproc=1 nnodes=1
    world_size=1

It fails with one line (ResourceError) when the task got fewer CPUs than it asked for (an srun step that
did not get --cpus-per-task: SRUN_CPUS_PER_TASK missing) or fewer usable GPUs than it asked for (driver too
old for the CUDA build of torch, wrong CUDA_VISIBLE_DEVICES): a GPU allocation never silently trains on the CPU.
torch is imported only when GPUs are asked for.

Also here: the OpenMP threads per training process (`omp_threads`), the rendezvous port of multi-node jobs
(`rendezvous_port`), the signal-delay rule of Slurm profiles (`check_signal_delay`) and the last exception
line of a failed task's log (`last_error_line`, `task_failure_line`).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

# How long TrainTask.checkpoint waits for the trainers to write last.pt after the stop signal (upper bound);
# profiles set it per site (save_wait_s), the job gets it through BONEHPC_SAVE_WAIT_S.
DEFAULT_SAVE_WAIT_S = 90
# Slack on top of the save wait: Slurm delivers --signal on its ~30 s tick (often late), and torchrun
# needs a moment to exit after the trainers.
SIGNAL_MARGIN_S = 10
# Rendezvous ports of multi-node jobs: RDZV_PORT_BASE + job id % RDZV_PORT_SPAN, below Linux's default
# ephemeral range (32768-60999) so that an outgoing connection never holds the port.
RDZV_PORT_BASE = 20000
RDZV_PORT_SPAN = 10000


class ResourceError(RuntimeError):
    """A task did not get what its profile asked for; the message is one line."""


def cpu_affinity() -> list[int]:
    """CPUs this process may run on (what Slurm's task/affinity or cgroup cpuset left it)."""
    return sorted(os.sched_getaffinity(0))


def _env_int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name, "")
    m = re.search(r"(\d+)$", raw.strip())  # SLURM_GPUS_PER_NODE may read "gpu:2" or "a100:2"
    return int(m.group(1)) if m else 0


def asked_cpus(env: Mapping[str, str] | None = None) -> int:
    """CPUs the Slurm task asked for (SLURM_CPUS_PER_TASK); 0 outside Slurm (nothing to check)."""
    return _env_int(os.environ if env is None else env, "SLURM_CPUS_PER_TASK")


def asked_gpus(env: Mapping[str, str] | None = None) -> int:
    """GPUs of this node in the Slurm allocation (SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE); 0 outside."""
    env = os.environ if env is None else env
    return _env_int(env, "SLURM_GPUS_ON_NODE") or _env_int(env, "SLURM_GPUS_PER_NODE")


def nvidia_driver_version() -> str:
    """The NVIDIA kernel driver version, or why there is none."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", proc.read_text(errors="replace"))
        if m:
            return m.group(1)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "none (no /proc/driver/nvidia, no nvidia-smi)"
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else f"unknown (nvidia-smi exited {out.returncode})"


def torch_cuda_version() -> str:
    """The CUDA version torch was built for ('none' for a CPU-only build)."""
    import torch

    return str(torch.version.cuda) if torch.version.cuda else "none (CPU-only torch build)"


def cuda_device_count() -> int:
    """torch.cuda.device_count() (0 when the driver is missing or too old)."""
    import torch

    return int(torch.cuda.device_count())


def check_task(
    *,
    cpus: int,
    gpus: int,
    nproc: int,
    nnodes: int = 1,
    affinity: Iterable[int] | None = None,
    device_count: int | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """The start-of-task line; ResourceError (one line) when CPUs or GPUs fall short of what was asked.

    Args:
        cpus: CPUs the task asked for (0: no check, e.g. a local run).
        gpus: GPUs per node the task asked for (0: a CPU run; torch is then not imported).
        nproc: training processes this node starts (each needs a GPU when gpus > 0).
        nnodes: nodes of the task (world size = nnodes * nproc).
        affinity: the CPU set (default: this process's); device_count: torch's GPU count (default: asked).
        env: the environment to read CUDA_VISIBLE_DEVICES from (default: os.environ).
    """
    env = os.environ if env is None else env
    aff = sorted(cpu_affinity() if affinity is None else affinity)
    visible = env.get("CUDA_VISIBLE_DEVICES", "-") or "''"
    if cpus and len(aff) < cpus:
        raise ResourceError(
            f"CPU affinity is {len(aff)} CPU(s) {aff} but the task asked for {cpus}: the srun step did not get "
            "--cpus-per-task (set SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK, Slurm >= 22.05)"
        )
    count = 0
    if gpus:
        count = cuda_device_count() if device_count is None else device_count
        if count == 0 or count < nproc:
            raise ResourceError(
                f"the task asked for {gpus} GPU(s) for {nproc} process(es) but torch sees {count}: "
                f"NVIDIA driver {nvidia_driver_version()}, torch CUDA {torch_cuda_version()}, "
                f"CUDA_VISIBLE_DEVICES={visible} (a CUDA 13 torch needs driver R580 or newer); not falling back to CPU"
            )
    return (
        f"task resources: cpus={len(aff)} affinity={_ranges(aff)} (asked {cpus or '-'}) "
        f"gpus={count} (asked {gpus}) CUDA_VISIBLE_DEVICES={visible} nproc={nproc} nnodes={nnodes} "
        f"world_size={nproc * nnodes}"
    )


def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for c in cpus:
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def omp_threads(cpus: int, nproc: int, env: Mapping[str, str] | None = None, num_threads: int = 0) -> str:
    """OMP_NUM_THREADS for each training process: a user-set value, else train.num_threads, else cpus / nproc.

    torchrun itself sets 1 when more than one process starts on a node, which leaves all but one core of a
    CPU run idle.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").strip():
        return env["OMP_NUM_THREADS"].strip()
    if num_threads > 0:
        return str(num_threads)
    return str(max(1, cpus // max(1, nproc)))


def thread_env(cpus: int, nproc: int, env: Mapping[str, str] | None = None, num_threads: int = 0) -> dict[str, str]:
    """OpenMP variables for the training processes: OMP_NUM_THREADS (`omp_threads`), and outside a Slurm
    allocation with more than one thread OMP_WAIT_POLICY=PASSIVE (unless set).

    Measured on the shared 2-core VM under load 4-7: with libgomp's default spin-waiting, 2 threads made a
    resnet50 step 2.5-4x slower than 1 thread; with PASSIVE, 2 threads cost the same as 1 there, and an idle
    machine still gets both cores. A Slurm task owns its cores, so it keeps the default policy.
    """
    env = os.environ if env is None else env
    out = {"OMP_NUM_THREADS": omp_threads(cpus, nproc, env, num_threads)}
    local = not env.get("SLURM_JOB_ID")
    if local and int(out["OMP_NUM_THREADS"]) > 1 and not env.get("OMP_WAIT_POLICY"):
        out["OMP_WAIT_POLICY"] = "PASSIVE"
    return out


def rendezvous_port(job_id: str | int) -> int:
    """The c10d rendezvous port of a multi-node job: the same on every node, different for jobs running together.

    Consecutive job ids get different ports (two jobs collide only when their ids differ by a multiple of
    RDZV_PORT_SPAN), and every port is below the ephemeral range (see `ephemeral_port_range`).
    """
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return RDZV_PORT_BASE + int(digits) % RDZV_PORT_SPAN


def ephemeral_port_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """This machine's ephemeral port range (Linux default 32768-60999)."""
    try:
        low, high = Path(path).read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def check_signal_delay(signal_delay_s: int, save_wait_s: int) -> None:
    """ValueError unless the time-limit signal leaves the save wait plus SIGNAL_MARGIN_S before the kill."""
    need = save_wait_s + SIGNAL_MARGIN_S
    if signal_delay_s < need:
        raise ValueError(
            f"signal_delay_s: {signal_delay_s} s is shorter than save_wait_s ({save_wait_s} s) + {SIGNAL_MARGIN_S} s "
            f"margin; a job stopped by the time limit would be killed while writing last.pt (use >= {need})"
        )


# ----------------------------------------------------------------------------------------------
# Failures explained: the last exception line of a failed task's log

_EXC_LINE = re.compile(
    r"^\s*(?:\[[^\]]*\]:?\s*)?"  # torchrun's optional "[rank0]:" prefix
    r"((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)(?::\s.*)?"  # a traceback's last line
    r"|bonehpc(?:[. ]\w+)*: \S.*)$"  # the one-line errors of bonehpc's entry points ("bonehpc train: ...")
)
# raised by the wrappers around the real failure (torchrun, submitit, TrainTask): never the answer
_WRAPPERS = ("ChildFailedError", "FailedJobError", "UncompletedJobError", "torchrun exited with")
# ... except submitit's own verdict on a task it gave up (`timed-out too many times`): that is the cause
_SUBMITIT_VERDICT = "UncompletedJobError: Job not requeued because"
# Slurm's own lines in a task's log: a launch failure (srun: error: ... Unable to layout tasks ..., exit 65)
# or the step/job ended by Slurm (slurmstepd: error: *** JOB 12 ON n1 CANCELLED AT ... DUE TO TIME LIMIT ***)
_SLURM_LINE = re.compile(r"^\s*((?:srun|slurmstepd)(?:-[\w.-]+)?: error: .*\S)\s*$")


def last_error_line(text: str) -> str:
    """The last `SomeError: message` line of a log that is not a wrapper's, else the last Slurm error line
    (srun / slurmstepd), '' when there is neither."""
    lines = text.splitlines()
    for line in reversed(lines):
        m = _EXC_LINE.match(line.rstrip())
        if m and (_SUBMITIT_VERDICT in line or not any(w in line for w in _WRAPPERS)):
            return m.group(1).strip()[:500]
    for line in reversed(lines):
        m = _SLURM_LINE.match(line)
        if m:
            return m.group(1)[:500]
    return ""


def task_log_files(submitit_dir: str | Path, task_id: str) -> list[Path]:
    """The submitit logs of one task (stderr first): <submitit_dir>/<task_id>/<task_id>_<rank>_log.{err,out}."""
    folder = Path(submitit_dir) / str(task_id)
    return sorted(folder.glob("*_log.err")) + sorted(folder.glob("*_log.out"))


def task_failure_line(submitit_dir: str | Path, task_id: str, max_bytes: int = 2_000_000) -> str:
    """The last exception line in the logs of a failed task ('' when the logs have none)."""
    for path in task_log_files(submitit_dir, task_id):
        try:
            with path.open("rb") as fh:
                fh.seek(max(0, path.stat().st_size - max_bytes))
                line = last_error_line(fh.read().decode(errors="replace"))
        except OSError:
            continue
        if line:
            return line
    return ""
