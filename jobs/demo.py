"""The end-to-end demo: the main job of bonehpc on an embedded default (synthetic data, local executor, CPU).

Every step is the same code a cluster run uses; each is resumable, so a second `make demo` reuses the
synthetic data, the shards and the completed runs and only redoes what is missing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from bonehpc.config import ExperimentConfig
from bonehpc.paths import (
    HOLDOUT_METRICS,
    HOLDOUT_MODELS,
    REPORT_INDEX,
    RUN_METRICS,
    ExperimentPaths,
    experiment_roles,
    fold_keys,
    read_json,
)

log = logging.getLogger(__name__)


def _default_step(name: str) -> float:
    log.info("=== %s", name)
    return time.perf_counter()


def _fmt(x: float) -> str:
    return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


FOLD_METRICS = ("image_auroc", "image_accuracy", "study_auroc", "study_accuracy", "study_f1", "study_kappa")
"""Columns of the demo's fold table (val/<name> of each run's metrics.json)."""


def fold_table(paths: ExperimentPaths, folds: list[int | str], roles: tuple[str, ...]) -> pd.DataFrame:
    """Per fold and role: image- and study-level metrics of the best epoch (from metrics.json)."""
    rows = []
    for fold in folds:
        for role in roles:
            row: dict[str, object] = {"fold": str(fold), "role": role}
            doc = read_json(paths.role_dir(fold, role) / RUN_METRICS)
            if doc is not None:
                m = doc.get("metrics", {})
                row.update({key: m.get(f"val/{key}", float("nan")) for key in FOLD_METRICS})
            row["status"] = "completed" if paths.role_completed(fold, role) else "missing"
            rows.append(row)
    return pd.DataFrame(rows)


def print_metrics(cfg: ExperimentConfig, paths: ExperimentPaths) -> None:
    """The fold table (every role of the experiment) and the holdout metrics of each model that has them."""
    table = fold_table(paths, fold_keys(cfg.data.num_folds), experiment_roles(cfg))
    with pd.option_context("display.float_format", _fmt, "display.width", 160):
        print(table.to_string(index=False))
    holdout = {}
    for model in HOLDOUT_MODELS:
        m = read_json(paths.holdout_dir(model) / HOLDOUT_METRICS)
        if m is not None:
            m = m.get("metrics", m)
            holdout[model] = {k: m.get(k, m.get(f"val/{k}")) for k in ("study_auroc", "study_kappa", "image_auroc")}
    if holdout:
        print("holdout (official valid split):")
        print(pd.DataFrame(holdout).T.to_string(float_format=_fmt))


def run_demo(
    cfg: ExperimentConfig,
    *,
    patients: int = 150,
    seed: int = 0,
    step: Callable[[str], float] = _default_step,
) -> int:
    """synth -> pack -> manifest + folds of the packed images -> fold graph (teacher, KD student, final model,
    holdout) -> report -> predict. Returns 0, or 1 when a task failed."""
    from bonehpc.data.folds import apply_folds, fold_summary, read_folds
    from bonehpc.data.mura import locate, read_manifest, summarize
    from bonehpc.data.pack import pack_dataset
    from bonehpc.data.synthetic import DEFAULT_BAD_FRAC, generate
    from jobs.submit import prepare_experiment, submit_folds

    t_all = time.perf_counter()
    root = Path(cfg.data.mura_root)
    t0 = step(f"1/6 synthetic MURA-v1.1 tree in {root}")
    try:
        locate(root)
        print(f"reusing {root / 'MURA-v1.1'} (delete it to regenerate)")
    except Exception:  # noqa: BLE001 - no tree yet: make one
        generate(root, patients=patients, seed=seed, bad_frac=DEFAULT_BAD_FRAC)  # a few unusable files, as real data
        print(f"generated {patients} patients (seed {seed}) in {time.perf_counter() - t0:.1f} s")

    step(f"2/6 HDF5 shards at {cfg.data.pack_size} px in {cfg.data.shards} (unusable images rejected and listed)")
    summary = pack_dataset(
        root,
        cfg.data.shards,
        pack_size=cfg.data.pack_size,
        fit=cfg.data.fit,
        compression=cfg.data.compression,
        images_per_shard=cfg.data.images_per_shard,
        workers=max(1, cfg.data.num_workers),
        max_reject_frac=cfg.data.max_reject_frac,
        min_side=cfg.data.min_side,
    )
    print("\n".join(summary.lines()))

    step(f"3/6 manifest of the packed images, {cfg.data.num_folds} patient-grouped folds (body part x label)")
    paths = prepare_experiment(cfg)
    manifest = read_manifest(paths.manifest)
    print(summarize(manifest).to_string(index=False))
    print(fold_summary(apply_folds(manifest, read_folds(paths.folds))).to_string(index=False))

    step(f"4/6 teacher + distilled student per fold, final model, holdout (cluster mode {cfg.cluster.mode})")
    entry = submit_folds(cfg)
    failed = [
        f"{job['role'] or job['kind']} {task.get('fold', '')}".strip()
        for job in entry.get("jobs", [])
        for task in job.get("tasks", [])
        if task.get("state") not in (None, "COMPLETED")
    ]
    print_metrics(cfg, paths)

    step("5/6 report")
    report = paths.report / REPORT_INDEX
    evaluated = any(
        job["kind"] == "evaluate" and all(t.get("state") == "COMPLETED" for t in job["tasks"])
        for job in entry.get("jobs", [])
    )
    if not (evaluated and report.is_file()):  # the evaluate job writes the report; build it when it did not run
        from bonehpc.report import build_report

        report = build_report(paths.root)
    print(f"report: {report.resolve()}  (open it in a browser; report.md and CSV tables beside it)")

    step("6/6 predict on the official valid images with the fold ensemble of students")
    from bonehpc.predict import predict, studies_csv_path

    out_csv = paths.root / "predict" / "valid_preds.csv"
    valid_csv = locate(root) / "MURA-v1.1" / "valid_image_paths.csv"
    preds = predict(paths.root, valid_csv, out_csv, role="student")
    print(f"{len(preds)} images scored -> {out_csv} (studies: {studies_csv_path(out_csv)})")

    print(f"\ndemo finished in {time.perf_counter() - t_all:.0f} s; experiment folder {paths.root.resolve()}")
    if failed:
        print(f"FAILED tasks: {', '.join(failed)} (see {paths.submitit})")
        return 1
    return 0
