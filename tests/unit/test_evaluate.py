"""Holdout evaluation: final model and fold ensemble on the official valid split, missing folds recorded."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bonehpc.config import apply_overrides
from bonehpc.evaluate import evaluate_holdout, predict_checkpoint
from bonehpc.paths import ExperimentPaths
from bonehpc.train import run


def test_holdout_final_and_ensemble(tiny_cfg, monkeypatch) -> None:  # noqa: ANN001
    import bonehpc.metrics as M
    from bonehpc.checkpoint import load_checkpoint
    from bonehpc.data.shards import ShardReader

    cfg = apply_overrides(tiny_cfg, {"teacher.model": "hybrid_tiny", "train.max_steps_per_epoch": 2})
    paths = ExperimentPaths.of(cfg)
    for fold in (0, 1, "final"):
        run(cfg, fold, "teacher")

    # the operating point is fitted on out-of-fold rows only: a spy sees every study it is given
    seen: list[pd.DataFrame] = []
    real_fit = M.fit_operating_point

    def spy(studies: pd.DataFrame, *rest: object) -> dict:
        seen.extend([studies.copy(), *(r for r in rest if isinstance(r, pd.DataFrame))])
        return real_fit(studies, *rest)

    monkeypatch.setattr(M, "fit_operating_point", spy)
    fitted: list[tuple[np.ndarray, np.ndarray]] = []
    real_cal = M.fit_calibration

    def cal_spy(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
        fitted.append((np.asarray(y).copy(), np.asarray(p, dtype=float).copy()))
        return real_cal(y, p)

    monkeypatch.setattr(M, "fit_calibration", cal_spy)
    results = evaluate_holdout(cfg)
    index = ShardReader(cfg.data.shards).index
    assert len(seen) == 2 and all(len(t) for t in seen)  # the study table and its temperature-scaled twin
    for table in seen:
        assert not set(table["study"]) & set(index.loc[index["split"] == "valid", "study"])  # no holdout row
    oof = pd.concat([pd.read_csv(paths.role_dir(k, "teacher") / "predictions_val.csv") for k in (0, 1)])
    assert set(seen[0]["study"]) == set(oof["study"])  # exactly the pooled out-of-fold studies
    # the temperature and bias are fitted on exactly the pooled out-of-fold image rows (no holdout row)
    assert len(fitted) == 1
    np.testing.assert_allclose(np.sort(fitted[0][1]), np.sort(oof["prob"].to_numpy(float)))
    assert fitted[0][0].sum() == oof["label"].sum()
    doc = json.loads((paths.root / "calibration.json").read_text())["roles"]["teacher"]
    assert abs(doc["mean_prob_calibrated"] - doc["prevalence"]) < 0.01  # the bias puts the OOF mean on prevalence
    op = M.read_thresholds(paths.root)["teacher"]
    assert op["value"] == pytest.approx(M.choose_threshold(seen[0]["label"], seen[0]["prob"])[0])
    assert set(op["cross_fitted"]) == {"0", "1"}

    # class weights are recorded by training and the probabilities corrected by their logit shift
    summary = json.loads((paths.role_dir(0, "teacher") / "metrics.json").read_text())
    rec = summary["prob_correction"]
    w0, w1 = rec["class_weights"]
    assert rec["logit_shift"] == pytest.approx(np.log(w1 / w0)) and rec["logit_shift"] != 0
    assert load_checkpoint(paths.role_dir(0, "teacher") / "best.pt")["prob_correction"] == rec
    # No student was trained: those models are skipped, not faked.
    assert set(results) == {"final_teacher", "ensemble_teacher"}

    final = pd.read_csv(paths.holdout_dir("final_teacher") / "predictions.csv")
    assert list(final.columns) == ["image_id", "study", "body_part", "label", "prob"]
    selection = pd.read_csv(paths.role_dir("final", "teacher") / "predictions_val.csv")
    assert not set(selection["image_id"]) & set(final["image_id"])  # best.pt was picked on train patients
    best = paths.role_dir("final", "teacher") / "best.pt"
    direct = predict_checkpoint(cfg, best, final["image_id"].to_numpy())
    assert final["image_id"].tolist() == direct["image_id"].tolist()  # every valid image once
    np.testing.assert_allclose(final["prob"], direct["prob"], atol=1e-6)
    meta = json.loads((paths.holdout_dir("final_teacher") / "metrics.json").read_text())
    assert meta["status"] == "completed" and meta["kind"] == "final" and meta["n_images"] == len(final)
    assert meta["threshold"]["value"] == op["value"]  # applied unchanged to the holdout
    assert meta["metrics_oof_threshold"] == pytest.approx(M.evaluate_predictions(final, op["value"]), nan_ok=True)
    assert results["final_teacher"]["oof_threshold"] == op["value"]
    assert meta["metrics"]["study_auroc"] == pytest.approx(results["final_teacher"]["study_auroc"], nan_ok=True)

    ens = pd.read_csv(paths.holdout_dir("ensemble_teacher") / "predictions.csv")
    per_fold = [
        predict_checkpoint(cfg, paths.role_dir(k, "teacher") / "best.pt", final["image_id"].to_numpy())["prob"]
        for k in (0, 1)
    ]
    np.testing.assert_allclose(ens["prob"], np.mean(per_fold, axis=0), atol=1e-6)
    meta = json.loads((paths.holdout_dir("ensemble_teacher") / "metrics.json").read_text())
    assert meta["folds_used"] == [0, 1] and meta["folds_missing"] == []

    # A fold that disappears is reported as missing; the ensemble averages what is left.
    (paths.role_dir(1, "teacher") / "best.pt").unlink()
    evaluate_holdout(cfg)
    meta = json.loads((paths.holdout_dir("ensemble_teacher") / "metrics.json").read_text())
    assert meta["folds_used"] == [0] and meta["folds_missing"] == [1]
    ens = pd.read_csv(paths.holdout_dir("ensemble_teacher") / "predictions.csv")
    np.testing.assert_allclose(ens["prob"], per_fold[0], atol=1e-6)


def test_cli_evaluate_without_checkpoints_fails_clearly(tiny_cfg, tmp_path, caplog) -> None:  # noqa: ANN001
    from bonehpc.cli import main
    from bonehpc.config import save_config

    cfg_path = save_config(tiny_cfg, tmp_path / "cfg.yaml")
    assert main(["evaluate", "--config", str(cfg_path)]) == 1
    assert "nothing to evaluate" in caplog.text
    assert main(["train", "--config", str(cfg_path), "--fold", "nine", "--role", "teacher"]) == 2
