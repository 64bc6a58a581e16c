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
    assert (ok["pred"] == (ok["prob"] > df.attrs["threshold"]).astype(int)).all()  # the stored out-of-fold cut
    studies = pd.read_csv(studies_csv_path(out)).set_index("study")
    assert studies_csv_path(out).name == "preds_studies.csv"
    assert len(studies) == 4
    for study, g in ok.groupby("study"):
        assert studies.loc[study, "prob"] == pytest.approx(g["prob"].mean(), abs=1e-12)
        assert studies.loc[study, "n_images"] == len(g)
        assert studies.loc[study, "pred"] == int(g["prob"].mean() > df.attrs["threshold"])
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
    # source and overlay side by side, each at the source image's own resolution (not the 64 px model input)
    for png in written[:3]:
        i = df.index[df.gradcam == str(png)][0]
        src = cv2.imread(df.at[i, "path"], cv2.IMREAD_GRAYSCALE)
        img = cv2.imread(str(png))
        h, w = src.shape
        assert img.shape == (h, 2 * w + 8, 3) and max(h, w) > 64
        np.testing.assert_array_equal(img[:, :w, 0], src)  # the left half is the original, untouched


def test_cam_on_source_undoes_the_letterbox() -> None:
    from bonehpc.predict import cam_on_source

    # a 100 x 50 (h x w) image letterboxed into a 64 px square sits in columns 16..47
    cam = np.zeros((32, 32), np.float32)
    cam[:, 8:24] = 1.0  # the image's part of the (downsized) model input is hot, the padding is cold
    out = cam_on_source(cam, (100, 50), 64, "letterbox")
    assert out.shape == (100, 50)
    assert out[:, 3:-3].min() > 0.99  # hot everywhere inside the image: the padding was cut away
    stretched = cam_on_source(cam, (100, 50), 64, "stretch")
    assert stretched.shape == (100, 50) and stretched[:, 0].max() < 0.01


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


def test_one_study_aggregation_in_predict_and_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics.study_table is the aggregation of the report and of predict (and of the metrics themselves)."""
    import bonehpc.metrics
    import bonehpc.predict
    import bonehpc.report

    calls: list[str] = []
    real = bonehpc.metrics.study_table

    def spy(df: pd.DataFrame, *args: float) -> pd.DataFrame:
        calls.append("x")
        return real(df, *args)

    for mod in (bonehpc.metrics, bonehpc.predict):
        monkeypatch.setattr(mod, "study_table", spy)  # the report calls metrics.study_table (M.study_table)
    images = pd.DataFrame(
        {
            "image_id": [0, 1, 2],
            "path": ["a/1.png", "a/2.png", "b/1.png"],
            "study": ["a/", "a/", "b/"],
            "body_part": "HAND",
            "label": [1, 1, 0],
            "status": "ok",
            "reason": "",
            "prob": [0.2, 0.9, 0.4],
        }
    )
    st_predict = bonehpc.predict._studies(images)
    st_report = bonehpc.report.study_level(images)
    bonehpc.metrics.evaluate_predictions(images)
    assert len(calls) == 3
    assert st_predict["prob"].tolist() == st_report["prob"].tolist() == pytest.approx([0.55, 0.4])
    assert st_predict["pred"].tolist() == st_report["pred"].tolist() == [1, 0]


def _hostile(tiny_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run `bonehpc predict` with args; it must exit 2 with one line on stderr and write nothing."""
    from bonehpc.cli import main

    before = sorted(p for p in tmp_path.rglob("*"))
    ckpt = tiny_experiment / "final" / "student" / "best.pt"
    capsys.readouterr()
    rc = main(["predict", "--model", str(ckpt), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("bonehpc predict: "), err
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, not even a temporary file
    return err


def test_hostile_arguments_end_in_one_line_and_exit_2(
    tiny_experiment: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    work = tmp_path / "work"
    work.mkdir()
    inp = ["--input", str(image_folder)]
    (work / "empty.csv").write_bytes(b"")
    assert "empty CSV" in _hostile(tiny_experiment, work, capsys, "--input", str(work / "empty.csv"))
    assert "not a torch device" in _hostile(tiny_experiment, work, capsys, *inp, "--device", "banana")
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _hostile(tiny_experiment, work, capsys, *inp, "--device", "cuda:0")
    (work / "adir").mkdir()
    assert "is a folder" in _hostile(tiny_experiment, work, capsys, *inp, "--out", str(work / "adir"))
    (work / "afile").write_text("x")
    err = _hostile(tiny_experiment, work, capsys, *inp, "--out", str(work / "p.csv"), "--gradcam", str(work / "afile"))
    assert "is a file" in err
    (work / "theirs.csv").write_text("patient,notes\n1,keep me\n")
    assert "not written by bonehpc predict" in _hostile(
        tiny_experiment, work, capsys, *inp, "--out", str(work / "theirs.csv")
    )
    assert (work / "theirs.csv").read_text() == "patient,notes\n1,keep me\n"
    # a folder nobody may write to (also for root): a read-only file system
    assert "cannot write in /proc" in _hostile(tiny_experiment, work, capsys, *inp, "--out", "/proc/bonehpc/p.csv")


def test_read_only_output_folder(tiny_experiment: Path, image_folder: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    import os
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    immutable = False
    try:
        if os.geteuid() == 0:  # root ignores the mode: make the folder immutable instead
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(ro)], check=False).returncode:
                pytest.skip("root without a working chattr: cannot make a read-only folder")
            immutable = True
        err = _hostile(tiny_experiment, tmp_path, capsys, "--input", str(image_folder), "--out", str(ro / "p.csv"))
        assert "cannot write in" in err and "ro/p.csv" in err
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)], check=False)
        ro.chmod(0o755)


def test_calibrated_predictions_use_the_out_of_fold_temperature(
    tiny_experiment: Path, image_folder: Path, tmp_path: Path
) -> None:
    import json

    from bonehpc.metrics import apply_temperature

    calib = json.loads((tiny_experiment / "calibration.json").read_text())
    t, b = calib["roles"]["teacher"]["temperature"], calib["roles"]["teacher"]["bias"]
    ckpt = tiny_experiment / "fold0" / "teacher" / "best.pt"
    raw = predict(ckpt, image_folder, tmp_path / "raw.csv")
    cal = predict(ckpt, image_folder, tmp_path / "cal.csv", calibrate=True)
    ok = raw.status == "ok"
    fixed = apply_temperature(raw.loc[ok, "prob"].to_numpy(), t, b)
    np.testing.assert_allclose(cal.loc[ok, "prob"], fixed, atol=1e-5)
    # the calibrated run cuts at the cut chosen on the calibrated scale (the one it is applied on)
    assert cal.attrs["threshold"] == calib["roles"]["teacher"]["threshold"]["value_calibrated"]
    assert cal.attrs["temperature"] == pytest.approx(t) and raw.attrs["temperature"] is None
    assert cal.attrs["bias"] == pytest.approx(b)
    with pytest.raises(PredictError, match="calibration.json"):
        predict(_copy(ckpt, tmp_path), image_folder, tmp_path / "x.csv", calibrate=True)


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "lonely" / "best.pt"
    dst.parent.mkdir()
    shutil.copy(ckpt, dst)
    return dst


def test_threshold_is_the_stored_out_of_fold_operating_point(
    tiny_experiment: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """predict calls studies and images abnormal above the role's stored out-of-fold cut by default and says so;
    --threshold 0.5 / a number / youden override it; oof without a stored cut, or a bad value, is one line, exit 2."""
    from bonehpc.cli import main
    from bonehpc.metrics import read_thresholds

    op = read_thresholds(tiny_experiment)["student"]
    model = tiny_experiment / "final" / "student"
    df = predict(model, image_folder, tmp_path / "a.csv")
    assert df.attrs["threshold"] == op["value"] and "out-of-fold operating point" in df.attrs["threshold_source"]
    ok = df[df.status == "ok"]
    assert (ok["pred"] == (ok["prob"] > op["value"]).astype(int)).all()
    st = df.attrs["studies"].dropna(subset=["prob"])
    assert (st["pred"] == (st["prob"] > op["value"]).astype(int)).all()
    assert predict(model, image_folder, tmp_path / "b.csv", threshold="0.5").attrs["threshold"] == 0.5
    youden = predict(model, image_folder, tmp_path / "c.csv", threshold="youden", calibrate=True)
    assert youden.attrs["threshold"] == op["youden"]["value_calibrated"]

    assert main(["predict", "--model", str(model), "--input", str(image_folder), "--out", str(tmp_path / "d.csv")]) == 0
    assert f"threshold {op['value']:.4f}: out-of-fold operating point of student" in capsys.readouterr().out
    alone = tmp_path / "alone" / "best.pt"  # a checkpoint outside any experiment: no stored cut
    alone.parent.mkdir()
    shutil.copy(model / "best.pt", alone)
    assert predict(alone, image_folder, tmp_path / "e.csv").attrs["threshold"] == 0.5  # default falls back
    for bad in ("oof", "1.5", "high"):
        rc = main(["predict", "--model", str(alone), "--input", str(image_folder), "--out", str(tmp_path / "f.csv"),
                   "--threshold", bad])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "--threshold" in err
        assert not (tmp_path / "f.csv").exists()
