"""Benchmarks behind `bonehpc bench`: every figure next to the one it is compared with, measured in the same run.

Sections (each one a function here; `run_benchmarks` runs a selection and records failures per section):

- pack: packing img/s vs decode-only img/s, same images and processes (`bonehpc.data.pack.benchmark_pack`).
- reads: warm random-access shard reads vs decoding the PNGs of the same images (`benchmark_reads`).
- loader: img/s of each loader backend alone (`bonehpc.data.loaders.benchmark_loader`).
- train: img/s of the real training step (`bonehpc.engine.train_one_epoch`) for the teacher, the student and
  the KD step (student + frozen teacher), on a device-resident batch ("ceiling": the synthetic backend,
  no reading, no augmentation) and end to end with each loader backend; eager and torch.compile.
- infer: inference img/s of the teacher and the student (`bonehpc.models.info.measure_throughput`).
- ddp: the same training step in 1 and N processes under torchrun (GPUs: NCCL; CPU: gloo, labelled so).
- parity: albumentations vs DALI output on the same shard images (GPU fp16 NHWC when there is a GPU).

The data is a synthetic MURA-layout set (`bonehpc.data.synthetic.generate`) packed into shards in a work
folder (temporary unless given). Timed loops have no host sync except one synchronize at their end;
warm-up steps are not timed; img/s is the median of `repeats` timed windows where that is cheap.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("bonehpc.bench")  # not __name__: it is "__main__" under `python -m`

SECTIONS = ("pack", "reads", "loader", "train", "infer", "ddp", "parity")
BACKENDS = ("dali", "torch")
MODES = ("eager", "compile")
ROLES = ("teacher", "student", "kd")
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
    """Training steps to measure: teacher, student and/or kd (student + frozen teacher)."""
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
        for r in self.roles:
            if r not in ROLES:
                raise BenchError(f"role {r!r} is not one of {', '.join(ROLES)}")
        for b in self.backends:
            if b not in BACKENDS:
                raise BenchError(f"backend {b!r} is not one of {', '.join(BACKENDS)}")
        for m in self.modes:
            if m not in MODES:
                raise BenchError(f"mode {m!r} is not one of {', '.join(MODES)}")
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


# ----------------------------------------------------------------------------------------------
# Machine and helpers


def _version(dist_name: str, module: str | None = None) -> str | None:
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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: CPU model and cores, load average, GPUs, library versions, date."""
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    dali = _version("nvidia-dali-cuda130", "nvidia.dali") or _version("nvidia-dali-cuda120", "nvidia.dali")
    return {
        "host": platform.node(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "mem_gib": _mem_total_gib(),
        "gpus": gpus,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": dali,
        "timm": _version("timm", "timm"),
        "albumentations": _version("albumentations", "albumentations"),
        "opencv": _version("opencv-python-headless", "cv2"),
        "h5py": _version("h5py", "h5py"),
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def device_label(dev: torch.device) -> str:
    """'cuda: NVIDIA H100 80GB HBM3' or 'cpu: AMD EPYC ... (2 cores)'."""
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"cpu: {_cpu_model()} ({len(os.sched_getaffinity(0))} cores)"


def resolve_device(opts: BenchOptions) -> torch.device:
    if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise BenchError("device cuda asked for, but torch sees no CUDA GPU")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, digits)


def _dali_ok() -> bool:
    from bonehpc.augment.dali import dali_available

    return dali_available()


def _albu_ok() -> bool:
    try:
        importlib.import_module("albumentations")
    except ImportError:
        return False
    return True


def _backend_missing(backend: str) -> str | None:
    """Why a backend cannot run here (None: it can)."""
    if backend == "dali" and not _dali_ok():
        return "skipped: nvidia.dali does not import here"
    if backend == "torch" and not _albu_ok():
        return "skipped: albumentations does not import here"
    return None


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class BenchData:
    """The synthetic data set and its shards used by one run."""

    mura_root: Path
    shards: Path
    images: int
    generate_s: float = 0.0
    pack_s: float = 0.0


def prepare_data(opts: BenchOptions, workdir: Path) -> BenchData:
    """Generate the synthetic MURA-layout set and pack it (both reused when already in `workdir`)."""
    from bonehpc.data.mura import build_manifest
    from bonehpc.data.pack import pack_dataset
    from bonehpc.data.shards import ShardReader
    from bonehpc.data.synthetic import generate

    tag = f"p{opts.patients}-s{opts.max_side}-seed{opts.seed}"
    root = workdir / f"synth-{tag}"
    shards = workdir / f"shards-{tag}-px{opts.resolved_pack_size}"
    t0 = time.perf_counter()
    if not (root / "MURA-v1.1" / "valid_labeled_studies.csv").is_file():
        generate(root, patients=opts.patients, seed=opts.seed, max_side=opts.max_side, overwrite=True)
    gen_s = time.perf_counter() - t0
    n = len(build_manifest(root))
    t0 = time.perf_counter()
    if not (shards / "manifest.json").is_file():
        pack_dataset(
            root,
            shards,
            pack_size=opts.resolved_pack_size,
            images_per_shard=max(64, -(-n // max(1, opts.cores))),
            workers=opts.pack_workers or opts.cores,
            max_reject_frac=1.0,  # tiny synthetic images may fall below the packer's minimum side: not an error here
            progress=False,
        )
    pack_s = time.perf_counter() - t0
    packed = len(ShardReader(shards))
    need = opts.batch_size * max(1, opts.ddp_procs)
    if packed < opts.batch_size:
        raise BenchError(f"{packed} packed images < batch size {opts.batch_size}: raise --patients (need {need}+)")
    log.info("bench data: %d images (%d packed at %d px) in %s", n, packed, opts.resolved_pack_size, workdir)
    return BenchData(root, shards, packed, round(gen_s, 2), round(pack_s, 2))


def bench_config(opts: BenchOptions, data: BenchData | None, *, workers: int | None = None) -> Any:
    """The ExperimentConfig the loaders and the training step read (sizes from the options)."""
    from bonehpc.config import load_config

    items = [
        f"data.image_size={opts.image_size}",
        f"data.pack_size={opts.resolved_pack_size}",
        f"data.num_workers={opts.loader_workers if workers is None else workers}",
        f"train.batch_size={opts.batch_size}",
        f"train.amp={opts.amp}",
        f"train.channels_last={str(opts.channels_last).lower()}",
        f"train.seed={opts.seed}",
        f"distill.kind={opts.kd}",
        "data.verify=none",
    ]
    if data is not None:
        items += [f"data.shards={data.shards}", f"data.mura_root={data.mura_root}"]
    return load_config(None, items)


# ----------------------------------------------------------------------------------------------
# pack, reads, loader


def bench_pack(opts: BenchOptions, data: BenchData, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Packing img/s vs decode-only img/s of the same images in the same number of processes."""
    from bonehpc.bench.pack import benchmark_pack

    res = benchmark_pack(
        data.mura_root, workers=opts.pack_workers or opts.cores, pack_size=opts.resolved_pack_size, workdir=workdir
    )
    res["meets_target"] = res["ratio"] >= res["target_ratio"]
    return {"device": device_label(torch.device("cpu")), "max_side": opts.max_side, **res}


def bench_reads(opts: BenchOptions, data: BenchData, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Warm random-access shard reads vs decoding the original PNGs (one process)."""
    from bonehpc.bench.pack import benchmark_reads

    res = benchmark_reads(data.shards, n=opts.read_images, seed=opts.seed)
    res["meets_target"] = res["ratio"] >= res["target_ratio"]
    return {"device": device_label(torch.device("cpu")), "max_side": opts.max_side, **res}


def bench_loader(opts: BenchOptions, data: BenchData, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Training loader img/s of each backend alone (batches on `dev`, augmentation on)."""
    from bonehpc.bench.loader import benchmark_loader
    from bonehpc.data.shards import ShardReader

    cfg = bench_config(opts, data)
    reader = ShardReader(data.shards)
    out: dict[str, Any] = {"device": device_label(dev), "backends": {}}
    for backend in opts.backends:
        missing = _backend_missing(backend)
        if missing:
            out["backends"][backend] = {"skipped": missing}
            continue
        try:
            r = benchmark_loader(
                cfg, reader, backend, opts.loader_steps, warmup=max(3, opts.warmup), device=dev, model_name=None
            )
            r["loader_img_s"] = round(r["loader_img_s"], 1)
            r["startup_s"] = round(r["startup_s"], 2)
            out["backends"][backend] = r
        except Exception as err:  # noqa: BLE001 - one backend failing must not hide the other
            log.exception("loader benchmark %s failed", backend)
            out["backends"][backend] = {"error": f"{type(err).__name__}: {err}"}
    out["note"] = "loader alone: CPU-worker queues prefetch during warm-up; compare end-to-end train figures too"
    return out


# ----------------------------------------------------------------------------------------------
# train


class _Endless:
    """A loader's batches epoch after epoch as ONE stream, so that consecutive `train_one_epoch` calls
    (warm-up, then timed windows) continue where the previous one stopped instead of restarting workers.

    Records the dtype, layout and device of the first batch (the fast-path check).
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.first: dict[str, Any] = {}
        self._stream = self._gen()

    def __len__(self) -> int:
        return 2**31 - 1

    def __iter__(self) -> Iterator[Any]:
        return self._stream

    def _gen(self) -> Generator[Any, None, None]:
        while True:
            n = 0
            for batch in self.loader:
                if not self.first:
                    x = batch[0]
                    self.first = {
                        "dtype": str(x.dtype).replace("torch.", ""),
                        "device": str(x.device),
                        "shape": list(x.shape),
                        "channels_last": bool(x.is_contiguous(memory_format=torch.channels_last))
                        and not x.is_contiguous(),
                    }
                n += 1
                yield batch
            if n == 0:
                raise BenchError(f"{self.loader!r} yields no batch (fewer images than one batch?)")
            self.loader.set_epoch(self.loader.epoch + 1)

    def close(self) -> None:
        self._stream.close()
        self.loader.close()


def _build_model(name: str, dev: torch.device, channels_last: bool) -> torch.nn.Module:
    from bonehpc.models import create_model

    model = create_model(name).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class _Step:
    """Everything `train_one_epoch` needs for one model (and mode)."""

    name: str
    model: torch.nn.Module
    loss_fn: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    params: int
    compiled: bool = False


def _make_step(
    cfg: Any, name: str, dev: torch.device, channels_last: bool, compiled: bool, teacher: str | None
) -> _Step:
    from bonehpc.distill import DistillationLoss, build_task_loss
    from bonehpc.models.info import count_params
    from bonehpc.train import build_optimizer, build_scheduler

    model = _build_model(name, dev, channels_last)
    rcfg = cfg.student
    kind, t_model = "none", None
    if teacher:
        t_model = _build_model(teacher, dev, channels_last)
        kind = cfg.distill.kind
    loss_fn = DistillationLoss(build_task_loss(None), t_model, kind, cfg.distill.alpha, cfg.distill.tau).to(dev)
    opt = build_optimizer(model, rcfg.optimizer, rcfg.lr, rcfg.weight_decay, rcfg.momentum)
    sched = build_scheduler(opt, 0, 10**9)  # constant-ish lr: the cosine barely moves in a benchmark
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.train.amp == "fp16" and dev.type == "cuda")
    train_model: torch.nn.Module = torch.compile(model) if compiled else model  # type: ignore[assignment]
    return _Step(name, train_model, loss_fn, opt, sched, scaler, count_params(model), compiled)


class _Timer:
    """Warm-up and timed windows of the real training step (`train_one_epoch`) on one stream."""

    def __init__(self, step: _Step, stream: _Endless, cfg: Any, dev: torch.device, opts: BenchOptions) -> None:
        from bonehpc.train import amp_dtype_of

        self.step, self.stream, self.dev, self.opts = step, stream, dev, opts
        self.kwargs: dict[str, Any] = {
            "amp_dtype": amp_dtype_of(cfg.train.amp, dev),
            "grad_clip": cfg.train.grad_clip,
            "log_every": 10**9,  # no progress line (and no sync) inside the timed windows
        }
        self.rates: list[float] = []
        self.loss = float("nan")

    def _epoch(self, steps: int, header: str) -> dict[str, float]:
        from bonehpc.engine import train_one_epoch

        st = self.step
        args = (st.model, self.stream, st.loss_fn, st.optimizer, st.scheduler, st.scaler, self.dev)
        return train_one_epoch(*args, max_steps=steps, header=header, **self.kwargs)

    def warmup(self) -> float:
        """Untimed steps (the first ones of a compiled model compile it); returns their seconds."""
        t0 = time.perf_counter()
        self._epoch(max(1, self.opts.warmup), "bench warm-up")
        _sync(self.dev)
        return round(time.perf_counter() - t0, 2)

    def window(self) -> None:
        """One timed window of `steps` steps: synchronize, steps, synchronize (the only host syncs)."""
        _sync(self.dev)
        t0 = time.perf_counter()
        out = self._epoch(self.opts.steps, "bench")
        _sync(self.dev)
        self.rates.append(self.opts.batch_size * self.opts.steps / (time.perf_counter() - t0))
        self.loss = out["train/loss"]

    def result(self) -> dict[str, Any]:
        return {
            "img_s": round(_median(self.rates), 1),
            "img_s_repeats": [round(r, 1) for r in self.rates],
            "loss": round(self.loss, 4),
        }


def _compile_default(dev: torch.device) -> tuple[str, ...]:
    return ("eager", "compile") if dev.type == "cuda" else ("eager",)


def bench_train(opts: BenchOptions, data: BenchData, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Training step img/s: device-resident batch (ceiling) vs end to end per backend; teacher, student, KD."""
    from bonehpc.config import apply_overrides
    from bonehpc.data.loaders import build_loader
    from bonehpc.data.shards import ShardReader

    cfg = bench_config(opts, data)
    reader = ShardReader(data.shards)
    cl = dev.type == "cuda" and opts.channels_last
    modes = opts.modes or _compile_default(dev)
    out: dict[str, Any] = {
        "device": device_label(dev),
        "image_size": opts.image_size,
        "batch_size": opts.batch_size,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "repeats": opts.repeats,
        "amp": cfg.train.amp,
        "channels_last": cl,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "modes": list(modes),
        "loader_workers": opts.loader_workers,
        "runs": [],
        "loader_format": {},
        "ratios": {},
    }
    if "compile" not in modes:
        out["compile"] = (
            "not measured: eager only (--no-compile, the default on CPU where inductor's C++ build of "
            "ResNet-50 takes minutes; pass --compile to measure it)"
        )
    sources: dict[str, _Endless | None] = {}
    errors: dict[str, str] = {}

    def stream(source: str) -> _Endless | None:
        if source in sources:
            return sources[source]
        s: _Endless | None = None
        try:
            if source == "ceiling":  # synthetic: one random batch made on the device, random labels there
                scfg = apply_overrides(bench_config(opts, None), {"data.backend": "synthetic", "data.num_workers": 0})
                ids = np.arange(max(len(reader), opts.batch_size))
                s = _Endless(build_loader(scfg, None, ids, train=True, device=dev, seed=opts.seed))
            else:
                missing = _backend_missing(source)
                if missing:
                    errors[source] = missing
                else:
                    bcfg = apply_overrides(cfg, {"data.backend": source})
                    s = _Endless(build_loader(bcfg, reader, reader.image_ids, train=True, device=dev, seed=opts.seed))
                    out["loader_format"][source] = {
                        "pin_memory": bool(getattr(getattr(s.loader, "dataloader", None), "pin_memory", False)),
                    }
        except Exception as err:  # noqa: BLE001 - recorded, the other sources still run
            log.exception("building the %s loader failed", source)
            errors[source] = f"error: {type(err).__name__}: {err}"
        sources[source] = s
        return s

    roles = [
        (role, name, teacher)
        for role, name, teacher in (
            ("teacher", opts.teacher, None),
            ("student", opts.student, None),
            ("kd", opts.student, opts.teacher),
        )
        if role in opts.roles
    ]
    try:
        for mode in modes:
            for role, name, teacher in roles:
                try:
                    step = _make_step(cfg, name, dev, cl, mode == "compile", teacher)
                except Exception as err:  # noqa: BLE001
                    log.exception("building %s %s failed", role, mode)
                    out["runs"].append({"role": role, "mode": mode, "error": f"{type(err).__name__}: {err}"})
                    continue
                # Warm up on every source, then interleave the timed windows (ceiling, dali, torch, ceiling,
                # ...): on a shared machine, load changes then hit every source alike.
                timers: list[tuple[dict[str, Any], _Timer]] = []
                for source in ("ceiling", *opts.backends):
                    run: dict[str, Any] = {"role": role, "model": name, "mode": mode, "source": source}
                    if teacher:
                        run["teacher"] = teacher
                    run["params"] = step.params
                    out["runs"].append(run)
                    s = stream(source)
                    if s is None:
                        run["skipped"] = errors.get(source, "unavailable")
                        continue
                    try:
                        timer = _Timer(step, s, cfg, dev, opts)
                        run["warmup_s"] = timer.warmup()
                        out["loader_format"].setdefault(source, {}).update(s.first)
                        timers.append((run, timer))
                    except Exception as err:  # noqa: BLE001
                        log.exception("train benchmark %s/%s/%s failed", role, mode, source)
                        run["error"] = f"{type(err).__name__}: {err}"
                for _ in range(opts.repeats):
                    for run, timer in list(timers):
                        try:
                            timer.window()
                        except Exception as err:  # noqa: BLE001
                            log.exception("train benchmark %s/%s/%s failed", role, mode, run["source"])
                            run["error"] = f"{type(err).__name__}: {err}"
                            timers.remove((run, timer))
                for run, timer in timers:
                    run.update(timer.result())
                    log.info("train %s", {k: v for k, v in run.items() if k != "img_s_repeats"})
                del step
    finally:
        for s in sources.values():
            if s is not None:
                s.close()
    out["ratios"] = train_ratios(out["runs"])
    return out


def train_ratios(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Ratios from the train runs: end to end / ceiling per backend, dali / torch, compile / eager, KD / student."""
    rate = {(r["role"], r["mode"], r["source"]): r.get("img_s") for r in runs}
    ratios: dict[str, float | None] = {}
    for role, mode, source in rate:
        if source != "ceiling":
            ratios[f"{role}/{mode}/{source}_vs_ceiling"] = _ratio(
                rate[(role, mode, source)], rate.get((role, mode, "ceiling"))
            )
        if source == "dali":
            ratios[f"{role}/{mode}/dali_vs_torch"] = _ratio(rate[(role, mode, "dali")], rate.get((role, mode, "torch")))
        if mode == "compile":
            ratios[f"{role}/{source}/compile_vs_eager"] = _ratio(
                rate[(role, "compile", source)], rate.get((role, "eager", source))
            )
        if role == "kd":
            ratios[f"kd/{mode}/{source}_vs_student"] = _ratio(
                rate[("kd", mode, source)], rate.get(("student", mode, source))
            )
    return {k: v for k, v in ratios.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# infer


def bench_infer(opts: BenchOptions, data: BenchData | None, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Inference img/s (eval mode, no grad, autocast as in training) of the teacher and the student."""
    from bonehpc.models import create_model
    from bonehpc.models.info import count_gflops, count_params, measure_throughput
    from bonehpc.train import amp_dtype_of

    amp_dtype = amp_dtype_of(opts.amp, dev)
    cl = dev.type == "cuda" and opts.channels_last
    out: dict[str, Any] = {
        "device": device_label(dev),
        "image_size": opts.image_size,
        "batch_size": opts.batch_size,
        "steps": opts.steps,
        "repeats": opts.repeats,
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "channels_last": cl,
        "models": {},
    }
    for role, name in (("teacher", opts.teacher), ("student", opts.student)):
        model = create_model(name)
        rates = []
        # no_grad: measure_throughput only calls the model; with grad on, every forward would also record
        # the autograd graph and keep its activations (not inference).
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            for _ in range(opts.repeats):
                rates.append(
                    measure_throughput(
                        model, opts.image_size, opts.batch_size, dev, opts.steps, max(1, opts.warmup), channels_last=cl
                    )
                )
        out["models"][role] = {
            "model": name,
            "params": count_params(model),
            "gflops": round(count_gflops(model, opts.image_size), 4),
            "img_s": round(_median(rates), 1),
            "img_s_repeats": [round(r, 1) for r in rates],
        }
        del model
    out["ratio"] = _ratio(out["models"]["student"]["img_s"], out["models"]["teacher"]["img_s"], 2)
    out["target_ratio"] = TARGETS["infer"]
    out["meets_target"] = out["ratio"] is not None and out["ratio"] >= TARGETS["infer"]
    return out


# ----------------------------------------------------------------------------------------------
# ddp


def _ddp_model(opts: BenchOptions) -> str:
    return opts.teacher


def _run_torchrun(procs: int, opts: BenchOptions, workdir: Path, timeout_s: float) -> dict[str, Any]:
    out = workdir / f"ddp-{procs}.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        "-m",
        "bonehpc.bench",
        "ddp-worker",
        f"--out={out}",
        f"--model={_ddp_model(opts)}",
        f"--image-size={opts.image_size}",
        f"--batch-size={opts.batch_size}",
        f"--steps={opts.steps}",
        f"--warmup={opts.warmup}",
        f"--repeats={opts.repeats}",
        f"--amp={opts.amp}",
        f"--seed={opts.seed}",
        f"--device={opts.device}",
    ]
    if not opts.channels_last:
        cmd.append("--no-channels-last")
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])  # so the children import this bonehpc, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // procs)))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise BenchError(f"torchrun with {procs} process(es) failed (exit {proc.returncode}): " + " | ".join(tail))
    res: dict[str, Any] = json.loads(out.read_text())
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def bench_ddp(opts: BenchOptions, data: BenchData | None, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """The training step (device-resident batches) in 1 vs N torchrun processes; GPUs: NCCL, CPU: gloo."""
    gpu = dev.type == "cuda"
    n = opts.ddp_procs or (torch.cuda.device_count() if gpu else 2)
    kind = "gpu-nccl" if gpu else "cpu-gloo"
    out: dict[str, Any] = {
        "device": device_label(dev),
        "kind": kind,
        "model": _ddp_model(opts),
        "image_size": opts.image_size,
        "batch_size_per_proc": opts.batch_size,
        "procs": n,
    }
    if gpu and n > torch.cuda.device_count():
        n = torch.cuda.device_count()
        out["procs"] = n
    if n < 2:
        out["skipped"] = f"{n} {'GPU' if gpu else 'process'} only: no scaling to measure (needs 2 or more devices)"
        return out
    if not gpu:
        out["note"] = (
            "CPU: N gloo processes share the same cores (threads split between them); this is a check that "
            "DDP runs and what it costs, not GPU scaling"
        )
    one = _run_torchrun(1, opts, workdir, timeout_s=900)
    many = _run_torchrun(n, opts, workdir, timeout_s=900)
    out["runs"] = {"1": one, str(n): many}
    out["ratio"] = _ratio(many["img_s"], one["img_s"], 3)
    out["efficiency"] = round(out["ratio"] / n, 3) if out["ratio"] is not None else None
    return out


def ddp_worker(argv: Sequence[str] | None = None) -> int:
    """One torchrun process of the DDP benchmark: the training step on a device-resident batch."""
    from bonehpc import dist
    from bonehpc.config import apply_overrides
    from bonehpc.data.loaders import build_loader
    from bonehpc.engine import train_one_epoch
    from bonehpc.train import amp_dtype_of, build_optimizer, build_scheduler

    p = argparse.ArgumentParser(prog="python -m bonehpc.bench ddp-worker")
    p.add_argument("--out", required=True, help="JSON file written by rank 0")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--image-size", type=int, required=True, help="input side")
    p.add_argument("--batch-size", type=int, required=True, help="images per process and step")
    p.add_argument("--steps", type=int, required=True, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, required=True, help="untimed steps")
    p.add_argument("--repeats", type=int, required=True, help="timed windows")
    p.add_argument("--amp", default="auto", help="train.amp")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW on GPU")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    info = dist.init_distributed()
    dev = info.device
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        threads = max(1, len(os.sched_getaffinity(0)) // info.world_size)
        torch.set_num_threads(threads)
    else:
        torch.backends.cudnn.benchmark = True
    opts = BenchOptions(
        image_size=a.image_size,
        batch_size=a.batch_size,
        steps=a.steps,
        warmup=a.warmup,
        repeats=a.repeats,
        amp=a.amp,
        channels_last=not a.no_channels_last,
        seed=a.seed,
    )
    cfg = apply_overrides(bench_config(opts, None), {"data.backend": "synthetic", "data.num_workers": 0})
    cl = dev.type == "cuda" and opts.channels_last
    model = _build_model(a.model, dev, cl)
    if info.distributed:
        if dev.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # as bonehpc.train does
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    from bonehpc.distill import DistillationLoss, build_task_loss

    loss_fn = DistillationLoss(build_task_loss(None), None, "none")
    opt = build_optimizer(model, cfg.teacher.optimizer, cfg.teacher.lr, cfg.teacher.weight_decay, cfg.teacher.momentum)
    sched = build_scheduler(opt, 0, 10**9)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.train.amp == "fp16" and dev.type == "cuda")
    ids = np.arange(opts.batch_size * info.world_size * 4)
    stream = _Endless(
        build_loader(cfg, None, ids, train=True, rank=info.rank, world_size=info.world_size, device=dev, seed=a.seed)
    )
    amp_dtype = amp_dtype_of(cfg.train.amp, dev)
    kw: dict[str, Any] = {"amp_dtype": amp_dtype, "grad_clip": cfg.train.grad_clip, "log_every": 10**9}
    args = (model, stream, loss_fn, opt, sched, scaler, dev)
    train_one_epoch(*args, max_steps=max(1, opts.warmup), header="ddp warm-up", **kw)
    rates = []
    for _ in range(opts.repeats):
        dist.barrier()
        _sync(dev)
        t0 = time.perf_counter()
        train_one_epoch(*args, max_steps=opts.steps, header="ddp", **kw)  # ends in an all_reduce: ranks aligned
        _sync(dev)
        rates.append(info.world_size * opts.batch_size * opts.steps / (time.perf_counter() - t0))
    if info.is_main:
        res = {
            "world_size": info.world_size,
            "backend": "nccl" if dev.type == "cuda" else ("gloo" if info.distributed else "none"),
            "threads_per_proc": threads,
            "img_s": round(_median(rates), 1),
            "img_s_repeats": [round(r, 1) for r in rates],
            "img_s_per_proc": round(_median(rates) / info.world_size, 1),
        }
        Path(a.out).write_text(json.dumps(res))
    stream.close()
    dist.cleanup()
    return 0


# ----------------------------------------------------------------------------------------------
# parity


def bench_parity(opts: BenchOptions, data: BenchData, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """albumentations (CPU) vs DALI (GPU fp16 NHWC, or CPU-only) eval preset on the same shard images."""
    from bonehpc.augment.presets import build_preset
    from bonehpc.config import IMAGENET_STD
    from bonehpc.data.shards import ShardReader

    out: dict[str, Any] = {"device": device_label(dev), "image_size": opts.image_size}
    for name, missing in (("dali", _backend_missing("dali")), ("albumentations", _backend_missing("torch"))):
        if missing:
            out["skipped"] = missing if name == "dali" else "skipped: albumentations does not import here"
            return out
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from bonehpc.augment.albu import apply_albu, build_albu_transform
    from bonehpc.augment.dali import build_dali_pipeline

    reader = ShardReader(data.shards)
    images = [reader.read(int(i)) for i in reader.image_ids[: min(32, len(reader))]]
    n = len(images)
    preset = build_preset(bench_config(opts, data), train=False)
    gpu = dev.type == "cuda"

    def source(info: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if info.idx_in_epoch >= n:
            raise StopIteration
        return images[info.idx_in_epoch][..., None], np.zeros(1, np.int64), np.array([info.idx_in_epoch], np.int64)

    pipe = build_dali_pipeline(
        preset,
        source,
        batch_size=n,
        device_id=dev.index if gpu else None,
        seed=opts.seed,
        parallel=False,
        output_dtype="float16" if gpu else "float32",
        output_layout="HWC" if gpu else "CHW",
    )
    x = next(iter(DALIGenericIterator(pipe, ["x", "y", "id"])))[0]["x"]
    if gpu:
        x = x.permute(0, 3, 1, 2)  # NHWC memory as a channels_last NCHW view, no copy
    out["dali_output"] = {
        "dtype": str(x.dtype).replace("torch.", ""),
        "device": str(x.device),
        "channels_last_view": bool(x.is_contiguous(memory_format=torch.channels_last)) and not x.is_contiguous(),
    }
    d = x.float().cpu().numpy()
    tf = build_albu_transform(preset, seed=opts.seed)
    a = np.stack([apply_albu(tf, im).numpy() for im in images])
    diff = np.abs(a - d)
    one_level = 1.0 / (255.0 * min(IMAGENET_STD))  # one gray level after normalisation
    tol = one_level * 1.001 + (0.01 if gpu else 0.0)  # + fp16 rounding of values up to ~2.6
    out.update(
        images=n,
        max_abs_diff=round(float(diff.max()), 5),
        mean_abs_diff=round(float(diff.mean()), 6),
        max_diff_gray_levels=round(float(diff.max()) / one_level, 3),
        tolerance=round(tol, 5),
        within_tolerance=bool(diff.max() <= tol),
    )
    return out


# ----------------------------------------------------------------------------------------------
# The run


_FUNCS = {
    "pack": bench_pack,
    "reads": bench_reads,
    "loader": bench_loader,
    "train": bench_train,
    "infer": bench_infer,
    "ddp": bench_ddp,
    "parity": bench_parity,
}
_NEEDS_DATA = {"pack", "reads", "loader", "train", "parity"}


def run_benchmarks(sections: Sequence[str], opts: BenchOptions) -> dict[str, Any]:
    """Run the given sections (in the order of SECTIONS) and return the result dict (see `write_result`).

    A failing section is recorded under ``errors`` (type and message) and the others still run.
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise BenchError(f"unknown benchmark section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    todo = [s for s in SECTIONS if s in sections]
    dev = resolve_device(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as bonehpc.train does: fixed shapes, autotuned kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "bonehpc_bench": FORMAT_VERSION,
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "options": {
            **asdict(opts),
            "pack_size": opts.resolved_pack_size,
            "workers": opts.loader_workers,
            "modes": list(opts.modes or _compile_default(dev)),
            "device": str(dev),
        },
        "sections": {},
        "errors": {},
    }
    tmp = None
    if opts.workdir:
        workdir = Path(opts.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = workdir = Path(tempfile.mkdtemp(prefix="bonehpc-bench-"))
    try:
        data: BenchData | None = None
        if _NEEDS_DATA & set(todo):
            try:
                data = prepare_data(opts, workdir)
                result["data"] = {
                    "images": data.images,
                    "patients": opts.patients,
                    "max_side": opts.max_side,
                    "pack_size": opts.resolved_pack_size,
                    "generate_s": data.generate_s,
                    "pack_s": data.pack_s,
                }
            except Exception as err:  # noqa: BLE001 - the sections without data still run
                log.exception("preparing the benchmark data failed")
                result["errors"]["data"] = f"{type(err).__name__}: {err}"
        for name in todo:
            if name in _NEEDS_DATA and data is None:
                result["errors"][name] = "no data (see errors.data)"
                continue
            log.info("bench %s ...", name)
            t0 = time.perf_counter()
            try:
                sec = _FUNCS[name](opts, data, dev, workdir)  # type: ignore[arg-type]
                sec["elapsed_s"] = round(time.perf_counter() - t0, 1)
                result["sections"][name] = sec
            except Exception as err:  # noqa: BLE001 - recorded; the other sections still run
                log.error("bench %s failed:\n%s", name, traceback.format_exc())
                result["errors"][name] = f"{type(err).__name__}: {err}"
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["load_avg_end_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    return result


def default_out_path(root: str | Path = "runs/bench") -> Path:
    """runs/bench/bench-<host>-<YYYYmmdd-HHMMSS>.json."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"bench-{platform.node() or 'host'}-{stamp}.json"


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    """Write the result as JSON (atomically: tmp + replace)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(p)
    return p


# ----------------------------------------------------------------------------------------------
# The table


def _fmt(x: Any) -> str:
    if x is None or x == "":
        return ""
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(measure, img/s, compared with, its img/s, ratio, target) rows of a result."""
    secs = result.get("sections", {})
    rows: list[tuple[str, str, str, str, str, str]] = []

    def add(measure: str, a: Any, vs: str = "", b: Any = None, ratio: Any = None, target: str = "") -> None:
        rows.append((measure, _fmt(a), vs, _fmt(b), _fmt(ratio) + ("x" if ratio is not None else ""), target))

    if "pack" in secs:
        s = secs["pack"]
        add(
            f"pack {s['images']} PNGs -> {s['pack_size']} px shards ({s['workers']} procs)",
            s["pack_img_per_s"],
            "decode only",
            s["decode_img_per_s"],
            s["ratio"],
            ">= 0.8x",
        )
    if "reads" in secs:
        s = secs["reads"]
        add(
            f"warm random shard reads ({s['images']}, {s['pack_size']} px)",
            s["shard_img_per_s"],
            "PNG decode",
            s["png_img_per_s"],
            s["ratio"],
            ">= 10x",
        )
    if "loader" in secs:
        for b, s in secs["loader"]["backends"].items():
            if "loader_img_s" in s:
                w = s["num_workers"]
                add(f"loader {b} alone ({w} worker{'s' if w != 1 else ''}, {s['device']})", s["loader_img_s"])
            else:
                add(f"loader {b}", s.get("skipped") or s.get("error"))
    if "train" in secs:
        if str(secs["train"].get("compile", "")).startswith("not measured"):
            add("train torch.compile", secs["train"]["compile"])
        runs = secs["train"]["runs"]
        rate = {(r["role"], r.get("mode"), r.get("source")): r.get("img_s") for r in runs}
        for r in runs:
            role, mode, source = r["role"], r.get("mode"), r.get("source")
            what = f"train {role} {r.get('model', '')}{'+' + r['teacher'] if r.get('teacher') else ''} {mode}"
            what += f" {'ceiling (device batch)' if source == 'ceiling' else source + ' e2e'}"
            if "img_s" not in r:
                add(what, r.get("skipped") or r.get("error"))
                continue
            if source != "ceiling":
                add(
                    what,
                    r["img_s"],
                    "ceiling",
                    rate.get((role, mode, "ceiling")),
                    _ratio(r["img_s"], rate.get((role, mode, "ceiling"))),
                )
            elif role == "kd":
                b = rate.get(("student", mode, "ceiling"))
                add(what, r["img_s"], "student ceiling", b, _ratio(r["img_s"], b))
            elif mode == "compile":
                b = rate.get((role, "eager", "ceiling"))
                add(what, r["img_s"], "eager ceiling", b, _ratio(r["img_s"], b))
            else:
                add(what, r["img_s"])
    if "infer" in secs:
        s = secs["infer"]
        t, st = s["models"]["teacher"], s["models"]["student"]
        add(f"infer teacher {t['model']}", t["img_s"])
        add(f"infer student {st['model']}", st["img_s"], "teacher", t["img_s"], s["ratio"], ">= 3x")
    if "ddp" in secs:
        s = secs["ddp"]
        if "skipped" in s:
            add("ddp", s["skipped"])
        else:
            n = s["procs"]
            add(
                f"ddp {s['model']} {n} procs ({s['kind']})",
                s["runs"][str(n)]["img_s"],
                "1 proc",
                s["runs"]["1"]["img_s"],
                s["ratio"],
                f"{n}x ideal" if s["kind"].startswith("gpu") else "CPU: same cores",
            )
    if "parity" in secs:
        s = secs["parity"]
        if "skipped" in s:
            add("parity albumentations vs DALI", s["skipped"])
        else:
            add(
                f"parity albu vs DALI {s['dali_output']['dtype']} {s['dali_output']['device']} (gray levels)",
                s["max_diff_gray_levels"],
                target="<= 1 level" + (" + fp16" if "cuda" in s["dali_output"]["device"] else ""),
            )
    for name, err in result.get("errors", {}).items():
        add(f"{name}: FAILED", err)
    return rows


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of every figure with the one it is compared with, and a header naming the machine."""
    m = result.get("machine", {})
    head = (
        f"machine: {m.get('host')} | {m.get('cpu')} x{m.get('cpu_cores_usable')} | GPU: "
        f"{', '.join(m.get('gpus') or []) or 'none'} | torch {m.get('torch')} | DALI {m.get('dali')} | "
        f"load avg {m.get('load_avg_1_5_15')} -> {m.get('load_avg_end_1_5_15')} | {m.get('date')}"
    )
    lines = [head, "", "| measure | img/s | compared with | img/s | ratio | target |", "|---|---:|---|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    return "\n".join(lines)
