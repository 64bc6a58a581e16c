"""`bonehpc train` (one fold/role in this process) and `bonehpc evaluate` (holdout evaluation).

`python -m bonehpc.cli.train ARGS` (what torchrun launches) is `main(ARGS)` here, i.e. `bonehpc train ARGS`:
one argparse tree, one error handling (input errors: one line, exit 2; preempted: exit 3).
"""

from __future__ import annotations

import argparse
import logging
import sys

from bonehpc.cli import add_config_args, load_cfg
from bonehpc.constants import INPUT_ERROR_EXIT_CODE, PREEMPTED_EXIT_CODE
from bonehpc.paths import ROLES, parse_fold

log = logging.getLogger("bonehpc.cli.train")


TRAIN_EPILOG = """\
This runs one process. For several processes (GPUs) on one node use torchrun with the module entry:
  torchrun --standalone --nproc_per_node=4 -m bonehpc.cli.train --config C --fold 0 --role teacher [key=value ...]
On a cluster, the Slurm commands of bonehpc submit every fold/role as jobs (they call the same code).

The run resumes from <run dir>/last.pt when it exists and returns at once when metrics.json says completed.
SIGUSR2 / SIGTERM stop it at the next step boundary; last.pt is written and the exit status is 3
(run it again to resume). Roles: teacher, student (distils from the fold's teacher), baseline (the
student's model trained without distillation).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one fold/role (teacher, distilled student or baseline student) in this process",
        description="Train the teacher, student or baseline of one fold (or the final model on the train "
        "patients less a held-out slice, train.final_val_frac, that monitors it; it keeps its last epoch unless "
        "train.final_epoch=best).",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument(
        "--fold", required=True, help="fold number 0..K-1 (validate on it) or 'final' (validate on held-out train)"
    )
    p.add_argument("--role", required=True, choices=ROLES, help="which model to train")
    p.add_argument("--run-dir", help="output folder (default: runs/<name>/fold<k>|final/<role>)")
    p.set_defaults(func=_train)

    o = sub.add_parser(
        "outputs",
        help="teacher outputs of one fold: the frozen teacher's logits on every training view of the students",
        description="Runs the fold's frozen teacher (best.pt) in inference mode over every training image of "
        "every epoch of the student schedule, with the students' views (seed, preset, size), and writes "
        "runs/<name>/<fold>/outputs/teacher_outputs.h5; students with distill.teacher_outputs auto|cached read "
        "it instead of running the teacher. Resumable; torchrun -m bonehpc.cli.outputs for several processes.",
    )
    add_config_args(o)
    o.add_argument("--fold", required=True, help="fold number 0..K-1 or 'final'")
    o.add_argument("--role", choices=["outputs"], default="outputs", help=argparse.SUPPRESS)  # the task launcher's
    o.set_defaults(func=_outputs)

    e = sub.add_parser(
        "evaluate",
        help="holdout evaluation on the official valid split: final models and fold ensembles",
        description="Evaluate final/<role>/best.pt and the mean of the fold models of each role on the valid "
        "split; writes holdout/<model>/predictions.csv and metrics.json. Models without checkpoints are skipped.",
    )
    add_config_args(e)
    e.set_defaults(func=_evaluate)

    w = sub.add_parser(
        "weights",
        help="fetch ImageNet weights into a shared cache (on a machine with internet; jobs never download)",
        description="Downloads MODEL's default pretrained weights (timm / Hugging Face) into --cache-dir in the "
        "Hugging Face cache layout and prints the file. Jobs then load them offline: set "
        "teacher.pretrained=true and teacher.weights=<cache dir or printed file>. Returns at once when the "
        "weights are already there.",
    )
    w.add_argument("model", nargs="?", default="resnet50", help="timm model name (default resnet50)")
    w.add_argument("--cache-dir", help="shared folder for the weights (default: the Hugging Face cache)")
    w.set_defaults(func=_weights)


def _train(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    from bonehpc.train import Preempted, run

    try:
        fold = parse_fold(args.fold)
    except ValueError as err:
        print(f"bonehpc train: {err}", file=sys.stderr)
        return INPUT_ERROR_EXIT_CODE
    try:
        metrics = run(cfg, fold, args.role, args.run_dir)
    except Preempted:  # run() logged it
        return PREEMPTED_EXIT_CODE
    log.info("best val metrics: %s", {k: round(v, 4) for k, v in metrics.items() if "/" not in k[4:]})
    return 0


def _outputs(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    from bonehpc.outputs_job import compute
    from bonehpc.train import Preempted

    try:
        fold = parse_fold(args.fold)
    except ValueError as err:
        print(f"bonehpc outputs: {err}", file=sys.stderr)
        return INPUT_ERROR_EXIT_CODE
    try:
        compute(cfg, fold)
    except Preempted:
        return PREEMPTED_EXIT_CODE
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    from bonehpc.evaluate import evaluate_holdout

    results = evaluate_holdout(cfg)
    if not results:
        log.error(
            "nothing to evaluate: no final/<role>/best.pt and no fold checkpoints under %s/%s", cfg.run_root, cfg.name
        )
        return 1
    for model, m in results.items():
        log.info(
            "%-17s study_kappa %.4f at 0.5 (MURA protocol)%s  study_auroc %.4f  image_auroc %.4f",
            model,
            m["study_kappa"],
            f", {m['oof/study_kappa']:.4f} at the out-of-fold cut {m['oof_threshold']:.3f}"
            if "oof_threshold" in m
            else "",
            m["study_auroc"],
            m["image_auroc"],
        )
    return 0


def _weights(args: argparse.Namespace) -> int:
    from bonehpc.models.weights import WeightsNotFoundError, fetch_weights

    try:
        path = fetch_weights(args.model, args.cache_dir)
    except (WeightsNotFoundError, RuntimeError, OSError) as err:
        print(f"bonehpc weights: {err}", file=sys.stderr)
        return 1
    print(path)
    print(f"use: teacher.pretrained=true teacher.weights={path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m bonehpc.cli.train ARGS`: `bonehpc train ARGS`; returns 0, 2 (bad input) or 3 (preempted)."""
    from bonehpc.cli import main as bonehpc_main

    return bonehpc_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
