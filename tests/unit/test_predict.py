"""Inference on new images: same numbers as the eval path, study aggregation, unreadable files, ensembles, Grad-CAM."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from test_report import build_tiny_experiment

from bonehpc.predict import PredictError, gradcam, load_predictor, predict, studies_csv_path


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory: pytest.TempPathFactory, synth_root: Path, shards_dir: Path) -> Path:
    # Same folder as test_report's fixture: whichever runs first trains, the other finds the stamp.
    return build_tiny_experiment(tmp_path_factory.getbasetemp() / "tiny_experiment", synth_root, shards_dir)


@pytest.fixture
def image_folder(synth_root: Path, manifest: pd.DataFrame, tmp_path: Path) -> Path:
    """Three studies of the valid split copied to a new tree, plus a corrupt PNG, a truncated one and a text file."""
    root = tmp_path / "new_xrays"
    valid = manifest[manifest.split == "valid"]
    multi = valid.groupby("study").filter(lambda g: len(g) >= 2)["study"].unique()[:2]
    single = valid[~valid.study.isin(multi)]["study"].unique()[:1]
    for i, study in enumerate([*multi, *single]):
        dst = root / f"patient{i}" / "study1"
        dst.mkdir(parents=True)
        for p in valid[valid.study == study]["path"]:
            shutil.copy(synth_root / p, dst / Path(p).name)
    good = next((root / "patient1" / "study1").glob("*.png")).read_bytes()
    corrupt = bytearray(good)
    corrupt[60:260] = bytes(200)  # image data zeroed, end chunk intact
    (root / "patient0" / "study1" / "image9.png").write_bytes(bytes(corrupt))
    only_bad = root / "patient9" / "study1"
    only_bad.mkdir(parents=True)
    (only_bad / "image1.png").write_bytes(good[:60])  # truncated
    (root / "patient1" / "study1" / "notes.txt").write_text("not an image")
    return root


def test_unreadable_images_are_listed_and_studies_averaged(tiny_experiment: Path, image_folder: Path, tmp_path: Path):
    out = tmp_path / "preds.csv"
    df = predict(tiny_experiment / "final" / "student" / "best.pt", image_folder, out, batch_size=3)
    on_disk = pd.read_csv(out)
    assert len(on_disk) == len(df) == len(list(image_folder.rglob("*.png")))  # the .txt is not an input
    bad = on_disk[on_disk.status == "unreadable"]
    assert sorted(Path(p).name for p in bad.path) == ["image1.png", "image9.png"]
    reasons = dict(zip(bad.path.map(lambda p: Path(p).name), bad.reason, strict=True))
    assert reasons["image9.png"].startswith("corrupt:") and reasons["image1.png"].startswith("truncated:")
    assert bad["prob"].isna().all() and bad["pred"].isna().all()
    ok = on_disk[on_disk.status == "ok"]
    assert ok["prob"].between(0, 1).all() and len(ok) >= 5
    assert (ok["pred"] == (ok["prob"] > 0.5).astype(int)).all()
    studies = pd.read_csv(studies_csv_path(out)).set_index("study")
    assert studies_csv_path(out).name == "preds_studies.csv"
    assert len(studies) == 4
    for study, g in ok.groupby("study"):
        assert studies.loc[study, "prob"] == pytest.approx(g["prob"].mean(), abs=1e-12)
        assert studies.loc[study, "n_images"] == len(g)
        assert studies.loc[study, "pred"] == int(g["prob"].mean() > 0.5)
    lonely = str(image_folder / "patient9" / "study1") + "/"
    assert studies.loc[lonely, "status"] == "no readable image" and studies.loc[lonely, "n_unreadable"] == 1
    mixed = str(image_folder / "patient0" / "study1") + "/"
    assert studies.loc[mixed, "n_unreadable"] == 1 and studies.loc[mixed, "status"] == "ok"


def test_same_probabilities_as_the_holdout_evaluation(tiny_experiment: Path, synth_root: Path, tmp_path: Path):
    """The MURA image-paths CSV through predict gives the probabilities evaluate_holdout got from the shards."""
    from bonehpc.data.mura import build_manifest

    csv = synth_root / "MURA-v1.1" / "valid_image_paths.csv"
    df = predict(tiny_experiment / "final" / "teacher", csv, tmp_path / "p.csv")
    assert (df.status == "ok").all()
    manifest = build_manifest(synth_root).set_index("image_id")
    ref = pd.read_csv(tiny_experiment / "holdout" / "final_teacher" / "predictions.csv")
    ref["path"] = [str(synth_root / manifest.loc[i, "path"]) for i in ref["image_id"]]
    merged = ref.merge(df, on="path", suffixes=("_eval", "_predict"))
    assert len(merged) == len(ref) == len(df)
    np.testing.assert_allclose(merged["prob_predict"], merged["prob_eval"], atol=1e-5)


def test_fold_ensemble_is_the_mean_of_its_folds(tiny_experiment: Path, image_folder: Path, tmp_path: Path):
    ens = predict(tiny_experiment, image_folder, tmp_path / "ens.csv", role="teacher")
    assert len(load_predictor(tiny_experiment, "teacher").models) == 2
    folds = [
        predict(tiny_experiment / f"fold{k}" / "teacher" / "best.pt", image_folder, tmp_path / f"f{k}.csv")
        for k in (0, 1)
    ]
    ok = ens.status == "ok"
    np.testing.assert_allclose(
        ens.loc[ok, "prob"], (folds[0].loc[ok, "prob"] + folds[1].loc[ok, "prob"]) / 2, atol=1e-6
    )


def test_gradcam_maps(tiny_experiment: Path) -> None:
    import torch

    for role in ("teacher", "student"):
        pred = load_predictor(tiny_experiment / "fold0" / role / "best.pt")
        x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        cam = gradcam(pred.models[0], x)
        assert cam.shape == (3, 64, 64)
        assert cam.min() >= 0 and cam.max() <= 1 + 1e-6 and cam.max() > 0.99
        assert all(p.grad is None for p in pred.models[0].parameters())  # no gradients left behind


def test_gradcam_overlays_for_abnormal_studies(tiny_experiment: Path, synth_root: Path, tmp_path: Path) -> None:
    csv = synth_root / "MURA-v1.1" / "valid_image_paths.csv"
    # A 1-epoch model may call every study normal; use the first checkpoint that flags at least one.
    for ckpt in sorted(tiny_experiment.glob("*/*/best.pt")):
        cams = tmp_path / ckpt.parent.parent.name / ckpt.parent.name
        df = predict(ckpt, csv, cams / "p.csv", gradcam_dir=cams)
        studies = df.attrs["studies"]
        flagged = set(studies.loc[studies.pred == 1, "study"])
        if flagged:
            break
    assert flagged, "no checkpoint of the tiny experiment flags any study; cannot test the overlays"
    expected = df[(df.status == "ok") & df.study.isin(flagged)]
    written = sorted(cams.glob("*.png"))
    assert len(written) == len(expected)
    assert set(df.loc[expected.index, "gradcam"]) == {str(p) for p in written}
    assert (df.loc[~df.index.isin(expected.index), "gradcam"] == "").all()
    img = cv2.imread(str(written[0]))
    assert img.shape == (64, 64, 3)


def test_bad_model_or_input_is_a_clear_error(tiny_experiment: Path, tmp_path: Path) -> None:
    ckpt = tiny_experiment / "final" / "student" / "best.pt"
    with pytest.raises(PredictError, match="model not found"):
        predict(tmp_path / "nope.pt", tmp_path, tmp_path / "p.csv")
    with pytest.raises(PredictError, match="no fold"):
        predict(tmp_path, tmp_path, tmp_path / "p.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="no .png"):
        predict(ckpt, tmp_path / "empty", tmp_path / "p.csv")
    with pytest.raises(PredictError, match="input not found"):
        predict(ckpt, tmp_path / "missing", tmp_path / "p.csv")


def test_csv_with_path_column_and_cli(tiny_experiment: Path, image_folder: Path, tmp_path: Path) -> None:
    from bonehpc.cli import main

    files = sorted(image_folder.rglob("*.png"))
    (tmp_path / "list.csv").write_text("path,comment\n" + "".join(f"{p},x\n" for p in files))
    df = predict(tiny_experiment / "final" / "student", tmp_path / "list.csv", tmp_path / "a.csv")
    assert list(df["path"]) == [str(p) for p in files]
    out = tmp_path / "cli.csv"
    rc = main(
        [
            "predict",
            "--model",
            str(tiny_experiment / "final" / "student"),
            "--input",
            str(image_folder),
            "--out",
            str(out),
            "--gradcam",
            str(tmp_path / "cams"),
        ]
    )
    assert rc == 0 and out.is_file() and studies_csv_path(out).is_file()
