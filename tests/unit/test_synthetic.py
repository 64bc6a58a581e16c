"""The synthetic MURA-v1.1 generator: layout, CSV format, image facts, determinism, visible findings."""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from bonehpc.data.mura import build_manifest
from bonehpc.data.synthetic import (
    ANATOMY,
    BAD_KINDS,
    BODY_PARTS,
    FINDINGS,
    generate,
    random_fracture,
    read_marker,
    render_image,
)

MAX_SIDE = 160  # tests/conftest.py SYNTH_MAX_SIDE
IMAGE_RE = re.compile(
    r"^MURA-v1\.1/(train|valid)/XR_([A-Z]+)/patient(\d{5})/study(\d+)_(positive|negative)/image(\d+)\.png$"
)


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def _image_paths(root: Path, split: str) -> list[str]:
    return [r[0] for r in _rows(root / "MURA-v1.1" / f"{split}_image_paths.csv")]


def test_csv_format(synth_root: Path) -> None:
    folder = synth_root / "MURA-v1.1"
    assert sorted(p.name for p in folder.glob("*.csv")) == [
        "train_image_paths.csv",
        "train_labeled_studies.csv",
        "valid_image_paths.csv",
        "valid_labeled_studies.csv",
    ]
    for split in ("train", "valid"):
        images = _rows(folder / f"{split}_image_paths.csv")
        studies = _rows(folder / f"{split}_labeled_studies.csv")
        assert images and studies
        assert all(len(r) == 1 for r in images), "image-paths CSV has one column and no header"
        assert all(len(r) == 2 for r in studies), "labeled-studies CSV has two columns and no header"
        for (path,) in images:
            m = IMAGE_RE.match(path)
            assert m, path
            assert m[1] == split
        for path, label in studies:
            assert path.startswith(f"MURA-v1.1/{split}/XR_") and path.endswith("/"), path
            assert label in ("0", "1")
            assert path.endswith("_positive/") == (label == "1"), f"{path} has label {label}"
        # every image's study is labeled, and every labeled study has images
        assert {p.rsplit("/", 1)[0] + "/" for (p,) in images} == {s for s, _ in studies}


def test_files_views_and_parts(synth_root: Path) -> None:
    views: dict[str, list[int]] = defaultdict(list)
    parts: dict[str, set[str]] = {"train": set(), "valid": set()}
    for split in ("train", "valid"):
        for path in _image_paths(synth_root, split):
            assert (synth_root / path).is_file(), path
            m = IMAGE_RE.match(path)
            assert m
            views[path.rsplit("/", 1)[0]].append(int(m[6]))
            parts[split].add(m[2])
    for study, vs in views.items():
        assert sorted(vs) == list(range(1, len(vs) + 1)), study
        assert 1 <= len(vs) <= 4, study
    counts = Counter(len(v) for v in views.values())
    assert len(counts) >= 3, f"views per study should vary, got {counts}"
    assert parts["train"] == set(BODY_PARTS) and parts["valid"] == set(BODY_PARTS)


def test_patients_and_labels(synth_root: Path) -> None:
    patients: dict[str, set[str]] = {}
    per_patient: dict[str, set[str]] = defaultdict(set)
    labels = []
    for split in ("train", "valid"):
        rows = _rows(synth_root / "MURA-v1.1" / f"{split}_labeled_studies.csv")
        labels += [int(label) for _, label in rows]
        patients[split] = set()
        for path, _ in rows:
            _, _, part, patient, _, _ = path.split("/")
            patients[split].add(patient)
            per_patient[patient].add(path)
    assert not patients["train"] & patients["valid"], "train and valid patients must be disjoint"
    assert min(int(p[7:]) for p in patients["valid"]) >= 11185, "valid patients are numbered from 11185 as in MURA"
    assert any(len(s) > 1 for s in per_patient.values()), "some patients have several studies"
    assert 0.3 <= np.mean(labels) <= 0.5, f"abnormal-study rate {np.mean(labels):.2f}, want about 0.4"


def test_images_gray_rgb_and_sizes(synth_root: Path) -> None:
    channels = Counter()
    sides = []
    for split in ("train", "valid"):
        for path in _image_paths(synth_root, split):
            img = cv2.imread(str(synth_root / path), cv2.IMREAD_UNCHANGED)
            assert img is not None and img.dtype == np.uint8, path
            channels[1 if img.ndim == 2 else img.shape[2]] += 1
            if img.ndim == 3:
                assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
            sides.append(img.shape[:2])
            assert img.std() > 10, f"{path} looks blank"
    assert set(channels) == {1, 3} and channels[1] > channels[3], f"mostly gray, some RGB: {channels}"
    assert max(max(s) for s in sides) == MAX_SIDE
    assert all(max(s) <= MAX_SIDE for s in sides)
    assert len(set(sides)) > len(sides) // 3, "image sizes should vary"
    assert min(min(s) for s in sides) < MAX_SIDE * 0.6, "short sides can be much smaller than the long side"
    assert any(h > w for h, w in sides) and any(w > h for h, w in sides)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic(tmp_path: Path) -> None:
    a = _tree_bytes(generate(tmp_path / "a", patients=8, seed=3, max_side=64))
    b = _tree_bytes(generate(tmp_path / "b", patients=8, seed=3, max_side=64))
    c = _tree_bytes(generate(tmp_path / "c", patients=8, seed=4, max_side=64))
    assert a == b
    assert a != c


def test_existing_tree_is_kept_unless_overwrite(tmp_path: Path) -> None:
    generate(tmp_path, patients=4, seed=0, max_side=32)
    before = _tree_bytes(tmp_path / "MURA-v1.1")
    with pytest.raises(FileExistsError, match="already exists"):
        generate(tmp_path, patients=6, seed=1, max_side=32)
    assert _tree_bytes(tmp_path / "MURA-v1.1") == before
    generate(tmp_path, patients=6, seed=1, max_side=32, overwrite=True)
    assert _tree_bytes(tmp_path / "MURA-v1.1") != before
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patients": 1}, "patients"),
        ({"max_side": 8}, "max_side"),
        ({"valid_frac": 1.0}, "valid_frac"),
        ({"rgb_frac": -0.1}, "rgb_frac"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"patients": 4, "seed": 0, "max_side": 32} | kwargs
    with pytest.raises(ValueError, match=match):
        generate(tmp_path, **args)


def _letterbox(img: np.ndarray, side: int = 64) -> np.ndarray:
    h, w = img.shape
    k = side / max(h, w)
    small = cv2.resize(img, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
    out = np.zeros((side, side), np.uint8)
    y, x = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    out[y : y + small.shape[0], x : x + small.shape[1]] = small
    return out


@pytest.mark.parametrize("part", sorted(ANATOMY))
def test_findings_visible_at_64px(part: str) -> None:
    """The same radiograph with and without each finding differs clearly after a letterbox to 64 px."""
    for finding, _ in FINDINGS:
        for s in range(3):
            fracture = random_fracture(part, finding, np.random.default_rng(s))
            normal = render_image(part, 400, 260, np.random.default_rng(50 + s), view=1, fracture=None, finding="")
            abnormal = render_image(
                part, 400, 260, np.random.default_rng(50 + s), view=1, fracture=fracture, finding=finding
            )
            diff = np.abs(_letterbox(normal).astype(int) - _letterbox(abnormal).astype(int))
            changed = int((diff > 40).sum())
            assert changed >= 30, f"{part} {finding}: only {changed} of 4096 px change by > 40 at 64 px"


def test_bad_files_and_the_synthetic_marker(tmp_path: Path) -> None:
    root = generate(tmp_path / "s", patients=20, seed=2, max_side=64, bad_frac=0.01)
    marker = read_marker(tmp_path / "s")
    assert marker is not None and marker["synthetic"] is True and marker["bad_frac"] == 0.01
    kinds = {b["path"]: b["kind"] for b in marker["bad_files"]}
    assert set(kinds.values()) == set(BAD_KINDS)  # at least one of each, even below 1 % of a small set
    for path, kind in kinds.items():
        data = (root.parent / path).read_bytes()
        assert {"empty": data == b"", "truncated": data.startswith(b"\x89PNG") and b"IEND" not in data,
                "not_an_image": data.startswith(b"Radiology")}[kind], (path, kind)  # fmt: skip
    manifest = build_manifest(tmp_path / "s")  # the CSVs still list every file
    (lost,) = marker["lost_studies"]
    study = manifest[manifest["study"] == lost]
    assert set(study["path"]) <= set(kinds) and study["split"].iloc[0] == "train"
    assert manifest.loc[manifest["patient"] == study["patient"].iloc[0], "study"].nunique() == 1  # a patient lost
    clean = generate(tmp_path / "c", patients=20, seed=2, max_side=64)
    assert read_marker(tmp_path / "c")["bad_files"] == [] and clean.is_dir()


def test_overwrite_never_deletes_a_real_data_set(tmp_path: Path) -> None:
    real = tmp_path / "MURA-v1.1"
    real.mkdir()
    (real / "train_image_paths.csv").write_text("precious\n")
    with pytest.raises(FileExistsError, match="not a synthetic data set"):
        generate(tmp_path, patients=4, seed=0, max_side=32, overwrite=True)
    assert (real / "train_image_paths.csv").read_text() == "precious\n"
    assert read_marker(tmp_path) is None


def test_abnormal_rate_option() -> None:
    """`synth --abnormal-rate`: each split gets round(rate x studies) abnormal studies (both classes kept); the
    default plan is unchanged; a rate outside (0, 1) is one line, exit 2."""
    from bonehpc.cli import main
    from bonehpc.data.synthetic import ABNORMAL_RATE, plan_studies

    for rate in (0.15, 0.6):
        plans = plan_studies(120, seed=3, abnormal_rate=rate)
        for split in ("train", "valid"):
            labels = [p.label for p in plans if p.split == split]
            assert sum(labels) == min(max(round(rate * len(labels)), 1), len(labels) - 1)
    assert [p.label for p in plan_studies(40, seed=1)] == [
        p.label for p in plan_studies(40, seed=1, abnormal_rate=ABNORMAL_RATE)
    ]
    tiny = plan_studies(3, seed=0, abnormal_rate=0.01)
    assert {p.label for p in tiny if p.split == "train"} == {0, 1}
    assert main(["synth", "--out", "/nonexistent/never", "--patients", "4", "--abnormal-rate", "1.5"]) == 2
