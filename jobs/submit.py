"""The job graphs that `bonehpc submit folds|resubmit|pack|tune` submit, next to the entry points they submit.

Fold graph of one experiment (Slurm mode), every job through the one primitive `bonehpc.slurm.submit`:

    teacher array   index i -> fold i (0..K-1), index K -> "final" (all training patients)
    outputs array   (KD with distill.teacher_outputs auto|cached) same mapping, --dependency=aftercorr:<teacher
                    array>: the frozen teacher's logits on every training view of the students' schedule
                    (bonehpc.outputs_job), so no student or tune trial runs the teacher
    student array   same index -> fold mapping, --dependency=aftercorr:<outputs array> (or <teacher array>
                    without the outputs stage), so student task i starts when its upstream task i succeeded
                    (--kill-on-invalid-dep=yes cancels it otherwise: a failed teacher cancels its outputs and
                    student tasks)
    baseline array  (distill.baseline) the student without KD, same index -> fold mapping, no dependency
    evaluate        --dependency=afterany:<all arrays>: holdout evaluation + report, also when folds failed

Folds already completed (their metrics.json says so) and tasks still pending or running are skipped, so
submitting again is safe. Under cluster.mode local the same graph runs with submitit's local executor as a
job graph (bonehpc.localgraph): the same dependency strings, with synthetic ids, and ready tasks at once as
far as the machine allows; debug runs it in-process, in order. Every submission is recorded in jobs.json
(bonehpc.registry).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bonehpc import preflight, slurm
from bonehpc.accounting import ACTIVE_STATES, RETRY_STATES, task_states
from bonehpc.config import ConfigError, ExperimentConfig, config_in_place, load_config, save_config
from bonehpc.lease import submit_lock
from bonehpc.paths import (
    OUTPUTS_ROLE,
    ROLES,
    RUN_CONFIG,
    ExperimentPaths,
    experiment_roles,
    fold_keys,
    fold_name,
    run_completed,
)
from bonehpc.registry import append_submission, config_hash, latest_tasks, new_entry, read_registry, registry_tasks
from jobs.evaluate import EvaluateTask
from jobs.outputs import OutputsTask
from jobs.pack import FinalizePackTask, PackShardTask
from jobs.train import TrainTask
from jobs.tune import TuneTask

log = logging.getLogger(__name__)


def _context(cfg: ExperimentConfig, paths: ExperimentPaths, workdir: str | Path | None) -> slurm.SubmitContext:
    """Mode (auto resolved), cluster profile (`local` for the dev default outside Slurm) and working dir."""
    mode = slurm.resolve_mode(cfg.cluster.mode)
    profile = slurm.load_profile(cfg.cluster.profile if mode == "slurm" or cfg.cluster.profile != "dev" else "local")
    return slurm.SubmitContext(cfg, paths, profile, mode, str(Path(workdir or os.getcwd()).resolve()))


def _record(ctx: slurm.SubmitContext, kind: str, folder: Path, **extra: Any) -> dict[str, Any]:
    """Append the submission to `folder`/jobs.json (when something was submitted); the entry plus run_dir."""
    entry = new_entry(
        kind, ctx.cfg, mode=ctx.mode, profile=ctx.profile.name, workdir=ctx.workdir, jobs=ctx.jobs, **extra
    )
    if ctx.jobs and not slurm.is_dry_run():  # a dry run submitted nothing and records nothing
        append_submission(folder, ctx.cfg.name, entry)
    return {**entry, "run_dir": str(folder)}


# ----------------------------------------------------------------------------------------------
# The fold graph


def packed_manifest(shards_dir: str | Path) -> pd.DataFrame:
    """The manifest of what was packed: the manifest columns of `<shards>/index.csv` (no HDF5 file opened).

    Images rejected by the packer, and so studies and patients that lost every image, are not in it: the
    experiment never sees them (no fold, no training, no evaluation). The shard folder's rejected.csv and
    lost_studies.csv are the record; this logs the counts.

    Raises:
        ShardError: the shard folder is missing or unfinished (one line; run `bonehpc pack` first).
    """
    from bonehpc.data.mura import MANIFEST_COLUMNS
    from bonehpc.data.shards import LOST_STUDIES_CSV, REJECTED_CSV, ShardReader

    reader = ShardReader(shards_dir)
    packed = reader.index[list(MANIFEST_COLUMNS)].copy()
    info = reader.info
    reader.close()
    n_rejected, n_lost = int(info.get("n_rejected", 0)), int(info.get("n_lost_studies", 0))
    if n_rejected or n_lost:
        log.warning(
            "%d images rejected in packing (%s) and %d studies lost every image (%s): excluded from the "
            "manifest, the folds, training and evaluation",
            n_rejected,
            reader.shards_dir / REJECTED_CSV,
            n_lost,
            reader.shards_dir / LOST_STUDIES_CSV,
        )
    return packed


def prepare_experiment(cfg: ExperimentConfig) -> ExperimentPaths:
    """runs/<exp>/: config.yaml (always the submitted one), manifest.csv and folds.csv when absent.

    manifest.csv and folds.csv are made from what was packed (`packed_manifest` of data.shards), never from
    the data set's CSVs: a study or patient the packer lost is in no fold. Existing files are kept (the
    folds of an experiment do not change between submissions); patients of an existing folds.csv that are
    not packed are reported (training reads only the shard index, so they are skipped). folds.csv is written
    by `bonehpc.data.folds.ensure_folds` only, from the packed images, as training would write it.
    """
    from bonehpc.data.folds import ensure_folds, packed_folds
    from bonehpc.data.mura import write_manifest

    paths = ExperimentPaths.of(cfg)
    packed = packed_manifest(cfg.data.shards)
    paths.root.mkdir(parents=True, exist_ok=True)
    if paths.config.is_file():
        old = load_config(paths.config)
        if config_hash(old) != config_hash(cfg):
            log.warning(
                "config of %s changed since the last submission (%s -> %s); completed runs are kept",
                cfg.name,
                config_hash(old),
                config_hash(cfg),
            )
    save_config(cfg, paths.config)
    if not paths.manifest.is_file():
        write_manifest(packed, paths.manifest)
    folds = ensure_folds(paths.folds, packed, cfg.data.num_folds, cfg.data.fold_seed)
    packed_folds(folds, packed)  # logs the fold patients lost in packing (they are skipped)
    return paths


@dataclass
class Plan:
    """What one submission will run: fold keys per role, and the dependencies on earlier tasks."""

    teacher: list[int | str]
    student: list[int | str]
    evaluate: bool
    skipped: dict[str, str]
    """'fold0/teacher' -> why it is not submitted (completed, or the active task id)."""
    active: dict[tuple[str, str], str]
    """(fold name, role) -> task id of a still pending/running task from an earlier submission."""
    baseline: list[int | str] = field(default_factory=list)
    """Folds of the no-KD student (distill.baseline); it depends on no teacher."""
    superseded: list[str] = field(default_factory=list)
    """Task ids of a still queued earlier evaluation that the new one replaces (cancelled on submit)."""
    outputs: list[int | str] = field(default_factory=list)
    """Folds whose teacher-outputs job runs (`uses_outputs`): the teacher reruns, or a student runs and the
    fold's cache does not match its teacher and config."""


def uses_outputs(cfg: ExperimentConfig) -> bool:
    """Whether the fold graph has the teacher-outputs stage (a KD student that may read cached outputs)."""
    return cfg.distill.kind != "none" and cfg.distill.teacher_outputs != "online"


def _outputs_current(cfg: ExperimentConfig, fold: int | str) -> bool:
    from bonehpc.teacher_outputs import outputs_current

    return outputs_current(cfg, fold)


def _plan_outputs(
    cfg: ExperimentConfig,
    todo: dict[str, list[int | str]],
    plan_state: tuple[dict, dict, dict, dict],
    only: set[tuple[str, str]] | None,
) -> list[int | str]:
    """Folds of the outputs stage: under a rerun teacher, or under a student when the fold's cache is not current
    (an explicit selection runs it only with its student, or when it names it)."""
    latest, states, skipped, active = plan_state
    out: list[int | str] = []
    for fold in fold_keys(cfg.data.num_folds) if uses_outputs(cfg) else []:
        fname = fold_name(fold)
        wanted = fold in todo["student"] or (only is not None and (fname, OUTPUTS_ROLE) in only)
        prev = latest.get((fname, OUTPUTS_ROLE))
        if prev and states.get(prev["task_id"], "UNKNOWN") in ACTIVE_STATES:
            skipped[f"{fname}/{OUTPUTS_ROLE}"] = f"{states[prev['task_id']].lower()} as {prev['task_id']}"
            active[(fname, OUTPUTS_ROLE)] = prev["task_id"]
        elif fold in todo["teacher"] and (only is None or wanted):
            out.append(fold)  # a new teacher: new outputs
        elif _outputs_current(cfg, fold):
            skipped[f"{fname}/{OUTPUTS_ROLE}"] = "completed"
        elif wanted:
            out.append(fold)
        else:
            skipped[f"{fname}/{OUTPUTS_ROLE}"] = "no student to run" if only is None else "not selected"
    return out


def plan_folds(cfg: ExperimentConfig, paths: ExperimentPaths, only: set[tuple[str, str]] | None = None) -> Plan:
    """Which (fold, role) to submit: not completed and not pending/running; `only` restricts further."""
    registry = read_registry(paths.root)
    latest = latest_tasks(registry)
    states = task_states(registry) if latest else {}
    keys = fold_keys(cfg.data.num_folds)
    roles = experiment_roles(cfg)
    todo: dict[str, list[int | str]] = {r: [] for r in ROLES}
    skipped: dict[str, str] = {}
    active: dict[tuple[str, str], str] = {}
    for fold in keys:
        fname = fold_name(fold)
        for role in roles:
            key = f"{fname}/{role}"
            if paths.role_completed(fold, role):
                skipped[key] = "completed"
                continue
            prev = latest.get((fname, role))
            if prev and states.get(prev["task_id"], "UNKNOWN") in ACTIVE_STATES:
                skipped[key] = f"{states[prev['task_id']].lower()} as {prev['task_id']}"
                active[(fname, role)] = prev["task_id"]
                continue
            if only is not None and (fname, role) not in only:
                skipped[key] = "not selected"
                continue
            todo[role].append(fold)
    # a student whose teacher is rerun reruns too (its teacher changes); an explicit selection is kept as is
    for fold in todo["teacher"] if only is None else []:
        if fold not in todo["student"] and (fold_name(fold), "student") not in active:
            todo["student"].append(fold)
            skipped.pop(f"{fold_name(fold)}/student", None)
    todo["student"].sort(key=keys.index)
    outputs = _plan_outputs(cfg, todo, (latest, states, skipped, active), only)
    prev_eval = latest.get(("holdout", "evaluate"))
    prev_state = states.get(prev_eval["task_id"], "UNKNOWN") if prev_eval else ""
    superseded: list[str] = []
    if any(todo.values()) or outputs:
        need_eval = True
        if prev_state in ACTIVE_STATES:  # it waits on the old tasks only: the new evaluation replaces it
            superseded.append(prev_eval["task_id"])  # type: ignore[index]
    elif prev_state in ACTIVE_STATES:
        need_eval = False
        skipped["holdout/evaluate"] = f"{prev_state.lower()} as {prev_eval['task_id']}"  # type: ignore[index]
    elif prev_state == "COMPLETED" or (not prev_eval and paths.holdout_completed(roles)):
        need_eval = False
        skipped["holdout/evaluate"] = "completed"
    else:
        need_eval = True
    return Plan(todo["teacher"], todo["student"], need_eval, skipped, active, todo["baseline"], superseded, outputs)


def stage_groups(
    ctx: slurm.SubmitContext, folds: list[int | str], upstream: dict[str, Any] | None, plan: Plan, role: str
) -> list[tuple[list[int | str], str]]:
    """The arrays of one stage over `folds`, each with its dependency: task k waits for upstream task k only.

    Slurm: one array with aftercorr on the upstream array (role `role`) when both have the same folds in the
    same order; otherwise a fold whose upstream task is new or still active in an earlier submission is its
    own job, afterok on exactly that task, and folds whose upstream is done share one array without a
    dependency (an afterok on several tasks would make every fold wait for all of them). Local mode the same
    (its graph reads the same strings); debug: one array (its jobs check the upstream with run_if).
    """
    if ctx.mode == "debug" or not folds:
        return [(list(folds), "")] if folds else []
    tasks = (upstream or {}).get("tasks", [])
    if upstream and upstream.get("job_id") and [fold_name(f) for f in folds] == [t["fold"] for t in tasks]:
        return [(list(folds), f"aftercorr:{upstream['job_id']}")]
    by_fold = {t["fold"]: t["task_id"] for t in tasks}
    groups: list[tuple[list[int | str], str]] = []
    free: list[int | str] = []
    for fold in folds:
        fname = fold_name(fold)
        dep = by_fold.get(fname) or plan.active.get((fname, role))
        if dep:
            groups.append(([fold], f"afterok:{dep}"))
        else:
            free.append(fold)
    return ([(free, "")] if free else []) + groups


def student_groups(
    ctx: slurm.SubmitContext, plan: Plan, teacher: dict[str, Any] | None, outputs: dict[str, Any] | None = None
) -> list[tuple[list[int | str], str]]:
    """The student arrays (`stage_groups`): student k waits for outputs k when the graph has the outputs stage
    (new, or still active from an earlier submission), else for teacher k."""
    if outputs is not None or any((fold_name(f), OUTPUTS_ROLE) in plan.active for f in plan.student):
        return stage_groups(ctx, plan.student, outputs, plan, OUTPUTS_ROLE)
    return stage_groups(ctx, plan.student, teacher, plan, "teacher")


def submit_folds(
    cfg: ExperimentConfig,
    *,
    only: set[tuple[str, str]] | None = None,
    kind: str = "folds",
    workdir: str | Path | None = None,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Submit (or run, in local/debug mode) the fold graph of an experiment; returns the registry entry.

    Args:
        cfg: the experiment config (saved as runs/<exp>/config.yaml, which the jobs read).
        only: restrict to these (fold name, role) pairs (resubmit); None: everything not done or active.
        kind: name of the submission in the registry (folds or resubmit).
        workdir: the jobs' working directory (relative paths of the config resolve there); default cwd.
        evaluate: also submit the holdout evaluation + report job when it is due.
    """
    paths = ExperimentPaths.of(cfg)
    ctx = _context(cfg, paths, workdir)
    plan = plan_folds(cfg, paths, only)
    if plan.teacher or plan.student or plan.baseline or plan.outputs or plan.evaluate:  # one line, exit 2
        roles = [r for r in ROLES if getattr(plan, r)]
        preflight.preflight_training(cfg, paths, ctx.profile, ctx.mode, roles, "train")
    if slurm.is_dry_run():  # a dry run leaves the experiment folder as it was (and takes no lock)
        return _submit_graph(ctx, plan, kind, evaluate)
    with submit_lock(paths.root):  # concurrent submits: the others stop here, naming this one
        plan = plan_folds(cfg, paths, only)  # again under the lock: what a submit before us did counts
        prepare_experiment(cfg)
        return _submit_graph(ctx, plan, kind, evaluate)


def _submit_graph(ctx: slurm.SubmitContext, plan: Plan, kind: str, evaluate: bool) -> dict[str, Any]:
    """Submit the jobs of `plan` (the fold graph) and record them."""
    cfg, paths = ctx.cfg, ctx.paths
    cfg_path = str(paths.config.resolve())
    nproc = cfg.cluster.nproc_per_node or ctx.profile.for_kind("train").nproc_per_node
    train_ids: list[str] = list(plan.active.values())
    slurm.defer_local(ctx)  # local mode: the jobs below run together at run_local, by their dependencies

    teacher: dict[str, Any] | None = None
    if plan.teacher:
        task = TrainTask(cfg_path, "teacher", ctx.workdir, nproc)
        teacher = slurm.submit(ctx, "train", task, plan.teacher, role="teacher", label=fold_name)
        train_ids.append(teacher["job_id"])
    outputs_jobs: list[dict[str, Any]] = []
    # teacher -> outputs (aftercorr) -> students: no student runs the teacher
    for folds, dependency in stage_groups(ctx, plan.outputs, teacher, plan, "teacher"):
        job = slurm.submit(
            ctx,
            "train",
            OutputsTask(cfg_path, OUTPUTS_ROLE, ctx.workdir, nproc),
            folds,
            role=OUTPUTS_ROLE,
            dependency=dependency,
            run_if=lambda fold: paths.role_completed(fold, "teacher"),
            label=fold_name,
        )
        train_ids.append(job["job_id"])
        outputs_jobs.append(job)
    # several outputs jobs: their tasks together (no single array to aftercorr on), so that student k still
    # waits for outputs k (afterok on exactly that task), never for teacher k only
    outputs: dict[str, Any] | None = outputs_jobs[0] if len(outputs_jobs) == 1 else None
    if len(outputs_jobs) > 1:
        outputs = {"job_id": "", "tasks": [t for job in outputs_jobs for t in job["tasks"]]}
    for folds, dependency in student_groups(ctx, plan, teacher, outputs):
        student = slurm.submit(
            ctx,
            "train",
            TrainTask(cfg_path, "student", ctx.workdir, nproc),
            folds,
            role="student",
            dependency=dependency,
            run_if=lambda fold: (
                paths.role_completed(fold, "teacher")
                and (fold not in plan.outputs or run_completed(paths.outputs_dir(fold)))
            ),
            label=fold_name,
        )
        train_ids.append(student["job_id"])
    if plan.baseline:  # the student without KD: no teacher to wait for
        task = TrainTask(cfg_path, "baseline", ctx.workdir, nproc)
        baseline = slurm.submit(ctx, "train", task, plan.baseline, role="baseline", label=fold_name)
        train_ids.append(baseline["job_id"])
    if plan.evaluate and evaluate:
        if plan.superseded and ctx.mode == "slurm" and not slurm.is_dry_run():  # never two evaluations at once
            slurm.cancel(plan.superseded, "superseded by a new evaluation of this submission")
        dependency = "afterany:" + ":".join(train_ids) if train_ids else ""
        slurm.submit(ctx, "evaluate", EvaluateTask(cfg_path, ctx.workdir), dependency=dependency)
    if not ctx.jobs:
        log.info("nothing to submit for %s: %s", cfg.name, ", ".join(f"{k} {v}" for k, v in plan.skipped.items()))
    try:
        slurm.run_local(ctx)
    except KeyboardInterrupt:
        _record(ctx, kind, paths.root, skipped=plan.skipped)  # the stopped tasks as CANCELLED; a re-run resumes
        raise
    return _record(ctx, kind, paths.root, skipped=plan.skipped)


def resubmit(exp_dir: str | Path, workdir: str | Path | None = None) -> dict[str, Any]:
    """Resubmit only the failed / cancelled / timed-out tasks of an experiment (and their dependents)."""
    exp = Path(exp_dir)
    cfg_path = exp / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{exp}: no config.yaml; is this an experiment folder (runs/<exp>)?")
    registry = read_registry(exp)
    if not registry["submissions"]:
        raise ConfigError(f"{exp}/jobs.json: nothing was submitted yet; use `bonehpc submit folds`")
    cfg = config_in_place(load_config(cfg_path), exp, registry["submissions"][-1].get("workdir") or os.getcwd())
    with submit_lock(exp):  # what to rerun is decided under the lock that the submission then holds
        return _resubmit(exp, cfg, workdir)


def _resubmit(exp: Path, cfg: ExperimentConfig, workdir: str | Path | None) -> dict[str, Any]:
    registry = read_registry(exp)
    states = task_states(registry)
    paths = ExperimentPaths(exp)
    only: set[tuple[str, str]] = set()
    for (fname, role), task in latest_tasks(registry).items():
        if task["kind"] != "train":
            continue
        fold: int | str = "final" if fname == "final" else int(fname.removeprefix("fold"))
        done = _outputs_current(cfg, fold) if role == OUTPUTS_ROLE else paths.role_completed(fold, role)
        if states.get(task["task_id"]) in RETRY_STATES and not done:
            only.add((fname, role))
            if role in ("teacher", OUTPUTS_ROLE) and not paths.role_completed(fold, "student"):
                only.add((fname, "student"))  # the dependent student (cancelled or never run) goes too
    log.info("resubmitting %s", ", ".join(f"{f}/{r}" for f, r in sorted(only)) or "no training task")
    if not registry["submissions"][-1].get("workdir") and workdir is None:
        workdir = os.getcwd()
    return submit_folds(cfg, only=only, kind="resubmit", workdir=workdir or registry["submissions"][-1]["workdir"])


# ----------------------------------------------------------------------------------------------
# Packing and tuning


def submit_pack(cfg: ExperimentConfig, workdir: str | Path | None = None) -> dict[str, Any]:
    """Pack cfg.data into shards on the cluster: an array with one task per shard, then the finalize job.

    The plan is made here (bonehpc.data.pack.plan_pack saves it next to the shards); shards already packed
    are skipped by the tasks, so submitting again resumes. Recorded in runs/<exp>/jobs.json as kind pack.
    """
    from bonehpc.data.pack import check_out_folder, pack_lock, plan_pack

    paths = ExperimentPaths.of(cfg)
    paths.root.mkdir(parents=True, exist_ok=True)
    ctx = _context(cfg, paths, workdir)
    if ctx.mode == "slurm":
        preflight.check_resources(ctx.profile, {"pack": 0})
    d = cfg.data
    out_dir = Path(d.shards).resolve()
    check_out_folder(out_dir)  # before the lock creates <out>/.pack in a folder that may not be ours
    out_dir.mkdir(parents=True, exist_ok=True)
    with pack_lock(out_dir):  # a local `bonehpc pack` into the same folder cannot re-plan under us
        plan = plan_pack(
            d.mura_root,
            out_dir,
            pack_size=d.pack_size,
            fit=d.fit,
            compression=d.compression,
            images_per_shard=d.images_per_shard,
            min_side=d.min_side,
            cross_split_patients=d.cross_split_patients,
        )
    out = str(Path(d.shards).resolve())
    shards = list(range(len(plan.shards)))
    arr = slurm.submit(ctx, "pack", PackShardTask(out), shards, label=lambda i: f"shard{i}")
    dependency = f"afterok:{arr['job_id']}" if ctx.mode == "slurm" else ""
    finalize = FinalizePackTask(out, d.max_reject_frac)
    slurm.submit(ctx, "pack", finalize, dependency=dependency, label=lambda _: "finalize")
    return _record(ctx, "pack", paths.root)


def tune_tasks_needed(cfg: ExperimentConfig, study: Any, folder: Path) -> tuple[int, str]:
    """How many array tasks top the study up to `tune.trials` (each task runs one trial), and why.

    Finished trials count (COMPLETE, PRUNED, and a FAIL that was not retried: its answer is "this fails"),
    and so does every task of an earlier submission that is still pending or running (it will run one).
    """
    trials = study.get_trials(deepcopy=False) if study is not None else []
    retried = {n for t in trials for n in (t.system_attrs.get("retry_history") or [])}
    finished = sum(
        t.state.name in ("COMPLETE", "PRUNED") or (t.state.name == "FAIL" and t.number not in retried) for t in trials
    )
    registry = read_registry(folder)
    states = task_states(registry) if registry["submissions"] else {}
    trial_tasks = {t["task_id"] for t in registry_tasks(registry) if t["kind"] == "tune"}  # not submit all's last job
    in_flight = sum(state in ACTIVE_STATES for tid, state in states.items() if tid in trial_tasks)
    needed = max(0, cfg.tune.trials - finished - in_flight)
    why = f"{finished} trial(s) finished, {in_flight} task(s) pending or running, tune.trials={cfg.tune.trials}"
    return needed, why


def submit_tune(
    cfg: ExperimentConfig, workdir: str | Path | None = None, waits: dict[int, tuple[str, str]] | None = None
) -> dict[str, Any]:
    """Check, create the study, then submit ONE array that tops the study up to `tune.trials` trials
    (`tune.parallel` at a time): submitting again adds only what is missing.

    cluster.mode local/debug runs the tasks with submitit's local executor (`tune.parallel` at once, within
    the machine) or in-process, before returning. The submission is recorded in `runs/<exp>/tune/jobs.json`
    (the registry format of `runs/<exp>/jobs.json`, kept apart so fold status tables stay about folds). A
    dry run creates nothing (no study, no journal) and shows what a submission would add. Concurrent submits
    of one study: the others stop (exit 2) naming the first.

    Teachers of `tune.folds` that are not trained yet but queued or running (in jobs.json, or given in
    `waits`: fold -> (role, task id)) are waited for: the array depends on them (afterok), on the fold's
    queued teacher-outputs task when there is one (no second outputs task is submitted for that fold);
    only a teacher neither trained nor queued is refused.

    Returns:
        The registry entry, plus `run_dir`, `study` and `storage`.
    """
    from bonehpc import tune

    folder = tune.study_dir(cfg)
    ctx = _context(cfg, ExperimentPaths.of(cfg), workdir)
    per_kind = {k: dict(v) for k, v in ctx.profile.per_kind.items()}
    per_kind.get("tune", {}).pop("array_parallelism", None)
    ctx.profile = dataclasses.replace(ctx.profile, array_parallelism=cfg.tune.parallel, per_kind=per_kind)
    from bonehpc.teacher_outputs import check_tune_space

    check_tune_space(cfg)  # cached + a space over the views: refused before anything is written
    waits = {**teacher_waits(cfg, ctx.paths), **(waits or {})}
    study = tune.prepare(cfg, create=False, queued=waits)  # every check first: bad input writes nothing
    preflight.preflight_training(cfg, ctx.paths, ctx.profile, ctx.mode, ["student"], "tune")
    if slurm.is_dry_run():
        return _submit_tune(cfg, ctx, study, folder, waits)
    with submit_lock(folder):
        return _submit_tune(cfg, ctx, tune.prepare(cfg, queued=waits), folder, waits)


def teacher_waits(cfg: ExperimentConfig, paths: ExperimentPaths) -> dict[int, tuple[str, str]]:
    """What the trials of `tune.folds` must wait for (jobs.json + sacct): fold -> (role, task id) of its
    teacher-outputs task when queued or running (it comes after the teacher), else of its teacher when that
    is not completed but queued or running."""
    registry = read_registry(paths.root)
    latest = latest_tasks(registry)
    states = task_states(registry) if latest else {}
    out = {}
    for fold in cfg.tune.folds:
        for role in (OUTPUTS_ROLE, "teacher"):
            prev = latest.get((fold_name(fold), role))
            if prev and states.get(prev["task_id"]) in ACTIVE_STATES and not paths.role_completed(fold, "teacher"):
                out[fold] = (role, prev["task_id"])
                break
    return out


def _submit_tune(
    cfg: ExperimentConfig, ctx: slurm.SubmitContext, study: Any, folder: Path, waits: dict[int, tuple[str, str]]
) -> dict[str, Any]:
    from bonehpc import tune

    needed, why = tune_tasks_needed(cfg, study, folder)
    name = study.study_name if study is not None else tune.study_name(cfg)
    log.info(
        "study %r in %s: %s; submitting %d task(s), %d at a time (%s)",
        name,
        tune.storage_label(cfg),
        why,
        needed,
        cfg.tune.parallel,
        ctx.mode,
    )
    if needed:
        # trials start when the teachers they reuse succeeded; a failed teacher cancels them (kill_on_invalid_dep)
        ids = list(dict.fromkeys(task for _, task in waits.values()))
        if waits:
            log.info("the trials wait for %s", ", ".join(f"fold{f} {role} {t}" for f, (role, t) in waits.items()))
        queued = {f for f, (role, _) in waits.items() if role == OUTPUTS_ROLE}
        outputs = _tune_outputs(ctx, cfg, folder, "afterok:" + ":".join(ids) if ids else "", queued)
        if outputs is not None and ctx.mode != "debug":
            ids.append(outputs["job_id"])
        dependency = "afterok:" + ":".join(ids) if ids else ""
        task = TuneTask(str((folder / RUN_CONFIG).resolve()), ctx.workdir)
        record = slurm.submit(ctx, "tune", task, list(range(needed)), role="tune", dependency=dependency)
        for t in record["tasks"]:
            t["slot"] = t["index"]
    return _record(ctx, "tune", folder, study=name, storage=tune.storage_label(cfg))


def _tune_outputs(
    ctx: slurm.SubmitContext, cfg: ExperimentConfig, folder: Path, dependency: str = "", queued: Collection[int] = ()
) -> dict[str, Any] | None:
    """The outputs array of the tune folds whose cache is not current (every trial then reads it), or None.
    `dependency`: the teacher tasks it waits for (still queued or running); `queued`: folds whose outputs
    task is already queued (not submitted twice: two writers of one cache)."""
    if not uses_outputs(cfg):
        return None
    folds: list[int | str] = [f for f in cfg.tune.folds if f not in queued and not _outputs_current(cfg, f)]
    if not folds:
        log.info("teacher outputs of tune.folds=%s are current: every trial reads them", list(cfg.tune.folds))
        return None
    nproc = cfg.cluster.nproc_per_node or ctx.profile.for_kind("train").nproc_per_node
    task = OutputsTask(str((folder / RUN_CONFIG).resolve()), OUTPUTS_ROLE, ctx.workdir, nproc)
    return slurm.submit(ctx, "train", task, folds, role=OUTPUTS_ROLE, dependency=dependency, label=fold_name)


# ----------------------------------------------------------------------------------------------
# Everything at once: folds, the study, and the folds again with the best parameters


def submit_all(cfg: ExperimentConfig, workdir: str | Path | None = None) -> dict[str, Any]:
    """Queue the fold graph, the tune study (its trials wait for the teachers of tune.folds) and a last job
    that, when the study has ended (afterany on its array), writes best_params.yaml and submits the folds
    of `<name>-tuned` with them (TunedFoldsTask). Local mode runs the three in turn.

    Returns:
        One entry listing every job of the chain (`jobs`), with `run_dir`, `folds`, `tune`, `tuned`.
    """
    from bonehpc import tune

    folds = submit_folds(cfg, workdir=workdir)
    waits: dict[int, tuple[str, str]] = {}
    for role in ("teacher", OUTPUTS_ROLE):  # a fold's queued outputs task wins over its teacher (it follows it)
        for job in folds["jobs"]:
            for t in job["tasks"] if job["role"] == role else []:
                fold = t["fold"].removeprefix("fold")
                if fold.isdigit() and int(fold) in cfg.tune.folds and "state" not in t:  # queued, not run here
                    waits[int(fold)] = (role, t["task_id"])
    tuned_study = submit_tune(cfg, workdir=workdir, waits=waits)
    paths = ExperimentPaths.of(cfg)
    ctx = _context(cfg, paths, workdir)
    array = [job["job_id"] for job in tuned_study["jobs"] if job["kind"] == "tune"]
    task = TunedFoldsTask(
        str((tune.study_dir(cfg) / RUN_CONFIG).resolve()), str(paths.config.resolve()), ctx.workdir, f"{cfg.name}-tuned"
    )
    dependency = "afterany:" + ":".join(array) if array else ""
    slurm.submit(ctx, "submit", task, role="tuned", dependency=dependency, label=lambda _: "tuned-folds")
    tuned = _record(ctx, "tuned", tune.study_dir(cfg))
    jobs = folds["jobs"] + tuned_study["jobs"] + tuned["jobs"]
    return {**folds, "jobs": jobs, "folds": folds, "tune": tuned_study, "tuned": tuned}


class TunedFoldsTask:
    """The last job of `bonehpc submit all`: once the study has ended, the folds again with its best parameters.

    It writes the study's best_params.yaml and submits the fold graph of the experiment's config plus those
    parameters under the name `name` (submit_folds: Slurm jobs from inside this job, or a local run). It
    fails in one line when no trial completed (nothing to re-submit).

    Args:
        tune_cfg_path: runs/<exp>/tune/config.yaml written by `submit tune` (which study).
        exp_cfg_path: runs/<exp>/config.yaml written by `submit folds` (the experiment the folds re-run).
        workdir: working directory of the job and of the submitted jobs.
        name: experiment name of the tuned folds (runs/<name>/).
    """

    def __init__(self, tune_cfg_path: str, exp_cfg_path: str, workdir: str, name: str) -> None:
        self.tune_cfg_path = tune_cfg_path
        self.exp_cfg_path = exp_cfg_path
        self.workdir = workdir
        self.name = name

    def __call__(self) -> dict[str, Any]:
        if self.workdir:
            os.chdir(self.workdir)
        if os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local") and not logging.getLogger().handlers:
            # what submit_folds logs (the jobs it submits) into this job's log
            logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s - %(message)s")
        from bonehpc.config import load_config
        from bonehpc.paths import BEST_PARAMS
        from bonehpc.tune import TuneError, open_study, study_dir, write_best_params

        tune_cfg = load_config(self.tune_cfg_path)
        study = open_study(tune_cfg)
        try:
            params = write_best_params(study, study_dir(tune_cfg) / BEST_PARAMS)
        except ValueError:
            raise TuneError(f"study {study.study_name!r}: no trial completed; the folds are not re-submitted") from None
        cfg = load_config(self.exp_cfg_path, [f"name={self.name}"], params=params)
        log.info("best params %s -> submitting the folds of %s", params, self.name)
        entry = submit_folds(cfg, workdir=self.workdir)
        return {"run_dir": entry["run_dir"], "params": str(params), "jobs": [j["job_id"] for j in entry["jobs"]]}
