"""`bonehpc submit folds|resubmit` and `bonehpc status`: the experiment's job graph on Slurm (or locally)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from bonehpc.cli import add_config_args, load_cfg


def submit_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The `bonehpc submit` sub-command group (created once; other areas add `submit <kind>` to it)."""
    if "submit" not in sub.choices:
        p = sub.add_parser("submit", help="submit jobs to Slurm (or run them locally): folds, resubmit, ...")
        group = p.add_subparsers(dest="submit_kind", metavar="KIND")
        p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
        p._bonehpc_group = group  # type: ignore[attr-defined]
    return sub.choices["submit"]._bonehpc_group  # type: ignore[no-any-return]


def add_exp_args(p: argparse.ArgumentParser) -> None:
    """--exp NAME|DIR and --run-root."""
    p.add_argument("--exp", "-e", required=True, help="experiment name (runs/<name>) or its folder")
    p.add_argument("--run-root", default="runs", help="parent folder of experiments (default runs)")


def exp_dir(args: argparse.Namespace, marker: str = "config.yaml") -> Path:
    """The experiment folder named by --exp / --run-root (--exp is taken as a folder when it holds `marker`)."""
    p = Path(args.exp)
    if p.is_dir() and (p / marker).exists():
        return p
    return Path(args.run_root) / args.exp


def add_dry_run_arg(p: argparse.ArgumentParser) -> None:
    """--dry-run: print the sbatch scripts and the dependency graph, submit nothing."""
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the sbatch script of every job and the dependency graph; submit and record nothing "
        "(the preflight checks still run)",
    )


def run_submission(args: argparse.Namespace, build: Callable[[], dict]) -> dict | None:
    """The entry of build() (a jobs.submit builder); under --dry-run print its scripts and graph, return None."""
    if not getattr(args, "dry_run", False):
        return build()
    from bonehpc import slurm

    with slurm.dry_run() as scripts:
        entry = build()
    for text in scripts:
        print(text)
    print("dependency graph (dry run: nothing submitted, nothing recorded in jobs.json):")
    _print_submission(entry)
    return None


def register(sub: argparse._SubParsersAction) -> None:
    group = submit_subparsers(sub)
    f = group.add_parser(
        "folds",
        help="teacher array -> student array (per-task aftercorr) -> holdout evaluation + report",
        description="Submit the cross-validated experiment of --config: one teacher and one student task per "
        "fold plus the final model (array index K), then the holdout evaluation and report (afterany). "
        "Completed runs and tasks still pending/running are skipped, so submitting again is safe. "
        "cluster.mode=local runs the same graph without Slurm, ready tasks at once (cluster.local_parallel); "
        "debug in-process.",
    )
    add_config_args(f)
    add_dry_run_arg(f)
    f.set_defaults(func=_submit_folds)
    k = group.add_parser(
        "pack",
        help="pack data.mura_root into data.shards on the cluster: one array task per shard, then finalize",
        description="Plan the shards here, then submit an array (one task per shard; packed shards are skipped, "
        "so submitting again resumes) and a finalize job (index.csv, manifest.json) after it.",
    )
    add_config_args(k)
    add_dry_run_arg(k)
    k.set_defaults(func=_submit_pack)
    r = group.add_parser("resubmit", help="resubmit only the failed / cancelled / timed-out tasks of an experiment")
    add_exp_args(r)
    r.set_defaults(func=_resubmit)

    s = sub.add_parser("status", help="per fold and role: state, elapsed, exit code, requeues, node (sacct)")
    add_exp_args(s)
    s.add_argument("--json", action="store_true", help="print the table and totals as JSON")
    s.set_defaults(func=_status)


def _print_submission(entry: dict) -> None:
    for job in entry["jobs"]:
        what = f"{job['kind']} {job['role']}".strip()
        tasks = ", ".join(f"{t.get('fold', '')}={t['task_id']}" if "fold" in t else t["task_id"] for t in job["tasks"])
        dep = f"  [{job['dependency']}]" if job.get("dependency") else ""
        print(f"{what:16s} job {job['job_id']}: {tasks}{dep}")
    for key, why in sorted(entry.get("skipped", {}).items()):
        print(f"skipped {key}: {why}")
    if not entry["jobs"]:
        print("nothing to submit")
    print(f"run dir: {entry['run_dir']}")


def _submit_graph(args: argparse.Namespace, builder: Callable[..., dict]) -> int:
    """Run a jobs.submit builder on the command's config and print what it did; 1 when a local task failed."""
    cfg = load_cfg(args)
    entry = run_submission(args, lambda: builder(cfg))
    if entry is None:
        return 0
    _print_submission(entry)
    failed = [t for j in entry["jobs"] for t in j["tasks"] if t.get("state") == "FAILED"]
    return 1 if failed else 0


def _submit_folds(args: argparse.Namespace) -> int:
    from jobs.submit import submit_folds

    return _submit_graph(args, submit_folds)


def _submit_pack(args: argparse.Namespace) -> int:
    from jobs.submit import submit_pack

    return _submit_graph(args, submit_pack)


def _resubmit(args: argparse.Namespace) -> int:
    from jobs.submit import resubmit

    entry = resubmit(exp_dir(args))
    _print_submission(entry)
    return 0


def _status(args: argparse.Namespace) -> int:
    from bonehpc.accounting import experiment_status, status_records, totals
    from bonehpc.paths import ExperimentPaths

    d = exp_dir(args)
    if not ExperimentPaths(d).jobs.is_file():
        print(f"bonehpc status: {ExperimentPaths(d).jobs} not found (nothing submitted here)", file=sys.stderr)
        return 2
    df = experiment_status(d)
    tot = totals(df)
    if args.json:
        doc = {"experiment": str(d), "tasks": status_records(df), "totals": tot}
        print(json.dumps(doc, default=str, allow_nan=False))  # strict JSON: null, never NaN
        return 0
    cols = ["fold", "role", "task_id", "state", "elapsed_s", "exit", "requeues", "node", "gpu_hours", "metrics"]
    print(df[cols].to_string(index=False))
    errors = df[df["error"].fillna("") != ""] if "error" in df else df.iloc[0:0]
    for row in errors.itertuples():  # failures explained: the last exception line of each failed task
        print(f"{row.fold}/{row.role} {row.task_id} {row.state}: {row.error}")
    states = ", ".join(f"{k} {v}" for k, v in tot["states"].items())
    print(
        f"\n{tot['tasks']} tasks ({states}); elapsed {tot['elapsed_h']:.3f} h; GPU-hours {tot['gpu_hours']:.3f}; "
        f"requeues {tot['requeues']}"
    )
    return 0
