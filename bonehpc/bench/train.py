"""Section train: img/s of the real training step (`bonehpc.engine.train_one_epoch`).

For the teacher, the student, the KD step (student + frozen teacher forward), the cached KD step (student +
teacher logits looked up by image id, `bonehpc.teacher_outputs.CachedTeacherOutputs`) and the outputs job's
teacher inference (inference mode, the training autocast; compared with the teacher's training step), on a
device-resident batch ("ceiling": the synthetic backend, no reading, no augmentation) and end to end with each
loader backend; eager and/or torch.compile. The timed windows of all roles and sources of one mode interleave
(teacher, student, kd, ... x ceiling, dali, torch, then again), so that load changes on a shared machine hit
every source and every role alike: the kd cached / student ratio compares windows taken side by side.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bonehpc.bench.common import Endless, build_model, median, ratio, sync
from bonehpc.bench.data import BenchData, bench_config
from bonehpc.bench.options import BenchOptions
from bonehpc.bench.probe import backend_missing, device_label
from bonehpc.config import ExperimentConfig, apply_overrides
from bonehpc.data.loaders import build_loader
from bonehpc.data.shards import ShardReader

log = logging.getLogger(__name__)


def default_modes(dev: torch.device) -> tuple[str, ...]:
    """eager, plus torch.compile on GPU (on CPU inductor's C++ build of ResNet-50 takes minutes)."""
    return ("eager", "compile") if dev.type == "cuda" else ("eager",)


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


def _cached_outputs(teacher: torch.nn.Module, cfg: ExperimentConfig, dev: torch.device, ids: np.ndarray) -> Any:
    """A cache over `ids` (one epoch) for the cached KD step: the teacher's logits on random images of the bench
    size (the lookup is what is timed; its values only have to be a teacher's)."""
    from bonehpc.engine import amp_dtype_of
    from bonehpc.teacher_outputs import CachedTeacherOutputs

    size, amp = cfg.data.image_size, amp_dtype_of(cfg.train.amp, dev)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = teacher(torch.randn(min(len(ids), 64), 3, size, size, device=dev)).float().cpu().numpy()
    table = logits[np.arange(len(ids)) % len(logits)][None]
    cached = CachedTeacherOutputs.in_memory(np.sort(ids), table, dev)
    cached.set_epoch(0)
    return cached


def _make_step(
    cfg: ExperimentConfig,
    name: str,
    dev: torch.device,
    channels_last: bool,
    compiled: bool,
    teacher: str | None,
    cached_ids: np.ndarray | None = None,
) -> _Step:
    from bonehpc.distill import DistillationLoss, build_task_loss
    from bonehpc.models.info import count_params
    from bonehpc.train import build_optimizer, build_scheduler

    model = build_model(name, dev, channels_last)
    rcfg = cfg.student
    kind, t_model, cached = "none", None, None
    if teacher:
        t_model = build_model(teacher, dev, channels_last)
        kind = cfg.distill.kind
        if cached_ids is not None:  # kd_cached: the teacher only fills the cache, it never runs in the step
            cached, t_model = _cached_outputs(t_model.eval(), cfg, dev, cached_ids), None
    d = cfg.distill
    loss_fn = DistillationLoss(build_task_loss(None), t_model, kind, d.alpha, d.tau, cached=cached).to(dev)
    opt = build_optimizer(model, rcfg.optimizer, rcfg.lr, rcfg.weight_decay, rcfg.momentum)
    sched = build_scheduler(opt, 0, 10**9)  # constant-ish lr: the cosine barely moves in a benchmark
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.train.amp == "fp16" and dev.type == "cuda")
    train_model: torch.nn.Module = torch.compile(model) if compiled else model  # type: ignore[assignment]
    return _Step(name, train_model, loss_fn, opt, sched, scaler, count_params(model), compiled)


class _Timer:
    """Warm-up and timed windows of the real training step (`train_one_epoch`) on one stream."""

    def __init__(self, step: _Step, stream: Endless, cfg: ExperimentConfig, dev: torch.device, opts: BenchOptions):
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
        sync(self.dev)
        return round(time.perf_counter() - t0, 2)

    def window(self) -> None:
        """One timed window of `steps` steps: synchronize, steps, synchronize (the only host syncs)."""
        sync(self.dev)
        t0 = time.perf_counter()
        out = self._epoch(self.opts.steps, "bench")
        sync(self.dev)
        self.rates.append(self.opts.batch_size * self.opts.steps / (time.perf_counter() - t0))
        self.loss = out["train/loss"]

    def result(self) -> dict[str, Any]:
        return {
            "img_s": round(median(self.rates), 1),
            "img_s_repeats": [round(r, 1) for r in self.rates],
            "loss": round(self.loss, 4),
        }


class _InferTimer(_Timer):
    """The outputs job's step: the frozen teacher in inference mode under the training autocast, no student."""

    def _epoch(self, steps: int, header: str) -> dict[str, float]:
        teacher = self.step.loss_fn
        amp = self.kwargs["amp_dtype"]
        it = iter(self.stream)
        with torch.inference_mode():
            for _ in range(steps):
                images = next(it)[0]
                with torch.autocast(self.dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                    out = teacher.teacher_logits(images)
        return {"train/loss": float("nan") if steps == 0 else float(out.float().mean())}


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


class _TrainSection:
    """One run of the train section: its batch streams (built once each, on first use) and its output."""

    def __init__(self, opts: BenchOptions, data: BenchData, dev: torch.device) -> None:
        self.opts, self.dev = opts, dev
        self.cfg = bench_config(opts, data)
        self.reader = ShardReader(data.shards)
        self.cl = dev.type == "cuda" and opts.channels_last
        self.modes = opts.modes or default_modes(dev)
        self.streams: dict[str, Endless | None] = {}
        self.errors: dict[str, str] = {}
        self.out: dict[str, Any] = {
            "device": device_label(dev),
            "image_size": opts.image_size,
            "batch_size": opts.batch_size,
            "steps": opts.steps,
            "warmup": opts.warmup,
            "repeats": opts.repeats,
            "amp": self.cfg.train.amp,
            "channels_last": self.cl,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "modes": list(self.modes),
            "loader_workers": opts.loader_workers,
            "runs": [],
            "loader_format": {},
            "ratios": {},
        }
        if "compile" not in self.modes:
            self.out["compile"] = (
                "not measured: eager only (--no-compile, the default on CPU where inductor's C++ build of "
                "ResNet-50 takes minutes; pass --compile to measure it)"
            )

    def _build_stream(self, source: str) -> Endless | None:
        opts = self.opts
        if source == "ceiling":  # synthetic: one random batch made on the device, random labels there
            scfg = apply_overrides(bench_config(opts, None), {"data.backend": "synthetic", "data.num_workers": 0})
            ids = np.arange(max(len(self.reader), opts.batch_size))
            return Endless(build_loader(scfg, None, ids, train=True, device=self.dev, seed=opts.seed))
        missing = backend_missing(source)
        if missing:
            self.errors[source] = missing
            return None
        bcfg = apply_overrides(self.cfg, {"data.backend": source})
        ids = self.reader.image_ids
        s = Endless(build_loader(bcfg, self.reader, ids, train=True, device=self.dev, seed=opts.seed))
        pin = bool(getattr(getattr(s.loader, "dataloader", None), "pin_memory", False))
        self.out["loader_format"][source] = {"pin_memory": pin}
        return s

    def stream(self, source: str) -> Endless | None:
        """The stream of `source` (ceiling, dali, torch); None when it cannot run (why: self.errors)."""
        if source not in self.streams:
            try:
                self.streams[source] = self._build_stream(source)
            except Exception as err:  # noqa: BLE001 - recorded, the other sources still run
                log.exception("building the %s loader failed", source)
                self.errors[source] = f"error: {_error(err)}"
                self.streams[source] = None
        return self.streams[source]

    def _warm_up(self, step: _Step, mode: str, role: str, teacher: str | None) -> list[tuple[dict[str, Any], _Timer]]:
        """One run entry per source; warm-up on each that runs; their (run, timer) pairs."""
        timers: list[tuple[dict[str, Any], _Timer]] = []
        for source in ("ceiling", *self.opts.backends):
            run: dict[str, Any] = {"role": role, "model": step.name, "mode": mode, "source": source}
            if teacher:
                run["teacher"] = teacher
            run["params"] = step.params
            self.out["runs"].append(run)
            s = self.stream(source)
            if s is None:
                run["skipped"] = self.errors.get(source, "unavailable")
                continue
            try:
                timer = (_InferTimer if role == "outputs" else _Timer)(step, s, self.cfg, self.dev, self.opts)
                run["warmup_s"] = timer.warmup()
                self.out["loader_format"].setdefault(source, {}).update(s.first)
                timers.append((run, timer))
            except Exception as err:  # noqa: BLE001
                log.exception("train benchmark %s/%s/%s failed", role, mode, source)
                run["error"] = _error(err)
        return timers

    def _prepare(self, mode: str, role: str, name: str, teacher: str | None) -> list[tuple[dict[str, Any], _Timer]]:
        """Build one role's step and warm it up on every source; its (run, timer) pairs."""
        try:
            cached_ids = None
            if role == "kd_cached":  # every id a stream can give: the ceiling's and the shards'
                cached_ids = np.union1d(np.arange(max(len(self.reader), self.opts.batch_size)), self.reader.image_ids)
            step = _make_step(self.cfg, name, self.dev, self.cl, mode == "compile", teacher, cached_ids)
        except Exception as err:  # noqa: BLE001
            log.exception("building %s %s failed", role, mode)
            self.out["runs"].append({"role": role, "mode": mode, "error": _error(err)})
            return []
        return self._warm_up(step, mode, role, teacher)

    def measure(self, mode: str, roles: list[tuple[str, str, str | None]]) -> None:
        """Warm up every role on every source, then interleave ALL their timed windows (student, kd, kd cached,
        ... x ceiling, dali, torch, then again), so that load changes on a shared machine hit every ratio alike."""
        timers = [pair for role, name, teacher in roles for pair in self._prepare(mode, role, name, teacher)]
        for _ in range(self.opts.repeats):
            for run, timer in list(timers):
                try:
                    timer.window()
                except Exception as err:  # noqa: BLE001
                    log.exception("train benchmark %s/%s/%s failed", run["role"], mode, run["source"])
                    run["error"] = _error(err)
                    timers.remove((run, timer))
        for run, timer in timers:
            run.update(timer.result())
            log.info("train %s", {k: v for k, v in run.items() if k != "img_s_repeats"})

    def close(self) -> None:
        for s in self.streams.values():
            if s is not None:
                s.close()


def bench_train(opts: BenchOptions, data: BenchData, dev: torch.device, workdir: Path) -> dict[str, Any]:
    """Section train: step img/s on a device-resident batch (ceiling) vs end to end per backend; teacher,
    student, KD; each mode."""
    roles = [
        (role, name, teacher)
        for role, name, teacher in (
            ("teacher", opts.teacher, None),
            ("student", opts.student, None),
            ("kd", opts.student, opts.teacher),
            ("kd_cached", opts.student, opts.teacher),
            ("outputs", opts.teacher, opts.teacher),
        )
        if role in opts.roles
    ]
    section = _TrainSection(opts, data, dev)
    try:
        for mode in section.modes:
            section.measure(mode, roles)
    finally:
        section.close()
    section.out["ratios"] = train_ratios(section.out["runs"])
    return section.out


def train_ratios(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Ratios from the train runs: end to end / ceiling per backend, dali / torch, compile / eager, KD / student."""
    rate = {(r["role"], r.get("mode"), r.get("source")): r.get("img_s") for r in runs}  # a failed build: no source
    ratios: dict[str, float | None] = {}
    for role, mode, source in rate:
        if source != "ceiling":
            ratios[f"{role}/{mode}/{source}_vs_ceiling"] = ratio(
                rate[(role, mode, source)], rate.get((role, mode, "ceiling"))
            )
        if source == "dali":
            ratios[f"{role}/{mode}/dali_vs_torch"] = ratio(rate[(role, mode, "dali")], rate.get((role, mode, "torch")))
        if mode == "compile":
            ratios[f"{role}/{source}/compile_vs_eager"] = ratio(
                rate[(role, "compile", source)], rate.get((role, "eager", source))
            )
        if role in ("kd", "kd_cached"):
            ratios[f"{role}/{mode}/{source}_vs_student"] = ratio(
                rate[(role, mode, source)], rate.get(("student", mode, source))
            )
        if role == "outputs":
            ratios[f"outputs/{mode}/{source}_vs_teacher_train"] = ratio(
                rate[("outputs", mode, source)], rate.get(("teacher", mode, source))
            )
    return {k: v for k, v in ratios.items() if v is not None}
