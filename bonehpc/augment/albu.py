"""albumentations implementation of the presets (runs on the CPU, in torch DataLoader workers)."""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from bonehpc.augment.presets import Preset


def build_albu_transform(preset: Preset, seed: int | None = None) -> A.Compose:
    """An ``A.Compose`` for a preset: uint8 [S, S] (or [S, S, 1]) -> float32 tensor [3, H, W].

    Args:
        preset: what to do (see `bonehpc.augment.presets`).
        seed: seed of the Compose's own random state (albumentations ignores numpy's global seed).
            Reseed per sample with ``transform.set_random_seed(...)`` for worker-independent results.

    Returns:
        The transform; call it as ``transform(image=img)["image"]``.
    """
    size = preset.image_size
    ops: list[Any] = [A.Resize(size, size, interpolation=cv2.INTER_LINEAR)]
    if preset.hflip_p > 0:
        ops.append(A.HorizontalFlip(p=preset.hflip_p))
    if preset.rotate_deg > 0:
        # A.Rotate defaults to p=0.5 and +-90 degrees: both set explicitly.
        ops.append(
            A.Rotate(
                limit=(-preset.rotate_deg, preset.rotate_deg),
                interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=1.0,
            )
        )
    ops += [
        # Before Normalize: with 3-value statistics on 1 channel it would use channel 0's values only.
        A.ToRGB(num_output_channels=3),
        A.Normalize(mean=preset.mean, std=preset.std, max_pixel_value=255.0),
        ToTensorV2(),
    ]
    return A.Compose(ops, seed=seed)


def apply_albu(transform: A.Compose, image: np.ndarray) -> torch.Tensor:
    """Run a preset transform on one shard image (uint8 [S, S]); returns float32 [3, H, W]."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a uint8 [S, S] gray image, got {image.dtype} {image.shape}")
    out: torch.Tensor = transform(image=image)["image"]
    return out
