"""`submit pack` plans under the packer's own lock and refuses a folder that is not a shard folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinyexp import tiny_overrides

from bonehpc import slurm
from bonehpc.config import load_config
from bonehpc.data.pack import PackInputError, pack_lock
from jobs.submit import submit_pack


def _cfg(tmp_path: Path, synth_root: Path, out: Path):
    over = tiny_overrides(tmp_path / "runs", synth_root, out, "cluster.mode=slurm", "cluster.profile=dev")
    return load_config(None, over)


def test_submit_pack_refuses_while_a_local_pack_holds_the_folder(tmp_path, synth_root) -> None:
    out = tmp_path / "shards"
    out.mkdir()
    with pack_lock(out), slurm.dry_run(), pytest.raises(PackInputError, match=r"is being packed by host .* pid"):
        submit_pack(_cfg(tmp_path, synth_root, out))
    assert not (out / ".pack" / "plan.json").exists()


def test_submit_pack_leaves_a_foreign_folder_untouched(tmp_path, synth_root) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    with slurm.dry_run(), pytest.raises(PackInputError, match="not a bonehpc shard folder"):
        submit_pack(_cfg(tmp_path, synth_root, out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
