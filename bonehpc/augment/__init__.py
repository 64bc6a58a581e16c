"""Augmentation presets (train / eval) and their albumentations (CPU) and DALI (GPU or CPU-only) builders.

Only the backend-free presets are imported here; `bonehpc.augment.albu` and `bonehpc.augment.dali`
are imported by the loader that needs them (DALI lazily).
"""

from bonehpc.augment.presets import EvalPreset, Preset, TrainPreset, build_preset

__all__ = ["EvalPreset", "Preset", "TrainPreset", "build_preset"]
