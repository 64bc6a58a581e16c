"""The aggregated report, built from a small real experiment (2 folds x teacher+student, final models, holdout)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from tinyexp import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]

SECTION_IDS = (
    "overview",
    "data",
    "cv",
    "holdout",
    "operating",
    "bodyparts",
    "curves",
    "learning",
    "kd",
    "kdgain",
    "seed",
    "tuning",
    "slurm",
    "repro",
)


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


def test_confidence_intervals_of_holdout_cv_parts_and_differences(built: Path) -> None:
    from bonehpc.metrics import N_BOOT, study_table

    report = built / "report"
    long = pd.read_csv(report / "holdout_ci_long.csv")
    hold = pd.read_csv(report / "holdout_metrics.csv")
    for model in ("final_teacher", "final_student", "ensemble_teacher", "ensemble_student"):
        preds = pd.read_csv(built / "holdout" / model / "predictions.csv")
        rows = long[(long.model == model) & (long.body_part == "ALL")].set_index("metric")
        assert set(rows.index) == {"kappa", "auroc", "f1", "accuracy"}
        study = hold[(hold.model == model) & (hold.level == "study")].iloc[0]
        for metric in ("kappa", "auroc", "f1", "accuracy"):
            exp = float(study[metric])
            assert rows.loc[metric, "estimate"] == pytest.approx(exp, abs=1e-9, nan_ok=True), (model, metric)
        assert (rows["n_boot"] == N_BOOT).all() and (rows["n_studies"] == preds["study"].nunique()).all()
        ok = rows.dropna(subset=["ci_low"])
        assert (ok["ci_low"] <= ok["ci_high"] + 1e-12).all()
        assert set(long[long.model == model].body_part) == {"ALL", *study_table(preds)["body_part"]}
    shown = pd.read_csv(report / "holdout_ci.csv")
    assert list(shown["model"]) == ["final_teacher", "final_student", "ensemble_teacher", "ensemble_student"]
    assert shown["kappa [95 % CI]"].str.match(r"^-?\d\.\d{3} \[(-?\d\.\d{3}, -?\d\.\d{3}|undefined)\]$|^—$").all()
    pooled = pd.read_csv(report / "cv_pooled_ci.csv")
    assert list(pooled["role"]) == ["teacher", "student"]
    oof = pd.concat(pd.read_csv(built / f"fold{k}" / "teacher" / "predictions_val.csv") for k in (0, 1))
    assert int(pooled.loc[0, "studies"]) == oof["study"].nunique()
    diffs = pd.read_csv(report / "teacher_minus_student_ci.csv")
    assert list(diffs["comparison"]) == [
        "CV pooled out-of-fold: teacher − student",
        "holdout: final_teacher − final_student",
        "holdout: ensemble_teacher − ensemble_student",
    ]
    parts = pd.read_csv(report / "body_part_kappa_ci.csv")
    assert parts["body_part"].iloc[-1] == "ALL" and "kappa holdout final_teacher" in parts.columns
    html = (report / "index.html").read_text()
    assert "bootstrap resamples of patients" in html and "paired" in html


def test_holdout_protocol_calibration_data_counts_and_synthetic_seed_section(built: Path) -> None:
    from bonehpc.metrics import apply_temperature, expected_calibration_error, study_table

    report = built / "report"
    html = (report / "index.html").read_text()
    assert "slice of the train patients is held out of their training and monitors it" in html
    assert "they keep their last epoch" in html
    assert "The official valid split is evaluated once" in html
    # ECE beside the reliability diagram; the temperature was fitted out-of-fold by evaluate_holdout
    ece = pd.read_csv(report / "calibration_ece.csv").set_index("predictions")
    preds = pd.read_csv(built / "holdout" / "final_student" / "predictions.csv")
    st = study_table(preds)
    assert ece.loc["holdout final_student", "ECE"] == pytest.approx(expected_calibration_error(st.label, st.prob))
    calib = json.loads((built / "calibration.json").read_text())
    t = calib["roles"]["student"]["temperature"]
    assert ece.loc["holdout final_student", "temperature (fitted out-of-fold)"] == pytest.approx(t)
    b = calib["roles"]["student"]["bias"]
    assert ece.loc["holdout final_student", "bias (fitted out-of-fold)"] == pytest.approx(b)
    # mean probability vs prevalence: before / after the class-weight correction / after the OOF recalibration
    means = pd.read_csv(report / "mean_probability.csv").set_index("predictions")
    assert means.loc["holdout final_student", "after correction"] == pytest.approx(preds["prob"].mean())
    fixed = apply_temperature(preds["prob"].to_numpy(), t, b).mean()
    assert means.loc["holdout final_student", "after recalibration"] == pytest.approx(fixed)
    oof = means.loc["out-of-fold student"]
    assert abs(oof["after recalibration"] - oof["prevalence"]) < 0.01
    assert "never on the holdout" in html and "ECE" in html
    # packed / rejected / lost from the shard folder
    counts = pd.read_csv(report / "data_counts.csv").set_index("what")["count"]
    cfg = yaml.safe_load((built / "config.yaml").read_text())
    index = pd.read_csv(Path(cfg["data"]["shards"]) / "index.csv")
    assert int(counts["images packed"]) == len(index)
    # the tests' data are synthetic: no side-by-side with the seed's numbers
    assert "Not comparable: this experiment ran on synthetic data" in html
    assert not (report / "seed_comparison_cv.csv").exists()
    # no baseline role in this experiment: the KD-gain section says so and nothing is reported missing for it
    assert "No baseline in this experiment" in html
    assert "baseline" not in set(pd.read_csv(report / "runs.csv")["role"])


def test_kd_gain_with_a_baseline_role(built: Path, tmp_path: Path) -> None:
    """With the optional 'baseline' role (student without KD) the report compares it per fold and pooled."""
    from bonehpc.paths import ROLES
    from bonehpc.report import build_report

    assert "baseline" in ROLES
    exp = tmp_path / "tiny"
    shutil.copytree(built, exp, ignore=shutil.ignore_patterns("report"))
    rng = np.random.default_rng(0)
    for src, dst in [(exp / f"fold{k}" / "student", exp / f"fold{k}" / "baseline") for k in (0, 1)] + [
        (exp / "holdout" / f"{kind}_student", exp / "holdout" / f"{kind}_baseline") for kind in ("final", "ensemble")
    ]:
        shutil.copytree(src, dst)
        name = "predictions_val.csv" if (dst / "predictions_val.csv").is_file() else "predictions.csv"
        p = pd.read_csv(dst / name)
        p["prob"] = rng.uniform(0, 1, len(p))  # a baseline that guesses
        p.to_csv(dst / name, index=False)
    build_report(exp)
    folds = pd.read_csv(exp / "report" / "kd_gain_folds.csv").set_index("fold")
    student = pd.read_csv(exp / "fold0" / "student" / "predictions_val.csv")
    baseline = pd.read_csv(exp / "fold0" / "baseline" / "predictions_val.csv")
    y_s = student.groupby("study").agg(label=("label", "first"), prob=("prob", "mean"))
    y_b = baseline.groupby("study").agg(label=("label", "first"), prob=("prob", "mean"))
    gain = roc_auc_score(y_s.label, y_s.prob) - roc_auc_score(y_b.label, y_b.prob)
    assert folds.loc["fold0", "KD gain auroc (student − baseline)"] == pytest.approx(gain)
    ci = pd.read_csv(exp / "report" / "kd_gain_ci.csv")
    assert list(ci["comparison"]) == [
        "CV pooled out-of-fold: student − baseline",
        "CV pooled out-of-fold: teacher − student",
        "holdout: final_student − final_baseline",
        "holdout: ensemble_student − ensemble_baseline",
    ]
    runs = pd.read_csv(exp / "report" / "runs.csv")
    assert {"baseline", "final_baseline"} <= set(runs["role"])
    assert "section failed" not in (exp / "report" / "index.html").read_text()


def test_failed_tasks_show_their_last_exception_line() -> None:
    from bonehpc.report import failure_lines

    acct = pd.DataFrame(
        [
            {"fold": "fold0", "role": "teacher", "state": "COMPLETED", "error": None},
            {"fold": "fold1", "role": "student", "state": "FAILED", "error": "ValueError: bad shard"},
        ]
    )
    assert failure_lines(acct) == ["fold1 student FAILED: ValueError: bad shard"]
    assert failure_lines(acct.drop(columns="error")) == []


def test_the_report_names_no_run_file_itself() -> None:
    """bonehpc/report/ reads an experiment folder through bonehpc.paths only: no string in it is a file name
    (config.yaml, metrics.json, predictions_val.csv, best.pt, journal.log, ...), so a renamed run file
    cannot leave the report reading the old name."""
    import ast

    import bonehpc.paths as paths_mod
    from bonehpc.data import shards

    known = {v for k, v in vars(paths_mod).items() if k.isupper() and isinstance(v, str) and "." in v}
    known |= {v for k, v in vars(shards).items() if k.isupper() and isinstance(v, str) and "." in v}
    exp = paths_mod.ExperimentPaths(Path("/x"))
    known |= {p.name for p in (exp.config, exp.manifest, exp.folds, exp.jobs, exp.tune_journal, exp.best_params)}
    file_like = re.compile(r"[\w*./<>-]*\w\.(json|jsonl|csv|pt|yaml|yml|log|html|md|h5|png)")
    found = []
    for path in sorted((ROOT / "bonehpc" / "report").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None
            if text is not None and (text in known or file_like.fullmatch(text)):
                found.append(f"{path.name}:{node.lineno}: {text!r}")
    assert "metrics.json" in known and "predictions_val.csv" in known and "journal.log" in known
    assert not found, "literal file names in the report (use bonehpc.paths):\n" + "\n".join(found)


def test_operating_point_section_and_the_final_model_flag(built: Path, tmp_path: Path) -> None:
    """Kappa at 0.5 and at the out-of-fold cut (cross-fitted for CV) with CIs, overall and per body part; a final
    model whose holdout kappa leaves its ensemble's CI is flagged in the report."""
    from bonehpc.metrics import evaluate_predictions, read_thresholds
    from bonehpc.report import build_report

    rep = built / "report"
    ci = pd.read_csv(rep / "operating_point_ci_long.csv")
    op = read_thresholds(built)["teacher"]
    sets = set(ci["model"])
    cut = f"oof {op['value']:.3f}"
    assert {"CV teacher @ 0.5", "CV teacher @ oof (cross-fitted)", f"holdout final_teacher @ {cut}"} <= sets
    assert {"holdout final_teacher @ 0.5", f"holdout ensemble_teacher @ {cut}"} <= sets
    preds = pd.read_csv(built / "holdout" / "final_teacher" / "predictions.csv")
    row = ci[(ci.model == f"holdout final_teacher @ {cut}") & (ci.metric == "kappa") & (ci.body_part == "ALL")]
    assert row["estimate"].iloc[0] == pytest.approx(evaluate_predictions(preds, op["value"])["study_kappa"])
    assert {"ALL", *preds["body_part"]} <= set(ci["body_part"])
    parts = pd.read_csv(rep / "operating_point_body_parts.csv")
    assert f"kappa holdout final_teacher @ {cut}" in parts.columns and parts["body_part"].iloc[-1] == "ALL"
    assert "operating_points" in (rep / "index.html").read_text()

    exp = tmp_path / "tiny"
    shutil.copytree(built, exp, ignore=shutil.ignore_patterns("report"))
    bad = exp / "holdout" / "final_teacher" / "predictions.csv"
    ens = pd.read_csv(exp / "holdout" / "ensemble_teacher" / "predictions.csv")
    ens.assign(prob=np.where(ens["label"] == 1, 0.9, 0.1)).to_csv(
        exp / "holdout" / "ensemble_teacher" / "predictions.csv", index=False
    )
    preds.assign(prob=np.where(preds["label"] == 1, 0.1, 0.9)).to_csv(bad, index=False)  # a bad epoch, exaggerated
    build_report(exp)
    md = (exp / "report" / "report.md").read_text()
    flags = re.findall(
        r"FLAG final_teacher: holdout study kappa -0\.\d+ at (0\.5|oof [\d.]+) is outside the 95 % CI "
        r"\[1\.000, 1\.000\]",
        md,
    )
    assert "0.5" in flags and cut in flags  # both cuts, in the holdout and the operating point sections
    assert "> ⚠ FLAG final_teacher" in md and "**MISSING** FLAG" not in md  # a warning, not a missing result
    assert '<p class="flag">FLAG final_teacher' in (exp / "report" / "index.html").read_text()
