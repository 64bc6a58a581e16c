"""build_manifest and friends: the manifest contract, CSV round trip, summary, and every input error."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bonehpc.cli import main as cli_main
from bonehpc.data.mura import (
    MANIFEST_COLUMNS,
    ManifestError,
    build_manifest,
    check_manifest,
    read_manifest,
    summarize,
    write_manifest,
)


@pytest.fixture
def tree(synth_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic tree, to break."""
    shutil.copytree(synth_root / "MURA-v1.1", tmp_path / "MURA-v1.1")
    return tmp_path


def _csv(tree: Path, name: str) -> Path:
    return tree / "MURA-v1.1" / name


def _lines(tree: Path, name: str) -> list[str]:
    return _csv(tree, name).read_text().splitlines()


def _write(tree: Path, name: str, lines: list[str]) -> None:
    _csv(tree, name).write_text("".join(line + "\n" for line in lines))


def test_manifest_contract(synth_root: Path, manifest: pd.DataFrame) -> None:
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    for col in ("image_id", "view", "label"):
        assert manifest[col].dtype == "int64", col
    assert manifest["image_id"].tolist() == list(range(len(manifest)))
    expected = _lines(synth_root, "train_image_paths.csv") + _lines(synth_root, "valid_image_paths.csv")
    assert manifest["path"].tolist() == expected, "one row per image, in CSV order, train first"
    labels = dict(
        line.split(",")
        for name in ("train_labeled_studies.csv", "valid_labeled_studies.csv")
        for line in _lines(synth_root, name)
    )
    for row in manifest.itertuples():
        assert row.path.startswith(f"MURA-v1.1/{row.split}/XR_{row.body_part}/")
        assert row.study == row.path.rsplit("/", 1)[0] + "/"
        assert row.patient == f"{row.split}/{row.path.split('/')[3]}"
        assert row.path.endswith(f"/image{row.view}.png")
        assert row.label == int(labels[row.study])
    assert set(manifest["split"]) == {"train", "valid"}
    assert manifest.groupby("study")["label"].nunique().max() == 1


def test_accepts_the_mura_folder_itself(synth_root: Path, manifest: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(build_manifest(synth_root / "MURA-v1.1"), manifest)


def test_round_trip_keeps_dtypes(manifest: pd.DataFrame, tmp_path: Path) -> None:
    path = write_manifest(manifest, tmp_path / "sub" / "manifest.csv")
    pd.testing.assert_frame_equal(read_manifest(path), manifest)


def test_summarize(manifest: pd.DataFrame) -> None:
    table = summarize(manifest)
    for split in ("train", "valid"):
        rows = table[table["split"] == split]
        total = rows[rows["body_part"] == "ALL"].iloc[0]
        parts = rows[rows["body_part"] != "ALL"]
        assert len(parts) == 7
        sub = manifest[manifest["split"] == split]
        assert total["images"] == len(sub) == parts["images"].sum()
        assert total["studies"] == sub["study"].nunique() == parts["studies"].sum()
        assert total["patients"] == sub["patient"].nunique()
        assert total["abnormal_rate"] == round(sub.drop_duplicates("study")["label"].mean(), 3)
    assert table["abnormal_rate"].between(0, 1).all()


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        build_manifest(tmp_path / "nope")
    with pytest.raises(ManifestError, match="no MURA-v1.1/ folder"):
        build_manifest(tmp_path)


def test_missing_csv(tree: Path) -> None:
    _csv(tree, "valid_labeled_studies.csv").unlink()
    with pytest.raises(ManifestError, match="missing CSV.*valid_labeled_studies.csv"):
        build_manifest(tree)


def test_missing_image_files(tree: Path) -> None:
    paths = _lines(tree, "train_image_paths.csv")[:3]
    for p in paths:
        (tree / p).unlink()
    with pytest.raises(ManifestError) as err:
        build_manifest(tree)
    msg = str(err.value)
    assert "3 image file(s)" in msg and "missing" in msg
    assert all(p in msg for p in paths)
    # The packer's mode: missing files are kept in the manifest (it records them in rejected.csv).
    df = build_manifest(tree, check_files=False)
    assert set(paths) <= set(df["path"])


def test_missing_image_list_is_capped(tree: Path) -> None:
    paths = _lines(tree, "train_image_paths.csv")[:25]
    for p in paths:
        (tree / p).unlink()
    with pytest.raises(ManifestError, match=r"25 image file\(s\).*and 5 more"):
        build_manifest(tree)


def test_label_disagrees_with_folder(tree: Path) -> None:
    lines = _lines(tree, "train_labeled_studies.csv")
    study, label = lines[0].split(",")
    lines[0] = f"{study},{1 - int(label)}"
    _write(tree, "train_labeled_studies.csv", lines)
    with pytest.raises(ManifestError, match=f"disagree.*{study} has label {1 - int(label)}"):
        build_manifest(tree)


def test_image_without_labeled_study(tree: Path) -> None:
    lines = _lines(tree, "valid_labeled_studies.csv")
    study = lines.pop(2).split(",")[0]
    _write(tree, "valid_labeled_studies.csv", lines)
    with pytest.raises(ManifestError, match=f"no row in the labeled-studies CSV: {study}image1.png"):
        build_manifest(tree)


def test_labeled_study_without_images(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = _lines(tree, "train_image_paths.csv")
    study = images[0].rsplit("/", 1)[0] + "/"
    _write(tree, "train_image_paths.csv", [p for p in images if not p.startswith(study)])
    with caplog.at_level(logging.WARNING, logger="bonehpc.data.mura"):
        df = build_manifest(tree)
    assert study in caplog.text and "no image" in caplog.text
    assert study not in set(df["study"])
    with pytest.raises(ManifestError, match=f"1 labeled stud.*no image.*{study}"):
        build_manifest(tree, strict=True)


@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        (
            "train_image_paths.csv",
            lambda s: s + ",extra",
            r"train_image_paths.csv line 4: expected 1 column\(s\), got 2",
        ),
        ("train_labeled_studies.csv", lambda s: s.split(",")[0], r"train_labeled_studies.csv line 4: expected 2"),
        (
            "train_labeled_studies.csv",
            lambda s: s[:-1] + "2",
            r"train_labeled_studies.csv line 4: label must be 0 or 1",
        ),
        ("valid_image_paths.csv", lambda s: s.replace(".png", ".jpg"), r"valid_image_paths.csv line 4: path .* match"),
        (
            "valid_image_paths.csv",
            lambda s: s.replace("/patient", "/p"),
            r"valid_image_paths.csv line 4: path .* match",
        ),
        (
            "train_labeled_studies.csv",
            lambda s: s.replace("/,", ","),
            r"train_labeled_studies.csv line 4: path .*match",
        ),
        ("train_image_paths.csv", lambda s: s.replace("/train/", "/valid/"), r"line 4: .* is in split 'valid'"),
    ],
)
def test_malformed_rows(tree: Path, name: str, change, match: str) -> None:
    lines = _lines(tree, name)
    lines[3] = change(lines[3])
    _write(tree, name, lines)
    with pytest.raises(ManifestError, match=match):
        build_manifest(tree)


def test_header_row_is_named(tree: Path) -> None:
    _write(tree, "train_labeled_studies.csv", ["path,label"] + _lines(tree, "train_labeled_studies.csv"))
    with pytest.raises(ManifestError, match="train_labeled_studies.csv line 1: .*header.*have none"):
        build_manifest(tree)


@pytest.mark.parametrize("name", ["train_image_paths.csv", "valid_labeled_studies.csv"])
def test_duplicate_rows(tree: Path, name: str) -> None:
    lines = _lines(tree, name)
    _write(tree, name, lines + [lines[1]])
    with pytest.raises(
        ManifestError, match=f"1 duplicate row.*{lines[1].split(',')[0]} \\({name} lines 2 and {len(lines) + 1}\\)"
    ):
        build_manifest(tree)


def test_any_xr_body_part(tree: Path) -> None:
    """Body parts are whatever XR_ folders the CSVs name, not a fixed list of seven."""
    for name in ("train_image_paths.csv", "train_labeled_studies.csv"):
        _write(tree, name, [line.replace("/XR_WRIST/", "/XR_ANKLE/") for line in _lines(tree, name)])
    (tree / "MURA-v1.1/train/XR_WRIST").rename(tree / "MURA-v1.1/train/XR_ANKLE")
    df = build_manifest(tree)
    assert "ANKLE" in set(df["body_part"]) and "WRIST" not in set(df.loc[df["split"] == "train", "body_part"])
    assert "ANKLE" in set(summarize(df)["body_part"])


def test_read_manifest_errors(manifest: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "none.csv")
    manifest.drop(columns=["label"]).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(ManifestError, match="missing manifest column.*label"):
        read_manifest(tmp_path / "a.csv")
    bad = manifest.astype({"view": str})
    bad.loc[5, "view"] = "two"
    bad.to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(ManifestError, match="column view must hold integers.*data row 6"):
        read_manifest(tmp_path / "b.csv")


def test_cli_manifest(synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "manifest.csv"
    assert cli_main(["manifest", "--mura-root", str(synth_root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "abnormal_rate" in printed and "SHOULDER" in printed
    assert len(read_manifest(out)) == len(build_manifest(synth_root))


def test_cli_manifest_error_is_one_line(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tree / _lines(tree, "valid_image_paths.csv")[0]).unlink()
    assert cli_main(["manifest", "--mura-root", str(tree)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("bonehpc: manifest error: 1 image file(s)")


def test_body_parts_outside_the_seven_warn_by_name(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("train_image_paths.csv", "train_labeled_studies.csv"):
        _write(tree, name, [line.replace("/XR_WRIST/", "/XR_LEG/") for line in _lines(tree, name)])
    (tree / "MURA-v1.1/train/XR_WRIST").rename(tree / "MURA-v1.1/train/XR_LEG")
    with caplog.at_level(logging.WARNING, logger="bonehpc.data.mura"):
        df = build_manifest(tree)
    assert "LEG" in set(df["body_part"])
    assert "XR_LEG" in caplog.text and "outside MURA's seven" in caplog.text


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("/XR_WRIST/", "/XR_../", "does not match"),
        ("/XR_WRIST/", "/XR_WRÏST/", "non-ASCII"),
        ("/patient0", "/patiënt0", "non-ASCII"),
    ],
)
def test_dotdot_and_non_ascii_folders_are_rejected(tree: Path, old: str, new: str, match: str) -> None:
    lines = _lines(tree, "train_image_paths.csv")
    i = next(k for k, line in enumerate(lines) if old in line)
    lines[i] = lines[i].replace(old, new)
    _write(tree, "train_image_paths.csv", lines)
    with pytest.raises(ManifestError, match=rf"train_image_paths.csv line {i + 1}: .*{match}"):
        build_manifest(tree)


def test_non_utf8_and_empty_csvs(tree: Path, manifest: pd.DataFrame, tmp_path: Path) -> None:
    path = _csv(tree, "valid_labeled_studies.csv")
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"study", b"st\xfcdy", 1)
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ManifestError, match=r"valid_labeled_studies.csv line 3: not UTF-8 text \(byte 0xfc\)"):
        build_manifest(tree)
    for name in ("train_image_paths.csv", "train_labeled_studies.csv", "valid_image_paths.csv",
                 "valid_labeled_studies.csv"):  # fmt: skip
        _csv(tree, name).write_text("")
    with pytest.raises(ManifestError, match="no image rows"):
        build_manifest(tree)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ManifestError, match="empty file"):
        read_manifest(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text(",".join(manifest.columns) + "\n")
    with pytest.raises(ManifestError, match="no image rows"):
        read_manifest(tmp_path / "header.csv")
    (tmp_path / "latin1.csv").write_bytes(manifest.head(3).to_csv(index=False).encode() + b"x\xe9\n")
    with pytest.raises(ManifestError, match=r"latin1.csv line 5: not UTF-8"):
        read_manifest(tmp_path / "latin1.csv")


def test_check_manifest_accepts_a_built_one(manifest: pd.DataFrame) -> None:
    check_manifest(manifest, "built")
    bad = manifest.copy()
    bad.loc[3, "study"] = "MURA-v1.1/train/XR_HAND/patient99999/study1_negative/"
    with pytest.raises(ManifestError, match="built: 1 bad row.*data row 4: study="):
        check_manifest(bad, "built")
    twice = manifest.copy()
    twice.loc[1, ["path", "study", "view", "body_part", "patient", "split", "label"]] = manifest.loc[
        0, ["path", "study", "view", "body_part", "patient", "split", "label"]
    ]
    with pytest.raises(ManifestError, match="path .* repeats"):
        check_manifest(twice, "built")
