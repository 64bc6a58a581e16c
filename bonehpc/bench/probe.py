"""Where the numbers come from: CPU, memory, GPUs, library versions, which loader backends import here.

torch is imported inside the functions that need it, so that `bonehpc.bench.pack` (imported by the
decode-only pool workers) stays torch-free.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bonehpc.bench.options import BenchError, BenchOptions

if TYPE_CHECKING:
    import torch


def version_of(dist_name: str, module: str | None = None) -> str | None:
    """Installed version of a distribution, else the module's __version__, else None (not importable)."""
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        pass
    if module:
        try:
            return str(getattr(importlib.import_module(module), "__version__", "unknown"))
        except ImportError:
            return None
    return None


def _proc_field(path: str, key: str) -> str | None:
    """The text after `key` on the first line of /proc/<file> that starts with it (None: not there)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line[len(key) :].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    model = _proc_field("/proc/cpuinfo", "model name")
    return model.lstrip(":").strip() if model else platform.processor() or platform.machine()


def mem_total_gib() -> float | None:
    kib = _proc_field("/proc/meminfo", "MemTotal:")
    return round(int(kib.split()[0]) / 2**20, 1) if kib else None


def cpu_label() -> str:
    """'cpu: AMD EPYC ... (2 cores)'."""
    return f"cpu: {cpu_model()} ({len(os.sched_getaffinity(0))} cores)"


def device_label(dev: torch.device) -> str:
    """'cuda: NVIDIA H100 80GB HBM3' or 'cpu: AMD EPYC ... (2 cores)'."""
    if dev.type == "cuda":
        import torch

        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return cpu_label()


def resolve_device(opts: BenchOptions) -> torch.device:
    import torch

    if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise BenchError("device cuda asked for, but torch sees no CUDA GPU")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: CPU model and cores, load average, GPUs, library versions, date."""
    import numpy as np
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    dali = version_of("nvidia-dali-cuda130", "nvidia.dali") or version_of("nvidia-dali-cuda120", "nvidia.dali")
    return {
        "host": platform.node(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "mem_gib": mem_total_gib(),
        "gpus": gpus,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": dali,
        "timm": version_of("timm", "timm"),
        "albumentations": version_of("albumentations", "albumentations"),
        "opencv": version_of("opencv-python-headless", "cv2"),
        "h5py": version_of("h5py", "h5py"),
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def backend_missing(backend: str) -> str | None:
    """Why a loader backend (dali, or torch = albumentations) cannot run here; None: it can."""
    if backend == "dali":
        from bonehpc.augment.dali import dali_available

        return None if dali_available() else "skipped: nvidia.dali does not import here"
    if backend == "torch":
        try:
            importlib.import_module("albumentations")
        except ImportError:
            return "skipped: albumentations does not import here"
    return None
