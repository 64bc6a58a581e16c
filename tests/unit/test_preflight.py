"""Before a submission: preflight (one line, exit 2, nothing queued) and --dry-run (scripts + graph, nothing queued)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tinyexp import tiny_overrides

from bonehpc import slurm
from bonehpc.config import load_config
from bonehpc.paths import ExperimentPaths
from bonehpc.preflight import PreflightError, check_resources
from bonehpc.slurm import load_profile
from jobs.submit import submit_folds, submit_pack

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, synth_root: Path, shards_dir: Path, *extra: str):
    over = tiny_overrides(tmp_path / "runs", synth_root, shards_dir, "cluster.mode=slurm", "cluster.profile=dev")
    return load_config(None, [*over, *extra])


def _nothing_queued(cfg) -> None:
    paths = ExperimentPaths.of(cfg)
    assert not paths.jobs.exists() and not paths.submitit.exists()
    # refused or dry: not even config.yaml / manifest.csv / folds.csv are written
    assert not paths.config.exists() and not paths.manifest.exists()


def test_dry_run_prints_every_script_and_the_graph_and_submits_nothing(tmp_path, synth_root, shards_dir) -> None:
    cfg = _cfg(tmp_path, synth_root, shards_dir)
    with slurm.dry_run() as scripts:  # cluster.mode=slurm, but no sbatch is ever called
        entry = submit_folds(cfg)
    assert [s.splitlines()[0] for s in scripts] == [
        "##### train teacher job DRY1: array of 3 (fold0, fold1, final)",
        "##### train outputs job DRY2: array of 3 (fold0, fold1, final)",
        "##### train student job DRY3: array of 3 (fold0, fold1, final)",
        "##### evaluate job DRY4",
    ]
    assert "#SBATCH --array=0-2%3" in scripts[0] and "#SBATCH --dependency=aftercorr:DRY1" in scripts[1]
    assert "#SBATCH --dependency=aftercorr:DRY2" in scripts[2] and "bonehpc" in scripts[1]
    assert "#SBATCH --dependency=afterany:DRY1:DRY2:DRY3" in scripts[3]
    assert all("#SBATCH --requeue" in s and "SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in s for s in scripts)
    deps = ["", "aftercorr:DRY1", "aftercorr:DRY2", "afterany:DRY1:DRY2:DRY3"]
    assert [j["dependency"] for j in entry["jobs"]] == deps
    # the no-KD graph and the online teacher have no outputs stage
    for extra in ("distill.kind=none", "distill.teacher_outputs=online"):
        with slurm.dry_run() as scripts:
            submit_folds(_cfg(tmp_path, synth_root, shards_dir, extra))
        assert not any(" outputs " in s.splitlines()[0] for s in scripts), extra
    _nothing_queued(cfg)
    assert not slurm.is_dry_run()


def test_dry_run_cli_for_folds(tmp_path, synth_root, shards_dir) -> None:
    over = tiny_overrides(tmp_path / "runs", synth_root, shards_dir, "cluster.mode=slurm", "cluster.profile=dev")
    res = subprocess.run(
        [sys.executable, "-m", "bonehpc", "submit", "folds", "--dry-run", *over],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("#!/bin/bash") == 4 and "dependency graph (dry run" in res.stdout
    assert "train student    job DRY3" in res.stdout and "train outputs    job DRY2" in res.stdout
    _nothing_queued(load_config(None, over))


def test_missing_shards_one_line_exit_2_nothing_queued(tmp_path, synth_root) -> None:
    over = tiny_overrides(tmp_path / "runs", synth_root, tmp_path / "no-shards", "cluster.mode=slurm")
    res = subprocess.run(
        [sys.executable, "-m", "bonehpc", "submit", "folds", *over, "cluster.profile=dev"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "no-shards" in res.stderr
    _nothing_queued(load_config(None, over))


def test_folds_csv_that_does_not_match_the_shards(tmp_path, synth_root, shards_dir) -> None:
    cfg = _cfg(tmp_path, synth_root, shards_dir)
    paths = ExperimentPaths.of(cfg)
    paths.root.mkdir(parents=True)
    paths.folds.write_text("patient,fold\nnobody,0\nnoone,1\nnot-here,2\n")
    with slurm.dry_run(), pytest.raises(PreflightError, match="folds.csv") as err:
        submit_folds(cfg)
    assert "\n" not in str(err.value)
    _nothing_queued(cfg)


def test_pretrained_teacher_without_weights(tmp_path, synth_root, shards_dir) -> None:
    cfg = _cfg(tmp_path, synth_root, shards_dir, "teacher.pretrained=true", f"teacher.weights={tmp_path}/none.pth")
    with pytest.raises(PreflightError, match="teacher.pretrained") as err:
        submit_folds(cfg)
    assert "\n" not in str(err.value)
    _nothing_queued(cfg)


@pytest.mark.parametrize(
    ("text", "kinds", "needle"),
    [
        ("gpus_per_node: 2\nnproc_per_node: 4\ncpus_per_task: 8\n", {"train": 4}, "4 training processes per node"),
        ("cpus_per_task: 2\n", {"train": 4}, "cpus_per_task=2 < 4"),
        ("cpus_per_task: 4\nmem_gb: 2\n", {"train": 4}, "mem_gb=2.0 is under 1 GB"),
        ("per_kind:\n  pack: {gpus_per_node: 1}\n", {"pack": 0}, "packing uses no GPU"),
        ("per_kind:\n  tune: {nodes: 2}\n", {"tune": 1}, "one process on one node"),
    ],
)
def test_resources_not_sane_for_the_kind(tmp_path: Path, text: str, kinds: dict[str, int], needle: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(PreflightError, match=needle):
        check_resources(load_profile(str(path)), kinds)


def test_shipped_profiles_pass() -> None:
    for name in ("dev", "example-gpu"):
        prof = load_profile(name)
        check_resources(prof, {"train": prof.nproc_per_node or max(1, prof.gpus_per_node), "tune": 1, "pack": 0})


def test_pack_dry_run_on_a_gpu_profile_for_pack_is_refused(tmp_path, synth_root) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text("per_kind:\n  pack: {gpus_per_node: 2}\n")
    cfg = load_config(
        None,
        tiny_overrides(tmp_path / "runs", synth_root, tmp_path / "s", "cluster.mode=slurm", f"cluster.profile={prof}"),
    )
    with slurm.dry_run(), pytest.raises(PreflightError, match="packing uses no GPU"):
        submit_pack(cfg)
    assert not (tmp_path / "s").exists()


def test_signal_delay_shorter_than_the_save_wait_is_refused_at_submit(tmp_path, synth_root, shards_dir) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text("signal_delay_s: 60\nsave_wait_s: 90\n")
    over = tiny_overrides(tmp_path / "runs", synth_root, shards_dir, "cluster.mode=slurm", f"cluster.profile={prof}")
    res = subprocess.run(
        [sys.executable, "-m", "bonehpc", "submit", "folds", *over], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "signal_delay_s: 60 s is shorter than save_wait_s (90 s) + 10 s" in res.stderr
    _nothing_queued(load_config(None, over))
