"""Size and cost of a model: parameters, forward GFLOPs per image, optionally measured inference img/s.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one forward pass of one image: it counts
2 FLOPs per multiply-accumulate of matrix multiplies, convolutions and attention, and nothing for elementwise
ops, norms, activations and pooling (so GFLOPs ~= 2 x GMACs; timm's tables quote GMACs, half of this number).
Attention is forced to the math kernel while counting because the fused CPU kernel is not in the counter's
table and would count as zero.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _input_channels(model: nn.Module) -> int:
    size = getattr(model, "input_size", None)
    return int(size[0]) if size else 3


@torch.no_grad()
def count_gflops(model: nn.Module, input_size: int = 224) -> float:
    """Forward GFLOPs (torch's count: 2 per MAC) for one image of input_size x input_size, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros(1, _input_channels(model), input_size, input_size, device=device)
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter:
            model(x)
        return counter.get_total_flops() / 1e9
    finally:
        model.train(was_training)


@torch.inference_mode()
def measure_throughput(
    model: nn.Module,
    input_size: int = 224,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    steps: int = 5,
    warmup: int = 2,
    channels_last: bool = False,
) -> float:
    """Inference images per second: mean over `steps` timed forward passes after `warmup` untimed ones.

    A copy of the model is moved to `device`, so the caller's model is untouched.
    """
    dev = torch.device(device)
    net = copy.deepcopy(model).to(dev).eval()
    x = torch.randn(batch_size, _input_channels(model), input_size, input_size, device=dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.no_grad():  # inference: no autograd graph, as a deployed model runs
        for _ in range(warmup):
            net(x)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            net(x)
        sync()
    return batch_size * steps / (time.perf_counter() - start)


def model_info(
    model: nn.Module,
    input_size: int = 224,
    measure: bool = False,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    steps: int = 5,
    warmup: int = 2,
) -> dict[str, Any]:
    """``{"params", "gflops"}`` and, with measure, ``"infer_img_per_s"`` (see `measure_throughput`).

    Args:
        model: Any module taking [B, C, H, W] images (C from ``model.input_size``, else 3).
        input_size: Side of the square input for the FLOP count and the timing.
        measure: Also time inference.
        batch_size: Images per timed forward pass.
        device: Where to time.
        steps: Timed forward passes.
        warmup: Untimed forward passes first.
    """
    info: dict[str, Any] = {
        "params": count_params(model),
        "gflops": round(count_gflops(model, input_size), 4),
        "input_size": input_size,
    }
    if measure:
        info["infer_img_per_s"] = measure_throughput(model, input_size, batch_size, device, steps, warmup)
    return info
