"""Packer: pixel conversions, letterbox geometry, bad inputs, reject limit, resume after a kill, CLI, benchmarks."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bonehpc.cli import main as cli_main
from bonehpc.data import pack as pack_module
from bonehpc.data.images import RejectedImageError, fit_square, letterbox_geometry, read_gray8
from bonehpc.data.mura import ManifestError, build_manifest, write_manifest
from bonehpc.data.pack import (
    PackError,
    PackInputError,
    _open_out,
    finalize_pack,
    load_plan,
    pack_dataset,
    pack_lock,
    pack_shard,
    plan_pack,
)
from bonehpc.data.shards import ShardError, ShardReader, ShardWriter, verify_shards
from bonehpc.data.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
MIN_SIDE = 16


# ----------------------------------------------------------------------------------------------
# One image


def test_letterbox_geometry_and_padding() -> None:
    assert letterbox_geometry(100, 300, 64) == (21, 64, 21, 0)
    assert letterbox_geometry(300, 100, 64) == (64, 21, 0, 21)
    assert letterbox_geometry(50, 50, 64) == (64, 64, 0, 0)
    wide = np.full((100, 300), 200, np.uint8)
    out = fit_square(wide, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert (out[:21] == 0).all() and (out[42:] == 0).all()  # padding above and below
    assert (out[21:42] == 200).all()  # content keeps its value (INTER_AREA of a flat image)
    stretched = fit_square(wide, 64, "stretch")
    assert (stretched == 200).all()
    with pytest.raises(ValueError, match="fit must be"):
        fit_square(wide, 64, "crop")


def test_rgb_palette_alpha_and_16bit_conversion(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    luma = 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R BT.601, what a gray conversion must give
    got = read_gray8(tmp_path / "rgb.png")
    assert got.shape == (40, 50) and np.abs(got - luma).max() <= 1.0

    Image.fromarray(rgb, "RGB").convert("RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_gray8(tmp_path / "rgba.png"), got)

    gray = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    Image.fromarray(gray, "L").convert("P").save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_gray8(tmp_path / "palette.png"), gray)
    Image.fromarray(np.stack([gray, np.full_like(gray, 9)], -1), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_gray8(tmp_path / "la.png"), gray)

    # 16 bit: scaled to 0..255 (x / 257), not truncated to the low or high byte.
    g16 = np.array([[0, 1000, 32896, 65535], [257, 128, 60000, 40000]], np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), g16)
    want = np.round(g16 / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(read_gray8(tmp_path / "g16.png"), want)
    assert read_gray8(tmp_path / "g16.png")[0, 1] == 4  # 1000 -> 4 (low byte 232, high byte 3)
    rgb16 = np.dstack([g16, g16, g16])
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16)
    assert np.abs(read_gray8(tmp_path / "rgb16.png").astype(int) - want).max() <= 1


# ----------------------------------------------------------------------------------------------
# Bad input


def _png(path: Path, h: int, w: int) -> None:
    cv2.imwrite(str(path), np.full((h, w), 120, np.uint8))


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, pd.DataFrame, dict[str, str], str]:
    """A small synthetic set with one image of each bad kind and one study whose images are all bad."""
    root = tmp_path / "synth"
    generate(root, patients=10, seed=3, max_side=96)
    manifest = build_manifest(root)
    by_study = manifest.groupby("study")["path"].apply(list)
    lost_study = by_study[by_study.map(len) >= 2].index[0]
    others = manifest.loc[manifest["study"] != lost_study, "path"].tolist()
    want: dict[str, str] = {}

    def at(i: int) -> Path:
        return root / others[i]

    data = at(0).read_bytes()
    at(0).write_bytes(data[: len(data) // 2])
    want[others[0]] = "truncated"
    at(1).write_bytes(b"")
    want[others[1]] = "empty"
    at(2).write_text("this is not an image\n")
    want[others[2]] = "not_an_image"
    at(3).unlink()
    at(3).mkdir()  # tests run as root, so a directory stands in for a file that cannot be read
    want[others[3]] = "unreadable"
    _png(at(4), 10, 90)  # below MIN_SIDE (the synthetic images here have sides >= 28)
    want[others[4]] = "too_small"
    at(5).unlink()
    want[others[5]] = "missing"
    good = at(6).read_bytes()
    at(6).write_bytes(good[:8] + b"\x00" * 64 + good[-12:])  # PNG signature and end chunk, garbage between
    want[others[6]] = "corrupt"
    for p in by_study[lost_study]:
        (root / p).write_bytes(b"")
        want[p] = "empty"
    return root, manifest, want, lost_study


def test_every_bad_input_is_rejected_with_its_reason(damaged, tmp_path: Path) -> None:
    root, manifest, want, lost_study = damaged
    out = tmp_path / "out"
    summary = pack_dataset(
        root, out, manifest=manifest, pack_size=32, images_per_shard=16, max_reject_frac=1.0, min_side=MIN_SIDE
    )
    rejected = pd.read_csv(out / "rejected.csv")
    assert dict(zip(rejected["path"], rejected["reason"], strict=True)) == want
    assert set(rejected.columns) >= {"path", "study", "reason", "detail"}
    assert summary.n_rejected == len(want) and summary.n_packed == len(manifest) - len(want)
    assert summary.rejected_by_reason["empty"] >= 2 and summary.rejected_by_reason["missing"] == 1
    all_bad = manifest.assign(bad=manifest["path"].isin(want)).groupby("study", sort=False)["bad"].all()
    assert lost_study in summary.lost_studies
    assert summary.lost_studies == all_bad[all_bad].index.tolist()  # incl. one-image studies hit above
    lost = pd.read_csv(out / "lost_studies.csv").set_index("study")
    assert lost.index.tolist() == summary.lost_studies
    assert lost.loc[lost_study, "reasons"] == f"empty={lost.loc[lost_study, 'n_images']}"
    reader = ShardReader(out)
    assert set(reader.index["path"]).isdisjoint(want)
    assert len(reader) == summary.n_packed
    verify_shards(out, full=True)


def test_too_many_rejects_fail_loudly_but_keep_the_list(damaged, tmp_path: Path, capsys) -> None:
    root, manifest, want, _ = damaged
    out = tmp_path / "out"
    with pytest.raises(PackError, match=r"images rejected .* max_reject_frac") as err:
        pack_dataset(
            root, out, manifest=manifest, pack_size=32, images_per_shard=16, max_reject_frac=0.01, min_side=MIN_SIDE
        )
    assert err.value.counts["truncated"] == 1
    assert len(pd.read_csv(out / "rejected.csv")) == len(want)
    assert not (out / "manifest.json").exists()  # failed packs are not readable data sets
    with pytest.raises(ShardError, match="manifest.json: missing"):
        verify_shards(out)
    # The CLI: exit code 1 and the reason counts on stderr (the manifest CSV stands in for the missing file).
    write_manifest(manifest, tmp_path / "manifest.csv")
    rc = cli_main(
        ["pack", "--mura-root", str(root), "--out", str(out), "--manifest", str(tmp_path / "manifest.csv"),
         "--pack-size", "32", "--max-reject-frac", "0.01", "--min-side", str(MIN_SIDE), "--quiet"]
    )  # fmt: skip
    assert rc == 1
    assert "FAILED" in capsys.readouterr().err
    # Raising the limit finishes the same folder without repacking anything.
    rc = cli_main(
        ["pack", "--mura-root", str(root), "--out", str(out), "--manifest", str(tmp_path / "manifest.csv"),
         "--pack-size", "32", "--max-reject-frac", "0.5", "--min-side", str(MIN_SIDE), "--quiet"]
    )  # fmt: skip
    assert rc == 0 and "0 written" in capsys.readouterr().out


def test_read_gray8_reasons(tmp_path: Path) -> None:
    with pytest.raises(RejectedImageError) as err:
        read_gray8(tmp_path / "absent.png")
    assert err.value.reason == "missing"
    _png(tmp_path / "ok.png", 40, 33)
    assert read_gray8(tmp_path / "ok.png", min_side=33).shape == (40, 33)
    with pytest.raises(RejectedImageError, match="too_small"):
        read_gray8(tmp_path / "ok.png", min_side=34)


# ----------------------------------------------------------------------------------------------
# Resume, staleness, the array-job path, parallel workers


KILL_SCRIPT = """
import os, signal, sys
from bonehpc.data import shards
from bonehpc.data.pack import pack_dataset

add = shards.ShardWriter.add
def add_then_die(self, image, meta):
    if self.path.name == "shard-00002.h5" and len(self) == 3:
        os.kill(os.getpid(), signal.SIGKILL)   # a real kill in the middle of a shard
    return add(self, image, meta)
shards.ShardWriter.add = add_then_die
pack_dataset(sys.argv[1], sys.argv[2], pack_size=32, images_per_shard=16, workers=1)
"""


def test_resume_after_a_killed_pack(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(synth_root), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "shard-00000.h5" in names and "shard-00001.h5" in names
    assert "shard-00002.h5" not in names and "manifest.json" not in names
    # the half-written shard, under a temporary name
    assert any(n.startswith(".shard-00002.h5.") and n.endswith(".tmp") for n in names)
    with pytest.raises(ShardError):
        verify_shards(out)
    before = {n: (out / n).stat() for n in ("shard-00000.h5", "shard-00001.h5")}

    summary = pack_dataset(synth_root, out, pack_size=32, images_per_shard=16, workers=1)
    assert summary.shards_skipped == 2 and summary.shards_written == summary.n_shards - 2
    for n, st in before.items():
        now = (out / n).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{n} was rewritten"
    assert not list(out.glob(".shard-*tmp*"))
    verify_shards(out, full=True)

    # A damaged complete shard and changed settings are both redone.
    with open(out / "shard-00001.h5", "r+b") as fh:
        fh.seek(-1000, os.SEEK_END)
        fh.write(b"\x55" * 8)
    again = pack_dataset(synth_root, out, pack_size=32, images_per_shard=16, workers=1)
    assert again.shards_written == 1
    assert (out / "shard-00000.h5").stat().st_ino == before["shard-00000.h5"].st_ino
    verify_shards(out, full=True)
    restyled = pack_dataset(
        synth_root, out, pack_size=32, fit="stretch", images_per_shard=16, workers=1, overwrite=True
    )
    assert restyled.shards_skipped == 0
    assert ShardReader(out).info["fit"] == "stretch"


def test_plan_is_deterministic_and_shards_can_run_separately(synth_root: Path, tmp_path: Path) -> None:
    a = plan_pack(synth_root, tmp_path / "a", pack_size=32, images_per_shard=40)
    b = plan_pack(synth_root, tmp_path / "b", pack_size=32, images_per_shard=40)
    assert [s.key for s in a.shards] == [s.key for s in b.shards] and len(a.shards) >= 3
    assert plan_pack(synth_root, tmp_path / "c", pack_size=48, images_per_shard=40).shards[0].key != a.shards[0].key
    plan = load_plan(tmp_path / "a")  # what an array task does
    for k in range(len(plan.shards) - 1):
        pack_shard(plan, k)
    with pytest.raises(PackError, match=plan.shards[-1].name):
        finalize_pack(plan)
    pack_shard(plan, len(plan.shards) - 1)
    summary = finalize_pack(plan)
    assert summary.n_packed == len(plan.manifest)
    verify_shards(tmp_path / "a", full=True)


def test_two_workers_give_the_same_shards(synth_root: Path, shards_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "par"
    pack_dataset(synth_root, out, pack_size=64, images_per_shard=30, workers=2, compression="lzf")
    one, two = ShardReader(shards_dir), ShardReader(out)
    assert two.info["compression"] == "lzf" and len(two.shard_names) > len(one.shard_names)
    assert sorted(one.image_ids) == sorted(two.image_ids)
    for i in one.image_ids:
        np.testing.assert_array_equal(one.read(int(i)), two.read(int(i)))


def test_cli_pack_from_config(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cfgshards"
    rc = cli_main(
        ["pack", f"data.mura_root={synth_root}", f"data.shards={out}", "data.pack_size=32",
         "data.images_per_shard=100", "data.num_workers=0", "--quiet"]
    )  # fmt: skip
    assert rc == 0
    reader = ShardReader(out)
    assert reader.pack_size == 32 and len(reader.shard_names) == 2
    assert cli_main(["pack"]) == 2


def test_missing_file_from_the_csvs_is_rejected_not_fatal(tmp_path: Path) -> None:
    # Without a manifest argument the packer builds one itself; a file the CSVs list but the disk lacks ends in
    # rejected.csv with reason "missing" while every other image is packed.
    root = tmp_path / "mura"
    generate(root, patients=8, seed=3, max_side=64)
    gone = build_manifest(root)["path"].iloc[2]
    (root / gone).unlink()
    summary = pack_dataset(root, tmp_path / "shards", pack_size=32, max_reject_frac=0.5, min_side=MIN_SIDE)
    rejected = pd.read_csv(tmp_path / "shards" / "rejected.csv")
    assert rejected["path"].tolist() == [gone] and rejected["reason"].tolist() == ["missing"]
    assert summary.n_packed == summary.n_planned - 1


# ----------------------------------------------------------------------------------------------
# Integrity: only its own files, one pack at a time, hostile files, full disks (issue 13, section 2)


@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    root = tmp_path / "mura"
    generate(root, patients=6, seed=5, max_side=64)
    return root


def _pack(root: Path, out: Path, **kw) -> object:
    return pack_dataset(root, out, pack_size=32, images_per_shard=8, min_side=MIN_SIDE, **kw)


def test_out_folder_of_other_files_is_refused_and_untouched(small_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    (out / "shard-notes.txt").write_text("also precious")
    with pytest.raises(PackInputError, match="not a bonehpc shard folder.*thesis.tex"):
        _pack(small_root, out)
    assert sorted(p.name for p in out.iterdir()) == ["shard-notes.txt", "thesis.tex"]
    # A real shard folder with a stray file of the user: re-packing keeps the user's file.
    shards = tmp_path / "shards"
    _pack(small_root, shards)
    (shards / "NOTES.md").write_text("mine")
    (shards / "shard-00099.h5").write_bytes(b"stale shard of an older, larger pack")
    _pack(small_root, shards, max_reject_frac=1.0)
    assert (shards / "NOTES.md").read_text() == "mine" and not (shards / "shard-00099.h5").exists()
    with pytest.raises(PackInputError, match="is a file"):
        _pack(small_root, shards / "NOTES.md")


def test_second_pack_into_the_same_folder_is_refused_naming_the_holder(small_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    holder = rf"being packed by host \S+ pid {os.getpid()}"
    with pack_lock(_open_out(out)), pytest.raises(PackInputError, match=holder):
        _pack(small_root, out)
    _pack(small_root, out)  # released: the next pack runs
    verify_shards(out, full=True)


def test_fifo_device_and_symlinks_out_of_the_root_are_rejected_without_reading(tmp_path: Path) -> None:
    root = tmp_path / "mura"
    generate(root, patients=6, seed=5, max_side=64)
    paths = build_manifest(root)["path"].tolist()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET-BYTES " * 10)
    os.unlink(root / paths[0])
    os.mkfifo(root / paths[0])  # a FIFO nobody writes to: reading it would hang
    os.unlink(root / paths[1])
    os.symlink(secret, root / paths[1])  # leaves the root
    os.unlink(root / paths[2])
    os.symlink("/dev/zero", root / paths[2])  # a device: an unbounded read
    inside = root / "MURA-v1.1" / "copy.png"
    inside.write_bytes((root / paths[4]).read_bytes())
    os.unlink(root / paths[3])
    os.symlink(inside, root / paths[3])  # a symlink that stays inside the root is fine
    summary = pack_dataset(root, tmp_path / "out", pack_size=32, max_reject_frac=1.0, min_side=MIN_SIDE)
    text = (tmp_path / "out" / "rejected.csv").read_text()
    rejected = pd.read_csv(tmp_path / "out" / "rejected.csv").set_index("path")["reason"].to_dict()
    assert rejected == {paths[0]: "not_regular", paths[1]: "outside_root", paths[2]: "outside_root"}
    assert "TOP-SECRET" not in text and summary.n_packed == summary.n_planned - 3


def test_decompression_bomb_and_trailing_bytes(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".png", np.full((40, 40), 99, np.uint8))
    png = buf.tobytes()
    (tmp_path / "tail.png").write_bytes(png + b"\x00trailing bytes after IEND, as some scanners write")
    assert read_gray8(tmp_path / "tail.png").shape == (40, 40)
    bomb = bytearray(png)
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR claims 100000 x 100000 px
    (tmp_path / "bomb.png").write_bytes(bytes(bomb))
    with pytest.raises(RejectedImageError) as err:
        read_gray8(tmp_path / "bomb.png")
    assert err.value.reason == "too_large"
    (tmp_path / "text.png").write_bytes(b"SECRET-CONTENT not an image")
    with pytest.raises(RejectedImageError) as err:
        read_gray8(tmp_path / "text.png")
    assert err.value.reason == "not_an_image" and "SECRET" not in err.value.detail


def test_disk_full_is_one_error_and_a_rerun_recovers(small_root: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "shards"
    real_close = ShardWriter.close
    calls = {"n": 0}

    def close_then_fill(self):
        calls["n"] += 1
        if calls["n"] == 2:
            self.abort()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_close(self)

    monkeypatch.setattr(ShardWriter, "close", close_then_fill)
    with pytest.raises(PackError, match="disk full .* re-run"):
        _pack(small_root, out)
    assert not (out / "manifest.json").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(ShardWriter, "close", real_close)
    summary = _pack(small_root, out)
    assert summary.shards_skipped == 1  # the shard finished before the disk filled is kept
    verify_shards(out, full=True)


def test_free_space_is_checked_before_any_shard(small_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pack_module, "_free_bytes", lambda path: 1000)
    out = tmp_path / "shards"
    with pytest.raises(PackInputError, match=r"not enough free space .* GB"):
        _pack(small_root, out)
    assert not list(out.glob("shard-*.h5"))


def test_outputs_follow_the_umask(small_root: Path, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        _pack(small_root, tmp_path / "shards")
    finally:
        os.umask(old)
    for name in ("shard-00000.h5", "index.csv", "manifest.json", "rejected.csv"):
        assert (tmp_path / "shards" / name).stat().st_mode & 0o777 == 0o640, name


def test_given_manifest_is_checked_like_the_csvs(small_root: Path, tmp_path: Path) -> None:
    manifest = build_manifest(small_root)
    for change, match in (
        ({"path": "MURA-v1.1/train/XR_HAND/patient00001/study1_negative/../../../../../../etc/passwd"}, "does not"),
        ({"label": 2}, "label=2"),
        ({"split": "valid"}, "split='valid'"),
    ):
        bad = manifest.copy()
        for col, value in change.items():
            bad.loc[0, col] = value
        with pytest.raises(ManifestError, match=match):
            _pack(small_root, tmp_path / "x", manifest=bad)
        assert not (tmp_path / "x" / "manifest.json").exists()
