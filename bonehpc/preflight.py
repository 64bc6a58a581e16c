"""Preflight of a submission (local and Slurm): everything a task would fail on minutes or hours later.

Checked before anything is queued, each failure one line (PreflightError, a ConfigError: the CLI prints it
and exits 2): the shard folder is present and passes the quick check, folds.csv agrees with the packed
patients and data.num_folds, pretrained weights exist where a role asks for them, and the resources of
each job kind are sane (training processes have a GPU and a CPU each, a tune trial runs on one node and
at most one GPU, packing asks for no GPU, a training job's time limit leaves room to progress after
start-up, one checkpoint and the time-limit signal).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from bonehpc.config import ConfigError, ExperimentConfig

if TYPE_CHECKING:
    from bonehpc.paths import ExperimentPaths
    from bonehpc.slurm import ClusterProfile

log = logging.getLogger(__name__)


class PreflightError(ConfigError):
    """A submission that would fail once running; nothing was queued. One line."""


def check_shards(cfg: ExperimentConfig) -> str:
    """The quick shard check (manifest, index, sizes, shapes); its summary line."""
    from bonehpc.data.shards import ShardError, verify_shards

    shards = Path(cfg.data.shards)
    if not shards.is_dir():
        raise PreflightError(f"preflight: data.shards {shards} is not a folder (run `bonehpc pack` first)")
    try:
        return verify_shards(shards, full=False).summary()
    except (ShardError, OSError) as err:
        raise PreflightError(f"preflight: {err}") from None


def check_folds(cfg: ExperimentConfig, folds_csv: Path) -> None:
    """folds.csv (when it exists) has data.num_folds folds and covers every packed train patient
    (`bonehpc.data.folds.ensure_folds`, check only: the same check training makes)."""
    import pandas as pd

    from bonehpc.data.folds import FoldError, ensure_folds
    from bonehpc.data.shards import INDEX_CSV

    if not folds_csv.is_file():
        return  # a new experiment: prepare_experiment writes it from the shard index after the preflight
    try:
        index = pd.read_csv(Path(cfg.data.shards) / INDEX_CSV, dtype={"patient": str})
        ensure_folds(folds_csv, index, cfg.data.num_folds, cfg.data.fold_seed, create=False)
    except (FoldError, OSError, KeyError, ValueError) as err:
        msg = str(err)
        raise PreflightError(f"preflight: {msg if msg.startswith(str(folds_csv)) else f'{folds_csv}: {msg}'}") from None


def check_weights(cfg: ExperimentConfig, roles: list[str]) -> None:
    """Pretrained weights of each role that asks for them are on disk (jobs never download)."""
    for role in roles:
        rcfg = cfg.role(role)
        if not rcfg.pretrained:
            continue
        from bonehpc.models.weights import find_weights

        try:
            find_weights(rcfg.model, rcfg.weights or None)
        except (FileNotFoundError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PreflightError(f"preflight: {role}.pretrained: {first}") from None


def check_resources(profile: ClusterProfile, kinds: dict[str, int]) -> None:
    """Resources of each job kind (kind -> training processes per node; 0 for kinds that do not train)."""
    for kind, nproc in kinds.items():
        spec = profile.for_kind(kind)
        where = f"preflight: profile {profile.name}, {kind} jobs"
        if kind == "pack" and spec.gpus_per_node:
            raise PreflightError(f"{where}: gpus_per_node={spec.gpus_per_node}, but packing uses no GPU")
        if kind == "tune" and (spec.nodes > 1 or spec.gpus_per_node > 1):
            raise PreflightError(
                f"{where}: a trial is one process on one node and at most one GPU "
                f"(nodes={spec.nodes}, gpus_per_node={spec.gpus_per_node}); set per_kind.tune"
            )
        if nproc and spec.gpus_per_node and nproc > spec.gpus_per_node:
            raise PreflightError(f"{where}: {nproc} training processes per node but gpus_per_node={spec.gpus_per_node}")
        if nproc and spec.cpus_per_task < nproc:
            raise PreflightError(f"{where}: cpus_per_task={spec.cpus_per_task} < {nproc} training processes")
        if nproc and spec.mem_gb < nproc:
            raise PreflightError(f"{where}: mem_gb={spec.mem_gb} is under 1 GB per training process ({nproc})")


def check_time_limit(profile: ClusterProfile, kind: str) -> None:
    """A run of a training job must get past start-up, write one checkpoint before the time-limit signal,
    and still progress: time_min * 60 >= startup_s + room (startup_s again) + save_wait_s + signal_delay_s.

    A shorter limit only restarts: every requeued run gets the signal right after its start-up, saves
    nothing new, and the job ends `timed-out too many times`.
    """
    spec = profile.for_kind(kind)
    need = 2 * spec.startup_s + spec.save_wait_s + spec.signal_delay_s
    if spec.time_min * 60 < need:
        raise PreflightError(
            f"preflight: profile {profile.name}, {kind} jobs: time_min={spec.time_min} ({spec.time_min * 60} s) "
            f"cannot fit start-up (startup_s={spec.startup_s} s) + one checkpoint (save_wait_s={spec.save_wait_s} s) "
            f"+ signal_delay_s={spec.signal_delay_s} s with room to progress (another {spec.startup_s} s): "
            f"need time_min >= {-(-need // 60)}"
        )


def train_processes(cfg: ExperimentConfig, profile: ClusterProfile, kind: str = "train") -> int:
    """Training processes per node of a job kind, as the task will start them (tune: one)."""
    if kind == "tune":
        return 1
    spec = profile.for_kind(kind)
    return cfg.cluster.nproc_per_node or spec.nproc_per_node or max(1, spec.gpus_per_node)


def preflight_training(
    cfg: ExperimentConfig, paths: ExperimentPaths, profile: ClusterProfile, mode: str, roles: list[str], kind: str
) -> None:
    """Everything a training submission (folds, resubmit: kind train; tune) needs; logs the shard summary."""
    if mode == "slurm":
        kinds = {kind: train_processes(cfg, profile, kind)}
        if kind == "train":
            kinds["evaluate"] = 0
        check_resources(profile, kinds)
        check_time_limit(profile, kind)
    log.info("preflight: %s", check_shards(cfg))
    check_folds(cfg, paths.folds)
    check_weights(cfg, roles)
