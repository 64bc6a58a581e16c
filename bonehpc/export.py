"""ONNX export of a trained bonehpc checkpoint (any bonehpc or timm model) with a PyTorch-vs-onnxruntime parity check.

The exported graph takes ``images`` float32 [B, 3, H, W] (B dynamic; H = W = the checkpoint's
data.image_size, already letterboxed, resized and normalised as in `bonehpc.predict`) and returns
``logits`` [B, 2]; the abnormal probability is ``softmax(logits)[:, 1]``.

Opset: torch 2.14's exporter (``dynamo=True``, the only exporter left) implements opset 18 and newer;
asking it for 17 makes it export 18 and then try a down-conversion that fails for these models
(measured), so the default here is 18.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bonehpc.checkpoint import build_model_from_checkpoint, load_checkpoint

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


def export_onnx(
    checkpoint: str | Path,
    out_path: str | Path,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    atol: float = PARITY_ATOL,
) -> dict[str, Any]:
    """Export a checkpoint's model to ONNX with a dynamic batch axis, then check it against PyTorch.

    Args:
        checkpoint: a bonehpc checkpoint (best.pt / last.pt).
        out_path: where to write the .onnx file (written next to it under a temporary name first).
        opset: ONNX opset version (>= 18, see the module docstring).
        check: run `check_parity` on batches of 1 and 3 random images.
        atol: largest allowed absolute logit difference in the parity check.

    Returns:
        {"path", "opset", "image_size", "model", "max_abs_diff" (when checked)}; also written as
        ``<out_path>.json``.

    Raises:
        ExportError: export failed or the parity check exceeded atol.
    """
    state = load_checkpoint(checkpoint)
    model = build_model_from_checkpoint(state).float().eval()
    size = _image_size(state)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
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
            str(tmp),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export of {checkpoint} failed: {type(err).__name__}: {err}") from err
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    tmp.replace(out)
    info: dict[str, Any] = {
        "path": str(out),
        "opset": opset,
        "image_size": size,
        "model": state["model_spec"]["name"],
        "checkpoint": str(checkpoint),
    }
    if check:
        info["max_abs_diff"] = check_parity(model, out, size, atol=atol)
    Path(f"{out}.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("exported %s -> %s (%s)", checkpoint, out, info)
    return info


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
