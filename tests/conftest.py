"""Shared fixtures: a small synthetic MURA tree, its manifest and packed shards (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tinyexp import tiny_overrides

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Small enough for a 2-core CI machine, large enough for 3 folds with both labels in every fold.
SYNTH_PATIENTS = 36
SYNTH_SEED = 7
SYNTH_MAX_SIDE = 160


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding MURA-v1.1/ with the four official CSVs (synthetic, deterministic)."""
    from bonehpc.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, patients=SYNTH_PATIENTS, seed=SYNTH_SEED, max_side=SYNTH_MAX_SIDE)
    return out


@pytest.fixture(scope="session")
def manifest(synth_root: Path):
    from bonehpc.data.mura import build_manifest

    return build_manifest(synth_root)


@pytest.fixture(scope="session")
def shards_dir(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic set packed at 64 px (fast to read and train on)."""
    from bonehpc.data.pack import pack_dataset

    out = tmp_path_factory.mktemp("shards")
    pack_dataset(synth_root, out, pack_size=64, images_per_shard=64, workers=1)
    return out


@pytest.fixture
def tiny_cfg(tmp_path: Path, synth_root: Path, shards_dir: Path):
    """An ExperimentConfig that trains in seconds on the CPU: 64 px, tiny models, 1 epoch, 2 folds."""
    from bonehpc.config import load_config

    return load_config(None, tiny_overrides(tmp_path / "runs", synth_root, shards_dir))
