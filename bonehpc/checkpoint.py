"""Self-describing training checkpoints: atomic save, `weights_only=True` load, RNG capture, auto-resume.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that
`torch.load(weights_only=True)` (no arbitrary unpickling) reads it:

    format_version  int
    model_spec      {"name": str, "kwargs": dict}  - enough to rebuild the network with create_model
    model           state_dict of the unwrapped model (no "module." / "_orig_mod." prefixes)
    optimizer, scheduler, scaler   their state_dicts (or None)
    epoch           int, epochs completed
    step            int, optimizer steps done
    best_metric, best_epoch        the early-stopping metric and where it peaked
    config          the resolved experiment config as a plain dict
    rng             {"torch", "cuda", "numpy", "python"} generator states (tensors / lists)
    fold, role      which run it belongs to
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
REQUIRED_KEYS = ("format_version", "model_spec", "model")


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


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically: a temporary file in the same folder, fsync, os.replace.

    A reader never sees a half-written file; a failure leaves the previous file (if any) untouched
    and no temporary file behind.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint state lacks {', '.join(missing)}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename is durable only once the directory entry is on disk.
    try:
        dfd = os.open(p.parent, os.O_RDONLY)
    except OSError:
        return p
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint with `weights_only=True`.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, holds non-plain objects or lacks
            the keys of a bonehpc checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{p}: not loadable with weights_only=True (foreign objects inside?): {err}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{p}: corrupt or truncated checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{p}: not a bonehpc checkpoint (top level is {type(state).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{p}: not a bonehpc checkpoint (missing {', '.join(missing)})")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format {state['format_version']} is newer than this bonehpc ({FORMAT_VERSION})"
        )
    return state


def find_resume(run_dir: str | Path) -> Path | None:
    """`run_dir/last.pt` when it exists (the checkpoint to resume from), else None."""
    p = Path(run_dir) / LAST
    return p if p.is_file() else None


def build_model_from_checkpoint(state: dict[str, Any], **overrides: Any) -> torch.nn.Module:
    """Rebuild the network of a checkpoint with create_model and load its weights (eval mode)."""
    from bonehpc.models import create_model

    spec = state["model_spec"]
    kwargs = {**spec.get("kwargs", {}), **overrides}
    kwargs.pop("pretrained", None)
    kwargs.pop("weights", None)
    model = create_model(spec["name"], pretrained=False, **kwargs)
    unwrap_model(model).load_state_dict(state["model"])
    return model.eval()
