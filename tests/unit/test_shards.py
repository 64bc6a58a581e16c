"""Shard format: round trip against an independent decode, schema, reader in other processes, verify."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

from bonehpc.cli import main as cli_main
from bonehpc.data.shards import (
    FORMAT_VERSION,
    INDEX_CSV,
    MANIFEST_JSON,
    VERIFIED_STAMP,
    ShardError,
    ShardReader,
    ShardWriter,
    manifest_content_sha256,
    verify_shards,
)

PACK = 64  # the shards_dir fixture packs at 64 px, letterbox


def reference(path: Path, size: int) -> np.ndarray:
    """Decode + gray + letterbox written out here, independently of bonehpc.data.pack."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    h, w = img.shape
    s = size / max(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    out = np.zeros((size, size), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    return out


@pytest.fixture
def shards_copy(shards_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the packed fixture, for tests that damage it."""
    dst = tmp_path / "shards"
    shutil.copytree(shards_dir, dst)
    return dst


def test_round_trip_pixels_and_metadata(shards_dir: Path, synth_root: Path, manifest: pd.DataFrame) -> None:
    reader = ShardReader(shards_dir)
    assert reader.pack_size == PACK
    assert len(reader) == len(manifest)  # the synthetic set has no bad images
    idx = reader.index.set_index("image_id").sort_index()
    man = manifest.set_index("image_id").sort_index()
    for col in ("path", "split", "body_part", "patient", "study", "view", "label"):
        assert idx[col].astype(str).tolist() == man[col].astype(str).tolist(), col
    rgb_seen = 0
    for image_id, row in idx.iterrows():
        src = synth_root / row["path"]
        raw = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
        rgb_seen += raw.ndim == 3
        assert (row["orig_h"], row["orig_w"]) == raw.shape[:2]
        got = reader.read(int(image_id))
        assert got.dtype == np.uint8 and got.shape == (PACK, PACK)
        np.testing.assert_array_equal(got, reference(src, PACK), err_msg=str(row["path"]))
        np.testing.assert_array_equal(reader.read_row(row["shard"], int(row["row"])), got)
    assert rgb_seen > 0, "fixture should include RGB PNGs so the conversion is exercised"
    # The per-image metadata inside each shard agrees with the index.
    for name, g in reader.index.groupby("shard"):
        with h5py.File(shards_dir / name, "r") as f:
            rows = g["row"].to_numpy()
            assert f["image_id"][:][rows].tolist() == g["image_id"].tolist()
            assert [s.decode() for s in f["study"][:][rows]] == g["study"].tolist()
            assert f["label"][:][rows].tolist() == g["label"].tolist()
            assert f["orig_w"][:][rows].tolist() == g["orig_w"].tolist()


def test_shard_schema(shards_dir: Path) -> None:
    info = json.loads((shards_dir / MANIFEST_JSON).read_text())
    assert info["format_version"] == FORMAT_VERSION
    for key in ("created", "bonehpc_version", "source_manifest_sha256", "n_rejected", "fit", "compression"):
        assert key in info
    for entry in info["shards"]:
        assert (shards_dir / entry["name"]).stat().st_size == entry["bytes"]
        with h5py.File(shards_dir / entry["name"], "r") as f:
            ds = f["images"]
            assert ds.dtype == np.uint8 and ds.shape == (entry["n_images"], PACK, PACK)
            assert ds.chunks == (1, PACK, PACK)
            assert f.attrs["format_version"] == FORMAT_VERSION
            assert f.attrs["pack_size"] == PACK and f.attrs["fit"] == "letterbox"
            assert f.attrs["n_images"] == entry["n_images"]
            assert f.attrs["source_manifest_sha256"] == info["source_manifest_sha256"]


def test_writer_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "shard-00000.h5"
    img = np.full((8, 8), 7, np.uint8)
    meta = dict.fromkeys(("path", "split", "patient", "study", "body_part"), "x") | {
        "image_id": 0,
        "view": 1,
        "label": 0,
        "orig_h": 8,
        "orig_w": 8,
    }
    with pytest.raises(RuntimeError), ShardWriter(path, pack_size=8, capacity=4) as w:
        w.add(img, meta)
        assert not path.exists() and w.tmp_path.exists()
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with ShardWriter(path, pack_size=8, capacity=4) as w:
        w.add(img, meta)
        info = w.close()
    assert info.n_images == 1 and path.stat().st_size == info.bytes
    with h5py.File(path, "r") as f:
        assert f["images"].shape == (1, 8, 8)  # trimmed to what was written


def _read_in_child(reader: ShardReader, image_id: int) -> bytes:
    return reader.read(image_id).tobytes()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_in_other_processes(shards_dir: Path, method: str) -> None:
    reader = ShardReader(shards_dir)
    ids = [int(i) for i in reader.image_ids[:6]]
    want = [reader.read(i).tobytes() for i in ids]  # handles open in the parent before the fork
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._handles == {} and clone.read(ids[0]).tobytes() == want[0]
    with multiprocessing.get_context(method).Pool(2) as pool:
        got = pool.starmap(_read_in_child, [(reader, i) for i in ids])
    assert got == want


def test_reader_in_torch_dataloader(shards_dir: Path) -> None:
    torch = pytest.importorskip("torch")

    class DS(torch.utils.data.Dataset):
        def __init__(self, reader: ShardReader) -> None:
            self.reader, self.ids = reader, reader.image_ids

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int):
            return torch.from_numpy(self.reader.read(int(self.ids[i]))), int(self.ids[i])

    reader = ShardReader(shards_dir)
    reader.read(int(reader.image_ids[0]))  # an open handle in the parent must not leak into workers
    loader = torch.utils.data.DataLoader(DS(reader), batch_size=16, num_workers=2)
    seen = 0
    for images, ids in loader:
        for img, i in zip(images, ids, strict=True):
            np.testing.assert_array_equal(img.numpy(), reader.read(int(i)))
        seen += len(ids)
    assert seen == len(reader)


def test_reader_errors(shards_dir: Path, tmp_path: Path) -> None:
    reader = ShardReader(shards_dir)
    with pytest.raises(KeyError, match="not in"):
        reader.read(10**9)
    with pytest.raises(ShardError, match="does not exist"):
        ShardReader(tmp_path / "nope")
    with pytest.raises(ShardError, match="manifest.json: missing"):
        ShardReader(tmp_path)


def test_verify_ok_and_full_is_cached(shards_copy: Path) -> None:
    quick = verify_shards(shards_copy)
    assert not quick.full and quick.n_images > 0
    first = verify_shards(shards_copy, full=True)
    assert first.full and not first.cached and (shards_copy / VERIFIED_STAMP).is_file()
    again = verify_shards(shards_copy, full=True)
    assert again.cached


def _flip_image_byte(shard: Path) -> None:
    with h5py.File(shard, "r") as f:
        offset = f["images"].id.get_chunk_info(0).byte_offset + 100
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_flipped_byte_caught_by_full_verify_and_cli(shards_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    verify_shards(shards_copy, full=True)  # leaves a stamp; the change below must invalidate it
    shard = sorted(shards_copy.glob("shard-*.h5"))[1]
    _flip_image_byte(shard)
    verify_shards(shards_copy)  # a pixel byte is invisible to the quick check
    with pytest.raises(ShardError, match=rf"{shard.name}: SHA-256 differs"):
        verify_shards(shards_copy, full=True)
    assert cli_main(["verify", str(shards_copy), "--full"]) == 1
    assert shard.name in capsys.readouterr().err
    assert cli_main(["verify", str(shards_copy)]) == 1  # full is the default
    assert shard.name in capsys.readouterr().err
    assert cli_main(["verify", str(shards_copy), "--quick"]) == 0
    assert "quick check" in capsys.readouterr().out


def test_manifest_json_is_signed(shards_copy: Path) -> None:
    path = shards_copy / MANIFEST_JSON
    info = json.loads(path.read_text())
    assert info["content_sha256"] == manifest_content_sha256(info)
    info["n_rejected"] = 0 if info["n_rejected"] else 1  # a plausible edit that no shard hash covers
    path.write_text(json.dumps(info))
    with pytest.raises(ShardError, match="manifest.json: content differs from its content_sha256"):
        verify_shards(shards_copy)
    del info["content_sha256"]
    path.write_text(json.dumps(info))
    verify_shards(shards_copy)  # quick accepts a pack of an older bonehpc ...
    with pytest.raises(ShardError, match="no content_sha256"):
        verify_shards(shards_copy, full=True)  # ... the full check does not


def test_truncated_shard_caught_by_quick_verify(shards_copy: Path) -> None:
    shard = sorted(shards_copy.glob("shard-*.h5"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=rf"{shard.name}: \d+ bytes, manifest.json says"):
        verify_shards(shards_copy)


def test_verify_names_each_problem(shards_copy: Path) -> None:
    shard = sorted(shards_copy.glob("shard-*.h5"))[0]
    shard.unlink()
    with pytest.raises(ShardError, match=rf"{shard.name}: listed in manifest.json but missing"):
        verify_shards(shards_copy)


def test_verify_catches_edited_index_and_manifest(shards_copy: Path) -> None:
    index = shards_copy / INDEX_CSV
    text = index.read_text()
    index.write_text(text.replace("shard-00000.h5,0,", "shard-00000.h5,1,", 1))
    with pytest.raises(ShardError, match="index.csv: content differs"):
        verify_shards(shards_copy)
    index.write_text(text)
    (shards_copy / MANIFEST_JSON).write_text("{not json")
    with pytest.raises(ShardError, match="not readable JSON"):
        verify_shards(shards_copy)
