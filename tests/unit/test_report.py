"""The aggregated report, built from a small real experiment (2 folds x teacher+student, final models, holdout)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from tinyexp import tiny_overrides

SECTION_IDS = ("overview", "cv", "holdout", "bodyparts", "curves", "learning", "kd", "seed", "tuning", "slurm", "repro")


def build_tiny_experiment(base: Path, synth_root: Path, shards_dir: Path) -> Path:
    """Train the tiny experiment under base/runs/tiny once (a stamp file makes later calls free)."""
    from bonehpc.config import load_config, save_config
    from bonehpc.evaluate import evaluate_holdout
    from bonehpc.paths import ExperimentPaths
    from bonehpc.train import run

    cfg = load_config(
        None,
        tiny_overrides(base / "runs", synth_root, shards_dir),
    )
    paths = ExperimentPaths.of(cfg)
    stamp = paths.root / ".test-complete"
    if stamp.is_file():
        return paths.root
    save_config(cfg, paths.config)
    for fold in [0, 1, "final"]:
        for role in ("teacher", "student"):
            run(cfg, fold, role)
    evaluate_holdout(cfg)
    stamp.write_text("ok\n")
    return paths.root


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory: pytest.TempPathFactory, synth_root: Path, shards_dir: Path) -> Path:
    return build_tiny_experiment(tmp_path_factory.getbasetemp() / "tiny_experiment", synth_root, shards_dir)


@pytest.fixture(scope="module")
def built(tiny_experiment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the experiment (tests below damage their copies) with its report built."""
    from bonehpc.report import build_report

    exp = tmp_path_factory.mktemp("report") / "tiny"
    shutil.copytree(tiny_experiment, exp, ignore=shutil.ignore_patterns("*.pt"))
    build_report(exp)
    return exp


def _sklearn_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    pred = (p > 0.5).astype(int)
    return {
        "accuracy": accuracy_score(y, pred),
        "precision": precision_score(y, pred, zero_division=0),
        "recall": recall_score(y, pred, zero_division=0),
        "f1": f1_score(y, pred, zero_division=0),
        "auroc": roc_auc_score(y, p) if len(set(y)) == 2 else np.nan,
        # bonehpc.metrics: NaN only when labels and predictions are one and the same class (0/0)
        "kappa": np.nan if set(y) == set(pred) and len(set(y)) == 1 else cohen_kappa_score(y, pred),
    }


def _independent(preds: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Image and study level metrics computed here, without bonehpc.metrics."""
    studies = preds.groupby("study").agg(label=("label", "max"), prob=("prob", "mean"))
    return {
        "image": _sklearn_metrics(preds["label"].to_numpy(), preds["prob"].to_numpy()),
        "study": _sklearn_metrics(studies["label"].to_numpy(), studies["prob"].to_numpy()),
    }


def _assert_row(row: pd.Series, expected: dict[str, float], where: str) -> None:
    for metric, value in expected.items():
        got = float(row[metric])
        if np.isnan(value):
            assert np.isnan(got), f"{where} {metric}: expected NaN, got {got}"
        else:
            assert got == pytest.approx(value, abs=1e-9), f"{where} {metric}"


def test_every_section_present_and_self_contained(built: Path) -> None:
    report = built / "report"
    html = (report / "index.html").read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in html, sid
    assert "section failed" not in html
    # Self-contained: every image inline, nothing fetched from elsewhere.
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(srcs) >= 6
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(https?:)?//', html)
    for fig in ("roc_pr_cv_teacher", "roc_pr_cv_student", "roc_pr_holdout", "confusion", "calibration"):
        assert f'<figure id="{fig}">' in html, fig
        assert (report / f"{fig}.png").stat().st_size > 1000
    for fig in ("learning_teacher", "learning_student"):
        assert f'<figure id="{fig}">' in html
    md = (report / "report.md").read_text()
    for target in re.findall(r"\]\(([^)]+)\)", md):
        assert (report / target).is_file(), f"report.md links a missing file {target}"
    # Units, the MURA study protocol and the seed's numbers are stated.
    assert "mean of the abnormal probabilities of its views" in html and "&gt; 0.5" in html
    assert "0.8274" in html and "0.822" in html and "seed" in html
    assert "Slurm accounting" in html


def test_cv_and_holdout_tables_match_the_predictions(built: Path) -> None:
    cv = pd.read_csv(built / "report" / "cv_metrics.csv")
    assert set(cv["status"]) == {"completed"}
    assert len(cv) == 2 * 2 * 2  # roles x folds x levels
    for _, row in cv.iterrows():
        preds = pd.read_csv(built / row["fold"] / row["role"] / "predictions_val.csv")
        exp = _independent(preds)[row["level"]]
        _assert_row(row, exp, f"{row['fold']} {row['role']} {row['level']}")
        unit_n = len(preds) if row["level"] == "image" else preds["study"].nunique()
        assert int(row["n"]) == unit_n
    summary = pd.read_csv(built / "report" / "cv_summary.csv")
    for (role, level, metric), s in summary.set_index(["role", "level", "metric"]).iterrows():
        vals = cv[(cv.role == role) & (cv.level == level)][metric].to_numpy(float)
        if not np.isnan(vals).all():
            assert s["mean"] == pytest.approx(np.nanmean(vals), abs=1e-12)
            assert s["std"] == pytest.approx(np.nanstd(vals), abs=1e-12)
    hold = pd.read_csv(built / "report" / "holdout_metrics.csv")
    assert set(hold["model"]) == {"final_teacher", "final_student", "ensemble_teacher", "ensemble_student"}
    for _, row in hold.iterrows():
        preds = pd.read_csv(built / "holdout" / row["model"] / "predictions.csv")
        _assert_row(row, _independent(preds)[row["level"]], f"holdout {row['model']} {row['level']}")


def test_body_part_and_teacher_student_tables(built: Path) -> None:
    parts = pd.read_csv(built / "report" / "body_part_kappa.csv")
    assert parts["body_part"].iloc[-1] == "ALL"
    preds = pd.read_csv(built / "holdout" / "final_teacher" / "predictions.csv")
    studies = preds.groupby("study").agg(label=("label", "max"), prob=("prob", "mean"), part=("body_part", "first"))
    for _, row in parts.iterrows():
        sub = studies if row["body_part"] == "ALL" else studies[studies.part == row["body_part"]]
        if len(sub) == 0:
            continue
        n0, n1 = int((sub.label == 0).sum()), int((sub.label == 1).sum())
        assert row["holdout studies (normal/abnormal)"] == f"{n0}/{n1}"
        pred = (sub.prob > 0.5).astype(int)
        if sub.label.nunique() == 2 or pred.nunique() == 2:
            assert row["kappa holdout final_teacher"] == pytest.approx(cohen_kappa_score(sub.label, pred), abs=1e-9)
    kd = pd.read_csv(built / "report" / "teacher_vs_student.csv")
    assert list(kd["role"]) == ["teacher", "student", "teacher − student"]
    info = json.loads((built / "fold0" / "teacher" / "metrics.json").read_text())["model"]
    assert kd.loc[0, "params (M)"] == pytest.approx(info["params"] / 1e6)
    assert kd.loc[2, "params (M)"] == pytest.approx(kd.loc[0, "params (M)"] - kd.loc[1, "params (M)"])


def test_reproducibility_names_versions_seeds_and_data_hash(built: Path) -> None:
    repro = pd.read_csv(built / "report" / "reproducibility.csv").set_index("item")["value"]
    for pkg in ("torch", "timm", "nvidia-dali", "optuna", "submitit", "albumentations", "h5py", "scikit-learn"):
        assert f"package {pkg}" in repro.index
    assert repro["package torch"].startswith("2.")
    assert repro["train.seed"] == "0"
    manifest = json.loads((Path(repro["shards folder"]) / "manifest.json").read_text())
    assert repro["shards source manifest SHA-256 (manifest.json)"] == manifest["source_manifest_sha256"]
    html = (built / "report" / "index.html").read_text()
    assert "Resolved config (config.yaml)" in html and "num_folds: 2" in html


def test_partial_experiment_marks_what_is_missing(built: Path, tmp_path: Path) -> None:
    from bonehpc.report import build_report

    exp = tmp_path / "tiny"
    shutil.copytree(built, exp, ignore=shutil.ignore_patterns("report"))
    shutil.rmtree(exp / "fold1" / "student")
    shutil.rmtree(exp / "holdout" / "ensemble_student")
    (exp / "fold0" / "student" / "metrics.json").unlink()  # as if still running
    build_report(exp)
    runs = pd.read_csv(exp / "report" / "runs.csv")
    state = runs.set_index(["run", "role"])["state"]
    assert state[("fold1", "student")] == "missing"
    assert state[("fold0", "student")] == "incomplete"
    assert state[("holdout", "ensemble_student")] == "missing"
    assert state[("fold0", "teacher")] == "completed"
    html = (exp / "report" / "index.html").read_text()
    assert "fold1 student: missing: no run directory" in html
    assert "fold0 student: missing: no metrics.json" in html
    assert "ensemble_student: missing" in html
    assert "section failed" not in html
    cv = pd.read_csv(exp / "report" / "cv_metrics.csv")
    student = cv[cv.role == "student"]
    assert not (student["status"] == "completed").any()
    summary = pd.read_csv(exp / "report" / "cv_summary.csv")
    assert (summary[summary.role == "student"]["folds"] == 0).all()
    assert (summary[summary.role == "teacher"]["folds"] == 2).all()


def test_tuning_section_reads_the_optuna_journal(built: Path, tmp_path: Path) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from bonehpc.report import build_report

    exp = tmp_path / "tiny"
    shutil.copytree(built, exp, ignore=shutil.ignore_patterns("report"))
    journal = exp / "tune" / "journal.log"
    journal.parent.mkdir()
    study = optuna.create_study(
        study_name="tiny", direction="maximize", storage=JournalStorage(JournalFileBackend(str(journal)))
    )

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("student.lr", 1e-4, 3e-3, log=True)
        alpha = trial.suggest_float("distill.alpha", 0.1, 0.9)
        if trial.number == 3:
            raise optuna.TrialPruned()
        return -abs(np.log10(lr) + 3) - abs(alpha - 0.5)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=6)
    build_report(exp)
    html = (exp / "report" / "index.html").read_text()
    assert '<figure id="tune_history">' in html and '<figure id="tune_importances">' in html
    states = pd.read_csv(exp / "report" / "tune_trial_states.csv").set_index("state")["count"]
    assert states["COMPLETE"] == 5 and states["PRUNED"] == 1
    best = pd.read_csv(exp / "report" / "tune_best_params.csv").set_index("param")["value"]
    assert best["student.lr"] == pytest.approx(study.best_params["student.lr"])
    assert "no tuning study" in (built / "report" / "index.html").read_text()


def test_cli_report_and_missing_experiment(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bonehpc.cli import main
    from bonehpc.report import build_report

    root = tmp_path / "runs"
    shutil.copytree(built, root / "tiny", ignore=shutil.ignore_patterns("report"))
    assert main(["report", "--exp", "tiny", "--run-root", str(root)]) == 0
    assert (root / "tiny" / "report" / "index.html").is_file()
    assert capsys.readouterr().out.strip().endswith("index.html")
    assert main(["report", "--exp", "nope", "--run-root", str(root)]) == 2
    with pytest.raises(FileNotFoundError, match="nope"):
        build_report(root / "nope")


def test_inference_speed_is_timed_from_the_checkpoints(tiny_experiment: Path) -> None:
    from bonehpc.report import load_experiment, measure_inference

    exp = load_experiment(tiny_experiment)
    for role in ("teacher", "student"):
        got = measure_inference(exp, role)
        assert got["img_per_s"] > 0 and "batch 8, 64 px" in got["device"]
