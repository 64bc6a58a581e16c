"""`bonehpc submit tune` (Optuna study as one Slurm array) and `bonehpc tune status` (trials, best params)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bonehpc.cli import add_config_args, load_cfg
from bonehpc.cli.slurm import add_dry_run_arg, add_exp_args, exp_dir, run_submission, submit_subparsers


def register(sub: argparse._SubParsersAction) -> None:
    group = submit_subparsers(sub)
    s = group.add_parser(
        "tune",
        help="Optuna search of the student/distillation hyperparameters: one array job, one trial per task",
        description="Create the study (TPE, maximise tune.metric, pruner tune.pruner) in runs/<exp>/tune/journal.log "
        "or tune.storage, then submit ONE array of tune.trials tasks, tune.parallel at a time. Every trial trains "
        "the KD student on tune.folds against the already-trained teachers (runs/<exp>/fold<k>/teacher/best.pt) "
        "and reports the metric every epoch for pruning. Trials killed or preempted are retried from their "
        "checkpoint. The teachers may still be queued or running: the trials then wait for them (afterok). "
        "cluster.mode=local|debug runs the tasks here.",
    )
    add_config_args(s)
    add_dry_run_arg(s)
    s.set_defaults(func=_submit_tune)

    a = group.add_parser(
        "all",
        help="queue everything at once: the folds, the tune study (waiting for its teachers), and a last job "
        "that re-submits the folds with the best params when the study ends",
        description="submit folds, then submit tune with the trials depending on the teacher tasks of tune.folds "
        "(afterok; a failed teacher cancels them), then one job after the study (afterany) that writes "
        "tune/best_params.yaml and submits the folds of <name>-tuned with it. --dry-run prints the whole chain. "
        "cluster.mode=local runs the three in turn.",
    )
    add_config_args(a)
    add_dry_run_arg(a)
    a.set_defaults(func=_submit_all)

    t = sub.add_parser("tune", help="inspect an Optuna study: `bonehpc tune status`")
    tsub = t.add_subparsers(dest="tune_command", metavar="ACTION")
    t.set_defaults(func=lambda args: (t.print_help(), 2)[1])
    st = tsub.add_parser(
        "status",
        help="trials by state, best value and params, pruned counts; writes tune/best_params.yaml",
        description="Reads the study of runs/<exp>/tune (journal file or the RDB in tune/config.yaml). "
        "The best parameters are written to runs/<exp>/tune/best_params.yaml as dotted keys that "
        "`make submit-folds PARAMS=...` reads.",
    )
    add_exp_args(st)
    st.add_argument("--study", default="", help="study name when tune.study_name was set (default: the experiment's)")
    st.add_argument("--export", metavar="YAML", help="also write the best params (dotted keys) to this file")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.set_defaults(func=_status)


def _submit_tune(args: argparse.Namespace) -> int:
    from bonehpc.tune import TuneError
    from jobs.submit import submit_tune

    cfg = load_cfg(args)
    try:
        entry = run_submission(args, lambda: submit_tune(cfg))
    except TuneError as err:
        print(f"bonehpc submit tune: {err}", file=sys.stderr)
        return 2
    if entry is None:  # --dry-run
        return 0
    for job in entry["jobs"]:
        tasks = job["tasks"]
        ids = f"{tasks[0]['task_id']} .. {tasks[-1]['task_id']}" if tasks else "-"
        failed = sum(t.get("state") == "FAILED" for t in tasks)
        extra = f", {failed} failed" if failed else ""
        print(f"tune array job {job['job_id'] or '(local)'}: {len(tasks)} tasks ({ids}){extra}")
    print(f"study {entry['study']} in {entry['storage']}")
    print(f"run dir: {entry['run_dir']}   status: bonehpc tune status --exp {cfg.name} --run-root {cfg.run_root}")
    return 0


def _submit_all(args: argparse.Namespace) -> int:
    from bonehpc.cli.slurm import _print_submission
    from bonehpc.tune import TuneError
    from jobs.submit import submit_all

    cfg = load_cfg(args)
    try:
        entry = run_submission(args, lambda: submit_all(cfg))
    except TuneError as err:
        print(f"bonehpc submit all: {err}", file=sys.stderr)
        return 2
    if entry is None:  # --dry-run
        return 0
    _print_submission(entry)
    failed = [t for j in entry["jobs"] for t in j["tasks"] if t.get("state") == "FAILED"]
    return 1 if failed else 0


def _status(args: argparse.Namespace) -> int:
    from bonehpc.paths import BEST_PARAMS
    from bonehpc.tune import (
        TuneError,
        format_status,
        load_tune_config,
        open_study,
        study_dir,
        study_status,
        write_best_params,
    )

    try:
        cfg = load_tune_config(exp_dir(args, "tune"), args.study)
        study = open_study(cfg)
    except TuneError as err:
        print(f"bonehpc tune status: {err}", file=sys.stderr)
        return 2
    status = study_status(study)
    written = []
    if status["best"] is not None:
        written.append(str(write_best_params(study, study_dir(cfg) / BEST_PARAMS)))
        if args.export:
            written.append(str(write_best_params(study, args.export)))
    if args.json:
        print(json.dumps({**status, "best_params_files": written}, default=str))
        return 0
    print(format_status(status))
    for line in task_lines(study_dir(cfg)):
        print(line)
    for path in written:
        print(f"best params -> {path}")
    return 0


def task_lines(folder: Path) -> list[str]:
    """One line per job of the study's latest submission (tune/jobs.json): its tasks by state, and for trials
    cancelled because a task they waited for (a teacher, or its outputs) did not succeed, which one and how."""
    from collections import Counter

    from bonehpc.accounting import RETRY_STATES, job_states, task_states
    from bonehpc.localgraph import parse_dependency
    from bonehpc.registry import read_registry

    registry = read_registry(folder)
    if not registry["submissions"]:
        return []
    states = task_states(registry)
    latest = registry["submissions"][-1]
    lines = []
    for job in latest.get("jobs", []):
        counts = Counter(states.get(t["task_id"], "UNKNOWN") for t in job["tasks"])
        line = f"{job['kind']} {job['role']} job {job['job_id']}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
        deps = [i for kind, ids in parse_dependency(job.get("dependency", "")) if kind == "afterok" for i in ids]
        if counts.get("CANCELLED") and deps:
            dep_states = job_states(deps) if latest.get("mode") == "slurm" else {}
            bad = [f"{i} {st}" for i, st in dep_states.items() if st in RETRY_STATES]
            if bad:
                line += f" (dependency never satisfied: task {', '.join(bad)}; fix the teacher, then submit tune again)"
        lines.append(line)
    return lines
