"""Augmentation presets: what the train and eval transforms do, as named objects shared by both backends.

A preset only describes the transform; `bonehpc.augment.albu` (albumentations, CPU workers) and
`bonehpc.augment.dali` (DALI, GPU or CPU-only) build it. Both apply the same steps in the same order:

1. resize the square shard image (uint8 [S, S]) to ``image_size`` with bilinear interpolation,
2. (train) horizontal flip with probability ``hflip_p``,
3. (train) rotation by an angle drawn uniformly from [-rotate_deg, rotate_deg] about the centre,
   output size kept, uncovered corners filled with 0,
4. replicate the gray channel to 3 channels,
5. normalise each channel: ``(x / 255 - mean[c]) / std[c]``.

Why 3 channels: the teacher (ResNet-50) and most students start from ImageNet weights whose stem takes
RGB. Replicating gray keeps those stems unchanged (no summed or re-initialised first convolution), and
the copy costs nothing on the GPU compared with the network. It also makes ``A.Normalize`` with 3-value
statistics correct: on a 1-channel image albumentations silently uses only the channel-0 values.

Why bilinear without antialiasing: the packer already shrinks the originals to ``pack_size`` with an
area filter, so the loader resize is a mild step (default 256 -> 224). For that step OpenCV's
INTER_LINEAR and DALI's INTERP_LINEAR without antialias agree to one gray level (measured), which keeps
the two backends interchangeable. `build_preset` warns when ``pack_size > 2 * image_size``, where
aliasing would start to matter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bonehpc.config import ExperimentConfig

log = logging.getLogger(__name__)

# Beyond this shrink factor (pack_size / image_size) plain bilinear resizing aliases visibly.
MAX_PLAIN_SHRINK = 2.0


@dataclass(frozen=True)
class Preset:
    """One deterministic-or-random transform from a uint8 [S, S] image to a float [3, H, W] tensor.

    Attributes:
        name: ``train`` or ``eval``.
        image_size: side of the square output.
        hflip_p: probability of a horizontal flip.
        rotate_deg: rotation angles are drawn from [-rotate_deg, rotate_deg] (degrees).
        mean: per-channel mean on the 0..1 scale.
        std: per-channel standard deviation on the 0..1 scale.
    """

    name: str
    image_size: int
    hflip_p: float
    rotate_deg: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"preset {self.name}: image_size must be > 0, got {self.image_size}")
        if not 0 <= self.hflip_p <= 1:
            raise ValueError(f"preset {self.name}: hflip_p must be in [0, 1], got {self.hflip_p}")
        if not 0 <= self.rotate_deg <= 180:
            raise ValueError(f"preset {self.name}: rotate_deg must be in [0, 180], got {self.rotate_deg}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"preset {self.name}: need 3 means and 3 positive stds, got {self.mean}, {self.std}")

    @property
    def is_random(self) -> bool:
        """Whether the transform draws random numbers (flip or rotation enabled)."""
        return self.hflip_p > 0 or self.rotate_deg > 0

    @property
    def mean_255(self) -> list[float]:
        """Mean on the 0..255 scale (DALI normalises raw uint8 values)."""
        return [m * 255.0 for m in self.mean]

    @property
    def std_255(self) -> list[float]:
        """Standard deviation on the 0..255 scale."""
        return [s * 255.0 for s in self.std]


@dataclass(frozen=True)
class TrainPreset(Preset):
    """Resize, random horizontal flip, random rotation, gray -> 3 channels, normalise."""

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> TrainPreset:
        """The training preset of a config (data.image_size and the augment section)."""
        a = cfg.augment
        return cls(
            name="train",
            image_size=cfg.data.image_size,
            hflip_p=a.hflip_p,
            rotate_deg=a.rotate_deg,
            mean=tuple(a.mean),  # type: ignore[arg-type]
            std=tuple(a.std),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class EvalPreset(Preset):
    """Resize, gray -> 3 channels, normalise (no randomness)."""

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> EvalPreset:
        """The evaluation preset of a config (same size and statistics as training, no random ops)."""
        a = cfg.augment
        return cls(
            name="eval",
            image_size=cfg.data.image_size,
            hflip_p=0.0,
            rotate_deg=0.0,
            mean=tuple(a.mean),  # type: ignore[arg-type]
            std=tuple(a.std),  # type: ignore[arg-type]
        )


def build_preset(cfg: ExperimentConfig, train: bool) -> Preset:
    """The train or eval preset of a config.

    Args:
        cfg: experiment config (uses data.image_size, data.pack_size and augment.*).
        train: True for the training preset, False for evaluation.

    Returns:
        A TrainPreset or an EvalPreset.
    """
    if cfg.data.pack_size > MAX_PLAIN_SHRINK * cfg.data.image_size:
        log.warning(
            "data.pack_size=%d is more than %.0fx data.image_size=%d: bilinear resizing will alias; "
            "pack closer to the input size",
            cfg.data.pack_size,
            MAX_PLAIN_SHRINK,
            cfg.data.image_size,
        )
    return TrainPreset.from_config(cfg) if train else EvalPreset.from_config(cfg)
