"""Cluster profiles: validation that names the bad key, per-kind overrides, and the sbatch scripts they render."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonehpc.config import ConfigError, load_config
from bonehpc.slurm import (
    BATCH_SHELL_SHIELD,
    PROFILE_DIR,
    executor_parameters,
    load_profile,
    render_sbatch,
    resolve_mode,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "sbatch_profiles.txt"


KINDS = (("train", "aftercorr:100", 3), ("evaluate", "afterany:100:101", 0), ("tune", "", 4), ("pack", "", 5))


def _render_all() -> str:
    # the same rendering that produced tests/golden/sbatch_profiles.txt; regenerate it when a profile changes:
    # .venv/bin/python -c "import tests.unit.test_slurm_profiles as t; t.GOLDEN.write_text(t._render_all())"
    out = []
    for name in ("dev", "example-gpu"):
        prof = load_profile(name)
        for kind, dep, array in KINDS:
            out.append(f"##### profile={name} kind={kind} array={array}")
            out.append(
                render_sbatch(
                    prof.for_kind(kind),
                    "/RUNS/exp/submitit/%j",
                    f"exp-{kind}",
                    dep,
                    command="PYTHON -u -m submitit.core._submit /RUNS/exp/submitit/%j",
                    array=array,
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
        ("per_kind:\n  report: {time_min: 5}\n", "per_kind.report"),  # no report job kind (the evaluate job reports)
        ("signal_delay_s: 60\n", "signal_delay_s: 60 s is shorter than save_wait_s"),
        ("signal_delay_s: 60\nsave_wait_s: 55\n", "use >= 65"),
        ("per_kind:\n  tune: {signal_delay_s: 30}\n", "per_kind.tune.signal_delay_s"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_profiles_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_profile(str(path))


def test_kind_defaults_tune_share_and_pack_without_gpus(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("gpus_per_node: 4\ncpus_per_task: 32\nmem_gb: 240\nnodes: 2\nnproc_per_node: 4\n")
    prof = load_profile(str(path))
    tune = prof.for_kind("tune")  # one trial = one process on one GPU, with that GPU's share of the node
    assert (tune.gpus_per_node, tune.cpus_per_task, tune.mem_gb, tune.nodes, tune.nproc_per_node) == (1, 8, 60, 1, 1)
    pack = prof.for_kind("pack")
    assert (pack.gpus_per_node, pack.cpus_per_task, pack.nodes) == (0, 32, 1)
    # per_kind entries win over the defaults; the tune share follows per_kind.train
    path.write_text(
        "gpus_per_node: 4\ncpus_per_task: 32\nmem_gb: 240\n"
        "per_kind:\n  train: {gpus_per_node: 2}\n  tune: {mem_gb: 10}\n  pack: {cpus_per_task: 4}\n"
    )
    prof = load_profile(str(path))
    assert (prof.for_kind("tune").cpus_per_task, prof.for_kind("tune").mem_gb) == (16, 10)
    assert prof.for_kind("pack").cpus_per_task == 4
    # a CPU-only profile: a trial gets the whole task's CPUs and no GPU
    assert load_profile("dev").for_kind("tune").gpus_per_node == 0
    assert load_profile("dev").for_kind("tune").cpus_per_task == 2


def test_every_job_requeues_and_gets_its_cpus_in_the_step() -> None:
    params = executor_parameters(load_profile("dev").for_kind("train"), "x", "slurm")
    assert params["slurm_additional_parameters"]["requeue"] is True
    setup = params["slurm_setup"]
    # the batch shell first shields itself from the signals its step handles (scancel --full, B: signals)
    assert setup[:2] == list(BATCH_SHELL_SHIELD) and all(line.startswith("trap ") for line in setup[:2])
    # derived inside the job (never a hard-coded number that could conflict with the allocation)
    assert setup[2] == "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK"
    assert "export BONEHPC_SAVE_WAIT_S=15" in setup and setup[-1].startswith("export OMP_NUM_THREADS=1")
    text = render_sbatch(load_profile("example-gpu").for_kind("tune"), "/R/%j", "t", array=6)
    assert "#SBATCH --array=0-5%6" in text and "#SBATCH --gpus-per-node=1" in text and "#SBATCH --requeue" in text


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
