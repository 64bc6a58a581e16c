"""Self-describing training checkpoints: atomic save, `weights_only=True` load, RNG capture, auto-resume.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that
`torch.load(weights_only=True)` (no arbitrary unpickling) reads it:

    format_version  int (FORMAT_VERSION)
    payload         "training" (last.pt: everything to resume) or "weights" (best.pt: no optimizer state)
    model_spec      {"name": str, "kwargs": dict}  - enough to rebuild the network with create_model
    model           state_dict of the unwrapped model (no "module." / "_orig_mod." prefixes)
    epoch           int, epochs completed
    step            int, optimizer steps done
    best_metric, best_epoch        the early-stopping metric and where it peaked
    config          the resolved experiment config as a plain dict
    fold, role      which run it belongs to
  training payload only:
    optimizer, scheduler, scaler   their state_dicts
    rng             {"torch", "cuda", "numpy", "python"} generator states (tensors / lists)

Files are written through `bonehpc.fsio.atomic_write` (the umask applies: group members read them on
shared storage). `CheckpointWriter` writes them from a background thread, so a large rank-0 write does
not hold the training loop (and the ranks waiting for it at the next collective).
"""

from __future__ import annotations

import contextlib
import math
import pickle
import random
import re
import shutil
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bonehpc.fsio import atomic_write
from bonehpc.paths import BEST_CKPT, LAST_CKPT

FORMAT_VERSION = 1
LAST = LAST_CKPT
BEST = BEST_CKPT
REQUIRED_KEYS = ("format_version", "model_spec", "model")
TRAINING_KEYS = ("optimizer", "scheduler", "rng", "epoch", "step", "best_metric", "best_epoch")
TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "rng")
PAYLOAD_TRAINING = "training"
PAYLOAD_WEIGHTS = "weights"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a bonehpc checkpoint; the message names it."""


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def model_spec(model: torch.nn.Module) -> dict[str, Any]:
    """{"name", "kwargs"} that rebuild `model` (set by create_model as `model.bonehpc_spec`)."""
    spec = getattr(unwrap_model(model), "bonehpc_spec", None)
    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError(
            f"model {type(unwrap_model(model)).__name__} has no bonehpc_spec; build it with bonehpc.models.create_model"
        )
    return {"name": str(spec["name"]), "kwargs": dict(spec.get("kwargs") or {})}


# ----------------------------------------------------------------------------------------------
# The state of a run


@dataclass
class TrainState:
    """Where a run stands: what last.pt resumes from and best.pt records."""

    fold: int | str
    role: str
    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    """Optimizer steps done."""
    best_metric: float = math.nan
    best_epoch: int = -1

    def improve(self, metric: float, epoch: int) -> bool:
        """Record `metric` of `epoch` as the best when it is finite and higher (higher is better)."""
        better = math.isfinite(metric) and (
            self.best_epoch < 0 or not math.isfinite(self.best_metric) or metric > self.best_metric
        )
        if better:
            self.best_metric, self.best_epoch = float(metric), epoch
        return better

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        return cls(
            fold=ckpt["fold"],
            role=str(ckpt["role"]),
            epoch=int(ckpt["epoch"]),
            step=int(ckpt["step"]),
            best_metric=float(ckpt["best_metric"]),
            best_epoch=int(ckpt["best_epoch"]),
        )


def _cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU (training may change the originals while it is written)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def make_checkpoint(
    state: TrainState,
    model: torch.nn.Module,
    config: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    copy: bool = True,
) -> dict[str, Any]:
    """A checkpoint: "training" with an optimizer (to resume), else "weights" (model only).

    copy=True: every tensor is a CPU copy (what a background write or a kept snapshot needs; from a GPU
    it is the device-to-host copy torch.save would make anyway). copy=False: the live tensors, for a
    write that finishes before training goes on (saves a memcpy of the whole state on CPU runs).
    """
    take = _cpu_copy if copy else (lambda x: x)
    ckpt: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "payload": PAYLOAD_WEIGHTS if optimizer is None else PAYLOAD_TRAINING,
        "model_spec": model_spec(model),
        "model": take(unwrap_model(model).state_dict()),
        "config": config,
        **asdict(state),
    }
    if optimizer is not None:
        ckpt["optimizer"] = take(optimizer.state_dict())
        ckpt["scheduler"] = take(scheduler.state_dict()) if scheduler is not None else None
        ckpt["scaler"] = scaler.state_dict() if scaler is not None else None
        ckpt["rng"] = capture_rng()
    return ckpt


def weights_payload(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The "weights" checkpoint of a "training" one: the same description without optimizer, scheduler,
    scaler and RNG state (best.pt: what evaluation, predict and export need)."""
    out = {k: v for k, v in ckpt.items() if k not in TRAINING_ONLY}
    out["payload"] = PAYLOAD_WEIGHTS
    return out


# ----------------------------------------------------------------------------------------------
# RNG state as weights_only-loadable values (numpy and python states are tuples of odd types).


def capture_rng() -> dict[str, Any]:
    """The state of the torch, CUDA, numpy and python generators."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "state": list(py_state), "gauss_next": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set the generators back to a state from capture_rng (CUDA states only where as many GPUs exist)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ----------------------------------------------------------------------------------------------
# Files


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (bonehpc.fsio.atomic_write with torch.save).

    A reader never sees a half-written file; a failure leaves the previous file (if any) untouched
    and no temporary file behind. The file gets the mode the umask allows (0o640 under umask 0o027).
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint state lacks {', '.join(missing)}")
    try:
        return atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as err:
        # A full disk surfaces from torch's zip writer as "[enforce fail at inline_container.cc] ...".
        try:
            free = f"{shutil.disk_usage(Path(path).parent).free / 1e6:.1f} MB free there"
        except OSError:
            free = "free space unknown"
        raise CheckpointError(f"{path}: cannot write the checkpoint ({free}; {_first_line(err)})") from None


class CheckpointWriter:
    """Writes checkpoints one batch at a time in a background thread (rank 0).

    `submit` returns as soon as the thread has started; the next `submit` and `wait` first join the
    previous write and re-raise its error, so writes never overlap or get lost silently. The payloads
    must be CPU copies (make_checkpoint) that nothing changes any more.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, writes: list[tuple[Path, dict[str, Any]]]) -> None:
        self.wait()

        def work() -> None:
            try:
                for path, ckpt in writes:
                    save_checkpoint(path, ckpt)
            except BaseException as err:  # noqa: BLE001 - handed to the training thread in wait()
                self._error = err

        self._thread = threading.Thread(target=work, name="bonehpc-checkpoint", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _check_format(p: Path, state: Any, keys: tuple[str, ...] = REQUIRED_KEYS) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{p}: not a bonehpc checkpoint (top level is {type(state).__name__}, not a dict)")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{p}: not a bonehpc checkpoint (missing {', '.join(missing)})")
    version = state["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format_version {version!r} is not one this bonehpc reads (1..{FORMAT_VERSION})"
        )
    spec = state["model_spec"]
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or not isinstance(spec.get("kwargs", {}), dict)
    ):
        raise CheckpointError(f"{p}: model_spec must be {{'name': str, 'kwargs': dict}}, got {spec!r:.120}")
    if not isinstance(state["model"], dict):
        raise CheckpointError(f"{p}: 'model' is not a state_dict")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint with `weights_only=True`.

    Raises:
        CheckpointError: (one line) the file is missing, truncated/corrupt, holds objects other than
            tensors and plain values, lacks the keys of a bonehpc checkpoint or has another format_version.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = _UNSUPPORTED_GLOBAL.search(str(err))
        what = f"an object of type {found.group(1)}" if found else "objects other than tensors and plain values"
        raise CheckpointError(
            f"{p}: refused by the safe loader (weights_only=True): it holds {what}, not a bonehpc checkpoint"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{p}: corrupt or truncated checkpoint ({_first_line(err)})") from None
    _check_format(p, state)
    return state


def load_training_checkpoint(path: str | Path, fold: int | str, role: str, model_name: str) -> dict[str, Any]:
    """load_checkpoint of a resume point (last.pt): a training payload of this fold/role and model."""
    p = Path(path)
    state = load_checkpoint(p)
    _check_format(p, state, REQUIRED_KEYS + TRAINING_KEYS)
    if str(state.get("role")) != role or str(state.get("fold")) != str(fold):
        raise CheckpointError(f"{p} belongs to {state.get('fold')}/{state.get('role')}, not {fold}/{role}")
    if state["model_spec"]["name"] != model_name:
        raise CheckpointError(f"{p} holds a {state['model_spec']['name']}, the config asks for {model_name}")
    return state


def find_resume(run_dir: str | Path) -> Path | None:
    """`run_dir/last.pt` when it exists (the checkpoint to resume from), else None."""
    p = Path(run_dir) / LAST
    return p if p.is_file() else None


def build_model_from_checkpoint(state: dict[str, Any], **overrides: Any) -> torch.nn.Module:
    """Rebuild the network of a checkpoint with create_model and load its weights (eval mode).

    Only the keyword arguments the model's constructor documents are accepted from the checkpoint's
    model_spec (timm's `checkpoint_path`, `pretrained_cfg`, ... never reach timm from a file).

    Raises:
        CheckpointError: (one line) the spec names an unknown model, has kwargs the constructor does
            not take, or the weights do not fit the network.
    """
    from bonehpc.models import ModelKwargsError, ModelNotFoundError, create_model

    spec = state["model_spec"]
    kwargs = {**dict(spec.get("kwargs") or {}), **overrides}
    kwargs.pop("pretrained", None)
    kwargs.pop("weights", None)
    what = f"checkpoint weights of {spec['name']}"
    try:
        # first without memory (meta device), bounded by the weights the file holds: a spec that asks for a
        # gigantic model is refused before anything is allocated or a million blocks are built
        try:
            with torch.device("meta"), _bounded_build(state["model"], spec):
                skeleton = create_model(spec["name"], pretrained=False, **kwargs)
        except (NotImplementedError, RuntimeError) as err:
            if isinstance(err, CheckpointError):
                raise
            skeleton = None  # a model that cannot be built on the meta device: bounded while it is built below
        problem = weights_fit(unwrap_model(skeleton).state_dict(), state["model"]) if skeleton is not None else ""
        if problem:
            raise CheckpointError(f"{what} do not fit the model: {problem}")
        with _bounded_build(state["model"], spec):
            model = create_model(spec["name"], pretrained=False, **kwargs)
    except (ModelKwargsError, ModelNotFoundError) as err:
        raise CheckpointError(f"checkpoint model_spec: {err}") from None
    except (TypeError, ValueError) as err:  # a value the constructor cannot use (embed_dim: "wide")
        raise CheckpointError(f"checkpoint model_spec: {_first_line(err)}") from None
    load_weights(unwrap_model(model), state["model"], what=what)
    return model.eval()


@contextlib.contextmanager
def _bounded_build(weights: dict[str, Any], spec: dict[str, Any]) -> Iterator[None]:
    """While a model is built from `spec`: CheckpointError as soon as it registers more tensors, elements
    or modules than a network that fits `weights` could (with room for non-persistent buffers)."""
    from torch.nn.modules import module as nn_module

    tensors = [v for v in weights.values() if isinstance(v, torch.Tensor)]
    limits = (2 * len(tensors) + 64, 2 * sum(t.numel() for t in tensors) + (1 << 24), 8 * len(tensors) + 256)
    seen = [0, 0, 0]

    def count(kind: int, numel: int) -> None:  # kind 0: a tensor, 2: a module; seen[1] sums the elements
        seen[kind] += 1
        seen[1] += numel
        if seen[0] > limits[0] or seen[1] > limits[1] or seen[2] > limits[2]:
            raise CheckpointError(
                f"checkpoint model_spec {spec['name']} {spec.get('kwargs')!r:.200} builds a model larger than "
                f"the {len(tensors)} tensors ({sum(t.numel() for t in tensors):,} values) the file holds"
            )

    def on_tensor(_module: Any, _name: str, tensor: Any) -> None:
        if tensor is not None:
            count(0, int(tensor.numel()))

    def on_module(_module: Any, _name: str, _sub: Any) -> None:
        count(2, 0)

    handles = [
        nn_module.register_module_parameter_registration_hook(on_tensor),
        nn_module.register_module_buffer_registration_hook(on_tensor),
        nn_module.register_module_module_registration_hook(on_module),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def weights_fit(own: dict[str, Any], weights: dict[str, Any]) -> str:
    """'' when `weights` fit a model whose state_dict is `own` (same keys and shapes, "module." and
    "_orig_mod." prefixes removed), else the first missing, unexpected and mis-shaped keys in words."""
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shape = [k for k, v in own.items() if k in weights and getattr(weights[k], "shape", None) != v.shape]
    return ", ".join(
        f"{name} {len(keys)} (e.g. {keys[0]})"
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shape))
        if keys
    )


def load_weights(model: torch.nn.Module, weights: dict[str, Any], what: str = "checkpoint weights") -> None:
    """load_state_dict (strict) of a checkpoint's weights, "module." / "_orig_mod." prefixes removed.

    Raises:
        CheckpointError: one line naming the first missing, unexpected and mis-shaped keys.
    """
    problem = weights_fit(model.state_dict(), weights)
    if problem:
        raise CheckpointError(f"{what} do not fit the model: {problem}")
    model.load_state_dict({k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()})
