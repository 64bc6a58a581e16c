"""The tiny experiment of the tests, shared by conftest and module-scoped fixtures (`from tinyexp import ...`)."""

from __future__ import annotations

from pathlib import Path

# The tiny experiment of the tests: 64 px, resnet18 teacher, hybrid_tiny student, 1 epoch, 2 folds, in-process.
# Module- and session-scoped fixtures build their own configs from the same list (tiny_overrides).
TINY_OVERRIDES = (
    "name=tiny",
    "data.num_folds=2",
    "data.image_size=64",
    "data.pack_size=64",
    "data.num_workers=0",
    "data.backend=torch",
    "teacher.model=resnet18",
    "teacher.epochs=1",
    "student.model=hybrid_tiny",
    "student.epochs=1",
    "train.batch_size=16",
    "train.log_every=5",
    "cluster.mode=debug",
)


def tiny_overrides(run_root: Path, synth_root: Path, shards_dir: Path, *extra: str) -> list[str]:
    """TINY_OVERRIDES with the data and run folders (later overrides win: pass name=..., cluster.mode=...)."""
    return [
        *TINY_OVERRIDES,
        f"run_root={run_root}",
        f"data.mura_root={synth_root}",
        f"data.shards={shards_dir}",
        *extra,
    ]
