"""Patient-grouped, stratified folds: grouping, coverage, balance, determinism, holdout, files and CLI."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bonehpc.cli import main as cli_main
from bonehpc.data.folds import (
    HOLDOUT_FOLD,
    FoldError,
    apply_folds,
    fold_summary,
    make_folds,
    read_folds,
    write_folds,
)
from bonehpc.data.mura import build_manifest, write_manifest
from bonehpc.data.synthetic import generate


@pytest.fixture(scope="module")
def big_manifest(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """150 patients at 64 px: enough studies per fold to check the stratification."""
    root = tmp_path_factory.mktemp("synth150")
    generate(root, patients=150, seed=11, max_side=64)
    return build_manifest(root)


def test_every_train_patient_in_exactly_one_fold(manifest: pd.DataFrame) -> None:
    folds = make_folds(manifest, 3, seed=0)
    assert list(folds.columns) == ["patient", "fold"] and folds["fold"].dtype == "int64"
    train_patients = set(manifest.loc[manifest["split"] == "train", "patient"])
    assert set(folds["patient"]) == train_patients
    assert folds["patient"].is_unique
    assert set(folds["fold"]) == {0, 1, 2}
    with_folds = apply_folds(manifest, folds)
    assert (with_folds.groupby("patient")["fold"].nunique() == 1).all(), "a patient is split across folds"
    assert (with_folds.groupby("study")["fold"].nunique() == 1).all()


def test_valid_split_is_the_holdout(manifest: pd.DataFrame) -> None:
    folds = make_folds(manifest, 3, seed=0)
    assert not folds["patient"].str.startswith("valid/").any()
    with_folds = apply_folds(manifest, folds)
    assert list(with_folds.columns) == [*manifest.columns, "fold"]
    assert with_folds["fold"].dtype == "int64"
    assert (with_folds.loc[with_folds["split"] == "valid", "fold"] == HOLDOUT_FOLD).all()
    assert (with_folds.loc[with_folds["split"] == "train", "fold"] >= 0).all()
    pd.testing.assert_frame_equal(with_folds.drop(columns="fold"), manifest)


def test_folds_balance_abnormal_rate(big_manifest: pd.DataFrame) -> None:
    train_studies = big_manifest[big_manifest["split"] == "train"].drop_duplicates("study")
    overall = train_studies["label"].mean()
    table = fold_summary(apply_folds(big_manifest, make_folds(big_manifest, 5, seed=0)))
    cv = table[table["fold"] != HOLDOUT_FOLD]
    assert list(cv["fold"]) == [0, 1, 2, 3, 4]
    assert cv["studies"].min() >= 0.7 * cv["studies"].mean(), cv
    # measured on this set: at most 0.05 from the overall rate over seeds 0-4
    assert (cv["abnormal_rate"] - overall).abs().max() <= 0.075, (overall, cv)


def test_deterministic_by_seed(big_manifest: pd.DataFrame) -> None:
    a = make_folds(big_manifest, 5, seed=1)
    pd.testing.assert_frame_equal(a, make_folds(big_manifest, 5, seed=1))
    assert not a.equals(make_folds(big_manifest, 5, seed=2))
    shuffled = big_manifest.sample(frac=1.0, random_state=0)
    pd.testing.assert_frame_equal(make_folds(shuffled, 5, seed=1), a)


def test_too_few_patients(manifest: pd.DataFrame) -> None:
    n_train = manifest.loc[manifest["split"] == "train", "patient"].nunique()
    with pytest.raises(FoldError, match=f"only {n_train} train patient.*{n_train + 1} folds"):
        make_folds(manifest, n_train + 1, seed=0)
    with pytest.raises(FoldError, match="at least 2 folds"):
        make_folds(manifest, 1, seed=0)


def test_apply_folds_mismatch(manifest: pd.DataFrame) -> None:
    folds = make_folds(manifest, 3, seed=0)
    with pytest.raises(FoldError, match="1 train patient.*no fold"):
        apply_folds(manifest, folds.iloc[1:])
    valid_patient = manifest.loc[manifest["split"] == "valid", "patient"].iloc[0]
    extra = pd.concat([folds, pd.DataFrame({"patient": [valid_patient], "fold": [0]})], ignore_index=True)
    with pytest.raises(FoldError, match=f"not train patients.*holdout.*{valid_patient}"):
        apply_folds(manifest, extra)
    with pytest.raises(FoldError, match="more than one fold"):
        apply_folds(manifest, pd.concat([folds, folds.iloc[:1]], ignore_index=True))


def test_files_round_trip(manifest: pd.DataFrame, tmp_path: Path) -> None:
    folds = make_folds(manifest, 3, seed=0)
    pd.testing.assert_frame_equal(read_folds(write_folds(folds, tmp_path / "x" / "folds.csv")), folds)
    with pytest.raises(FoldError, match="not found"):
        read_folds(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("patient,fold\ntrain/patient00001,-3\n")
    with pytest.raises(FoldError, match="integer >= 0.*data row 1"):
        read_folds(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("patient\ntrain/patient00001\n")
    with pytest.raises(FoldError, match="missing column.*fold"):
        read_folds(tmp_path / "cols.csv")


def test_fold_summary_totals(manifest: pd.DataFrame) -> None:
    with_folds = apply_folds(manifest, make_folds(manifest, 3, seed=0))
    table = fold_summary(with_folds)
    assert list(table["fold"]) == [0, 1, 2, HOLDOUT_FOLD]
    assert table["images"].sum() == len(manifest)
    assert table["studies"].sum() == manifest["study"].nunique()
    assert table["patients"].sum() == manifest["patient"].nunique()
    holdout = table[table["fold"] == HOLDOUT_FOLD].iloc[0]
    assert holdout["split"] == "valid" and holdout["images"] == (manifest["split"] == "valid").sum()
    with pytest.raises(FoldError, match="fold column"):
        fold_summary(manifest)


def test_cli_folds(manifest: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_manifest(manifest, tmp_path / "manifest.csv")
    out = tmp_path / "folds.csv"
    assert cli_main(["folds", "--manifest", str(path), "--k", "3", "--seed", "4", "--out", str(out)]) == 0
    assert "abnormal_rate" in capsys.readouterr().out
    pd.testing.assert_frame_equal(read_folds(out), make_folds(manifest, 3, seed=4))
    assert cli_main(["folds", "--manifest", str(path), "--k", "500"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bonehpc: folds error: only") and err.count("\n") == 1
    assert cli_main(["folds", "--manifest", str(tmp_path / "missing.csv")]) == 2
    assert "manifest file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- one home for the split

ROOT = Path(__file__).resolve().parents[2]


def _calls(name: str) -> list[str]:
    """'path:function' of every call of `name` (a bare or attribute call) in bonehpc/ and jobs/."""
    import ast

    out = []
    for pkg in ("bonehpc", "jobs"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call):
                        f = node.func
                        called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                        if called == name:
                            out.append(f"{path.relative_to(ROOT)}:{fn.name}")
    return sorted(set(out))


def test_folds_csv_has_one_writer() -> None:
    """An experiment's folds.csv is written by ensure_folds only (submission and training both call it); the
    other caller of write_folds is `bonehpc folds --out`, the stand-alone tool that writes where it is told."""
    assert _calls("write_folds") == ["bonehpc/cli/data.py:cmd_folds", "bonehpc/data/folds.py:ensure_folds"]
    assert _calls("make_folds") == [
        "bonehpc/cli/data.py:cmd_folds",
        "bonehpc/data/folds.py:ensure_folds",
        "bonehpc/data/folds.py:final_selection",
    ]


def test_submission_and_training_write_the_same_folds(tiny_cfg, shards_dir: Path) -> None:  # noqa: ANN001
    """prepare_experiment (from the packed manifest) and training (from the shard index) go through
    ensure_folds: the same file, and training keeps the existing one."""
    from bonehpc.data.folds import ensure_folds
    from bonehpc.data.shards import ShardReader
    from bonehpc.paths import ExperimentPaths
    from jobs.submit import prepare_experiment

    paths = prepare_experiment(tiny_cfg)
    written = paths.folds.read_bytes()
    index = ShardReader(shards_dir).index
    other = paths.root / "other.csv"
    pd.testing.assert_frame_equal(
        ensure_folds(other, index, tiny_cfg.data.num_folds, tiny_cfg.data.fold_seed), read_folds(paths.folds)
    )
    assert other.read_bytes() == written
    # an existing file is checked, never rewritten: 3 folds against data.num_folds=2 is an error
    patients = sorted(set(index["patient"]))
    paths.folds.write_text("patient,fold\n" + "".join(f"{p},{i % 3}\n" for i, p in enumerate(patients)))
    before = paths.folds.read_bytes()
    with pytest.raises(FoldError, match="has 3 folds but data.num_folds=2"):
        ensure_folds(paths.folds, index, 2, 0)
    assert paths.folds.read_bytes() == before
    assert ExperimentPaths.of(tiny_cfg).folds == paths.folds
