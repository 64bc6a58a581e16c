"""ONNX export of a trained bonehpc checkpoint (any bonehpc or timm model) with a PyTorch-vs-onnxruntime parity check.

The exported graph takes ``images`` float32 [B, 3, H, W] (B dynamic; H = W = the checkpoint's
data.image_size, already letterboxed, resized and normalised as in `bonehpc.predict`) and returns
``logits`` [B, 2]; the abnormal probability is ``softmax(logits)[:, 1]``.

Opset: torch 2.14's exporter (``dynamo=True``, the only exporter left) implements opset 18 and newer;
asking it for 17 makes it export 18 and then try a down-conversion that fails for these models
(measured), so the default here is 18.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bonehpc.checkpoint import build_model_from_checkpoint, load_checkpoint
from bonehpc.fsio import atomic_write_json, load_json_bounded, tmp_name_for
from bonehpc.paths import BEST_CKPT, LAST_CKPT

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
PARITY_ATOL = 1e-4


class ExportError(RuntimeError):
    """The export or its parity check failed; the message says which and by how much."""


def _image_size(state: dict[str, Any]) -> int:
    cfg = state.get("config") or {}
    size = (cfg.get("data") or {}).get("image_size")
    if not isinstance(size, int) or size <= 0:
        raise ExportError("checkpoint config has no data.image_size; cannot choose the export input size")
    return size


def resolve_checkpoint(model: str | Path) -> Path:
    """The checkpoint to export: `model` itself, or the best.pt of a run folder.

    Raises:
        ExportError: a folder without best.pt (names the file to pass instead: last.pt, or a run's best.pt).
    """
    m = Path(model)
    if not m.is_dir():
        return m  # load_checkpoint says "not found" for a missing file
    if (m / BEST_CKPT).is_file():
        return m / BEST_CKPT
    if (m / LAST_CKPT).is_file():
        raise ExportError(
            f"{m} has no {BEST_CKPT} (the run has not finished); pass --model {m / LAST_CKPT} to export it"
        )
    runs = sorted(m.glob(f"*/*/{BEST_CKPT}"))[:3]
    hint = f"; e.g. --model {runs[0]}" if runs else ""
    raise ExportError(f"{m} is a folder without {BEST_CKPT}: pass a checkpoint file or a run folder{hint}")


def _check_out(out: Path) -> None:
    """Refuse an output that is a folder, an existing file bonehpc export did not write, or not writable."""
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give the path of an .onnx file")
    info = Path(f"{out}.json")
    if out.exists():
        try:
            ours = load_json_bounded(info).get("path") == str(out)
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ExportError(f"{out} exists and was not written by bonehpc export; it is left alone")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: cannot write in {folder}")


def export_onnx(
    checkpoint: str | Path,
    out_path: str | Path,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    atol: float = PARITY_ATOL,
) -> dict[str, Any]:
    """Export a checkpoint's model to ONNX with a dynamic batch axis, then check it against PyTorch.

    Args:
        checkpoint: a bonehpc checkpoint (best.pt / last.pt), or a run folder (its best.pt).
        out_path: where to write the .onnx file; it appears there only once the parity check passed.
        opset: ONNX opset version (>= 18, see the module docstring).
        check: run `check_parity` on batches of 1 and 3 random images.
        atol: largest allowed absolute logit difference in the parity check.

    Returns:
        {"path", "opset", "image_size", "model", "max_abs_diff" (when checked)}; also written as
        ``<out_path>.json``.

    Raises:
        ExportError: bad --model / --out, export failed or the parity check exceeded atol (nothing is left
            at out_path then).
    """
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out_path)
    _check_out(out)
    state = load_checkpoint(ckpt)
    model = build_model_from_checkpoint(state).float().eval()
    size = _image_size(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name_for(out)
    try:
        _export(model, size, tmp, opset, ckpt)
        info: dict[str, Any] = {
            "path": str(out),
            "opset": opset,
            "image_size": size,
            "model": state["model_spec"]["name"],
            "checkpoint": str(ckpt),
        }
        if check:
            info["max_abs_diff"] = check_parity(model, tmp, size, atol=atol)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(f"{out}.json", info)
    log.info("exported %s -> %s (%s)", ckpt, out, info)
    return info


def _export(model: torch.nn.Module, size: int, dest: Path, opset: int, ckpt: Path) -> None:
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter's helpers log every graph pass at INFO; keep the caller's log readable.
    quiet = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        torch.onnx.export(
            model,
            (example,),
            str(dest),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    except Exception as err:
        raise ExportError(f"ONNX export of {ckpt} failed: {type(err).__name__}: {err}") from err
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)


def check_parity(
    model: torch.nn.Module,
    onnx_path: str | Path,
    image_size: int,
    batch_sizes: tuple[int, ...] = (1, 3),
    atol: float = PARITY_ATOL,
    seed: int = 0,
) -> float:
    """Largest |logit difference| between PyTorch and onnxruntime (CPU) over random batches.

    Raises:
        ExportError: the difference exceeds atol, or the ONNX output has the wrong shape.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batch_sizes:
        x = torch.randn(b, 3, image_size, image_size, generator=gen)
        with torch.no_grad():
            ref = model(x).float().numpy()
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ExportError(f"{onnx_path}: batch {b}: ONNX output shape {got.shape} != PyTorch {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    if worst > atol:
        raise ExportError(f"{onnx_path}: ONNX and PyTorch logits differ by {worst:.3g} > {atol:g}")
    return worst
