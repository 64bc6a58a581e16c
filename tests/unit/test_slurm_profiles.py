"""Cluster profiles: validation that names the bad key, per-kind overrides, and the sbatch scripts they render."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonehpc.config import ConfigError, load_config
from bonehpc.slurm import PROFILE_DIR, executor_parameters, load_profile, render_sbatch, resolve_mode

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "sbatch_profiles.txt"


def _render_all() -> str:
    # the same rendering that produced tests/golden/sbatch_profiles.txt (regenerate it when a profile changes)
    out = []
    for name in ("dev", "example-gpu"):
        prof = load_profile(name)
        for kind, dep in (("train", "aftercorr:100"), ("evaluate", "afterany:100:101")):
            out.append(f"##### profile={name} kind={kind}")
            out.append(
                render_sbatch(
                    prof.for_kind(kind),
                    "/RUNS/exp/submitit/%j",
                    f"exp-{kind}",
                    dep,
                    command="PYTHON -u -m submitit.core._submit /RUNS/exp/submitit/%j",
                )
            )
    return "\n".join(out) + "\n"


def test_sbatch_scripts_match_golden() -> None:
    assert _render_all() == GOLDEN.read_text()


def test_every_shipped_profile_loads() -> None:
    names = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
    assert {"dev", "local", "example-gpu"} <= set(names)
    for name in names:
        assert load_profile(name).name == name


def test_per_kind_override_and_defaults() -> None:
    prof = load_profile("example-gpu")
    ev = prof.for_kind("evaluate")
    assert (ev.gpus_per_node, ev.time_min, ev.partition) == (1, 60, "gpu")
    assert prof.for_kind("train").gpus_per_node == 4
    params = executor_parameters(prof.for_kind("train"), "x", "slurm")
    assert params["slurm_signal_delay_s"] == 120 and params["gpus_per_node"] == 4
    # without Slurm only the name and the time limit are passed on
    assert executor_parameters(prof.for_kind("train"), "x", "local") == {"name": "x", "timeout_min": 720}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("partition: gpu\ngpus_per_nod: 4\n", "gpus_per_nod"),
        ("time_min: ten\n", "time_min"),
        ("time_min: 1\nsignal_delay_s: 120\n", "signal_delay_s"),
        ("per_kind:\n  evaluat: {time_min: 5}\n", "per_kind.evaluat"),
        ("per_kind:\n  evaluate: {cpus: 5}\n", "cpus"),
        ("additional:\n  exclusive: false\n", "additional.exclusive"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_profiles_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_profile(str(path))


def test_missing_profile_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="known profiles: .*dev"):
        load_profile("nosuchcluster")


def test_explicit_modes_and_bad_mode() -> None:
    assert resolve_mode("local") == "local" and resolve_mode("debug") == "debug"
    with pytest.raises(ConfigError, match="cluster.mode"):
        resolve_mode("kubernetes")
    assert load_config(None, ["cluster.mode=auto"]).cluster.mode == "auto"


# ----------------------------------------------------------------------------------------------
# Planning of the fold graph (idempotent submit, resubmit selection), from files on disk


def _exp(tmp_path: Path):
    from bonehpc.paths import ExperimentPaths

    cfg = load_config(None, ["name=plan", f"run_root={tmp_path}", "data.num_folds=2", "cluster.mode=local"])
    paths = ExperimentPaths.of(cfg)
    paths.root.mkdir(parents=True)
    return cfg, paths


def _complete(paths, fold, role) -> None:
    d = paths.role_dir(fold, role)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text('{"status": "completed"}')


def _register(paths, tasks: list[tuple[str, str, str]]) -> None:
    import json

    jobs = [
        {
            "kind": "evaluate" if role == "evaluate" else "train",
            "role": "" if role == "evaluate" else role,
            "job_id": str(i),
            "tasks": [{"task_id": str(i), "state": state, **({} if role == "evaluate" else {"fold": fold})}],
        }
        for i, (fold, role, state) in enumerate(tasks)
    ]
    paths.jobs.write_text(json.dumps({"submissions": [{"mode": "local", "jobs": jobs}]}))


def test_plan_fresh_partial_and_finished(tmp_path: Path) -> None:
    from jobs.submit import plan_folds

    cfg, paths = _exp(tmp_path)
    plan = plan_folds(cfg, paths)
    assert plan.teacher == [0, 1, "final"] and plan.student == [0, 1, "final"] and plan.evaluate

    _complete(paths, 0, "teacher")
    _complete(paths, 0, "student")
    _complete(paths, "final", "teacher")
    plan = plan_folds(cfg, paths)
    assert plan.teacher == [1] and plan.student == [1, "final"]
    assert plan.skipped["fold0/teacher"] == "completed"

    for fold in (1, "final"):
        for role in ("teacher", "student"):
            _complete(paths, fold, role)
    _register(paths, [("holdout", "evaluate", "COMPLETED")])
    plan = plan_folds(cfg, paths)
    assert (plan.teacher, plan.student, plan.evaluate) == ([], [], False)


def test_plan_resubmit_selection_and_rerun_teacher_reruns_student(tmp_path: Path) -> None:
    from jobs.submit import plan_folds

    cfg, paths = _exp(tmp_path)
    for fold in (0, "final"):
        for role in ("teacher", "student"):
            _complete(paths, fold, role)
    _complete(paths, 1, "student")  # a student whose teacher is missing: trained on a teacher that is gone
    _register(
        paths, [("fold1", "teacher", "FAILED"), ("fold1", "student", "CANCELLED"), ("holdout", "evaluate", "COMPLETED")]
    )
    plan = plan_folds(cfg, paths)
    assert plan.teacher == [1] and plan.student == [1] and plan.evaluate  # the student of a rerun teacher reruns
    only = plan_folds(cfg, paths, only={("fold1", "teacher")})
    assert only.teacher == [1] and only.student == [] and only.skipped["fold0/teacher"] == "completed"
