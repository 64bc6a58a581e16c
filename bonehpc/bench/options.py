"""Options of a benchmark run (torch-free: the CLI builds them before torch is imported)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

SECTIONS = ("pack", "reads", "loader", "train", "infer", "ddp", "parity")
BACKENDS = ("dali", "torch")
MODES = ("eager", "compile")
ROLES = ("teacher", "student", "kd", "kd_cached", "outputs")
TARGETS = {"pack": 0.8, "reads": 10.0, "infer": 3.0}
FORMAT_VERSION = 1


class BenchError(RuntimeError):
    """A benchmark cannot run as asked (bad option, missing data); the message says why."""


@dataclass(kw_only=True)
class BenchOptions:
    """Sizes and switches of one benchmark run (defaults: small, for a CPU machine)."""

    image_size: int = 64
    """Network input side."""
    batch_size: int = 16
    """Images per step (per process)."""
    steps: int = 4
    """Timed steps per repeat (train, infer, ddp)."""
    warmup: int = 2
    """Untimed steps before timing (they include torch.compile's compilation)."""
    repeats: int = 5
    """Timed windows per figure; the median is reported."""
    loader_steps: int = 24
    """Timed batches of each loader alone (more than the prefetch queue holds)."""
    patients: int = 80
    """Synthetic patients (about 3.6 images each)."""
    max_side: int = 256
    """Longest side of the synthetic PNGs."""
    pack_size: int = 0
    """Side of the packed images; 0: image_size x 256/224 (the ratio of the default config)."""
    backends: tuple[str, ...] = BACKENDS
    """Loader backends to measure (dali is skipped, and said so, when it does not import)."""
    modes: tuple[str, ...] = ()
    """eager and/or compile; empty: eager, plus compile when a GPU is used."""
    amp: str = "auto"
    """train.amp: auto (bf16 on GPU, off on CPU), bf16, fp16 or off."""
    channels_last: bool = True
    """channels_last models and batches on GPU."""
    teacher: str = "resnet50"
    """Teacher model name."""
    student: str = "hybrid_small"
    """Student model name."""
    kd: str = "soft"
    """Distillation kind of the KD step (soft or hard)."""
    roles: tuple[str, ...] = ROLES
    """Steps to measure: teacher, student, kd (student + frozen teacher forward), kd_cached (student + cached teacher
    logits looked up by image id: `bonehpc.teacher_outputs`) and/or outputs (the outputs job's teacher inference)."""
    workers: int = 0
    """Loader worker processes; 0: min(8, cores - 1), at least 1."""
    pack_workers: int = 0
    """Packing processes; 0: all cores."""
    read_images: int = 1000
    """Images read by the reads benchmark."""
    ddp_procs: int = 0
    """Processes of the DDP figure; 0: the number of GPUs, or 2 on a CPU machine."""
    threads: int = 0
    """torch CPU threads of this process (torch.set_num_threads); 0: torch's default."""
    device: str = "auto"
    """auto (cuda when available), cuda or cpu."""
    seed: int = 0
    """Seed of the synthetic data and of the loaders."""
    workdir: str = ""
    """Folder for the synthetic data and shards (kept); empty: a temporary folder, removed afterwards."""

    def __post_init__(self) -> None:
        for key in ("image_size", "batch_size", "steps", "repeats", "loader_steps", "patients", "read_images"):
            if getattr(self, key) <= 0:
                raise BenchError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("warmup", "pack_size", "workers", "pack_workers", "ddp_procs", "threads"):
            if getattr(self, key) < 0:
                raise BenchError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.max_side < 16:
            raise BenchError(f"max_side must be >= 16, got {self.max_side}")
        self.backends = tuple(self.backends)
        self.modes = tuple(self.modes)
        self.roles = tuple(self.roles)
        for what, given, allowed in (
            ("role", self.roles, ROLES),
            ("backend", self.backends, BACKENDS),
            ("mode", self.modes, MODES),
        ):
            for x in given:
                if x not in allowed:
                    raise BenchError(f"{what} {x!r} is not one of {', '.join(allowed)}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise BenchError(f"amp {self.amp!r} is not one of auto, bf16, fp16, off")
        if self.kd not in ("soft", "hard"):
            raise BenchError(f"kd {self.kd!r} is not soft or hard")
        if self.device not in ("auto", "cuda", "cpu"):
            raise BenchError(f"device {self.device!r} is not auto, cuda or cpu")

    @property
    def resolved_pack_size(self) -> int:
        return self.pack_size or math.ceil(self.image_size * 256 / 224)

    @property
    def cores(self) -> int:
        return len(os.sched_getaffinity(0))

    @property
    def loader_workers(self) -> int:
        return self.workers or max(1, min(8, self.cores - 1))
