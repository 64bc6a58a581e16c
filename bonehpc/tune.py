"""Optuna search over the student / distillation hyperparameters, one Slurm array task per trial.

The study lives in an Optuna journal file in the experiment dir (`runs/<exp>/tune/journal.log`, safe on
a shared file system) or in a server RDB (`tune.storage=mysql+pymysql://...`). `jobs.submit.submit_tune`
creates the study and submits ONE array job of `tune.trials` tasks, `tune.parallel` at a time; every task runs
`run_task`: it takes the next trial (a retried one first), trains the KD student on `tune.folds`
against the already-trained teachers and reports `tune.metric` after every epoch so the pruner can stop
it early.

Folds of one trial are trained one after another. The pruner sees one step per fold-epoch:
step = position of the fold in `tune.folds` x epochs + epoch, value = that fold's validation metric at
that epoch. Every trial trains its folds in the same order, so a step compares the same fold at the same
epoch across trials. The objective is the mean over folds of the metric each fold's run returns.

Failures. A trial whose process dies is found three ways: (1) `train.run` saves `last.pt` on
SIGUSR2/SIGTERM and raises `Preempted`: the trial is marked FAIL at once and a WAITING copy is
enqueued by Optuna's retry callback before the task requeues; (2) a task that starts again (Slurm
requeue) finds the trial it ran before still RUNNING and fails + retries it; (3) every task, before it
takes a trial, checks the owner of each RUNNING trial (user attributes written when the trial started:
`slurm_job`, `host`, `pid`, `pid_start`) and fails + retries the trials whose owner is dead: a Slurm
task that sacct/squeue report ended (`bonehpc.accounting.job_states`), or, without Slurm, a process
that no longer exists on this host. An owner that cannot be checked (another host without Slurm, a
job neither sacct nor squeue knows) is left alone: a trial is never taken from a live worker.
A retried trial keeps its parameters and reuses the run dirs of the trial it retries
(`retry_history[0]`), so `train.run` resumes from `last.pt`. Only public Optuna API is used (pinned
exactly in pyproject.toml).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from bonehpc.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    check_tune_space,
    config_in_place,
    save_config,
)
from bonehpc.curves import Curves
from bonehpc.fsio import atomic_write_json, atomic_write_text
from bonehpc.paths import BEST_CKPT, BEST_PARAMS, RUN_CONFIG, ExperimentPaths, fold_name, read_json
from bonehpc.registry import read_registry

log = logging.getLogger(__name__)

LOCK_GRACE_S = 10
"""A journal lock file older than this is forcibly released (an append holds it for milliseconds)."""


class TuneError(RuntimeError):
    """The study cannot be set up or run; the message says what is missing or wrong."""


def study_key(cfg: ExperimentConfig) -> str:
    """'' for the experiment's own study (tune.study_name empty or the experiment name), else the study name
    (its files then live in runs/<exp>/tune/studies/<name>/, so studies never share trial dirs)."""
    name = cfg.tune.study_name
    return "" if not name or name == cfg.name else _safe_name(name)


def study_dir(cfg: ExperimentConfig) -> Path:
    """config.yaml, best_params.yaml, tasks/ and trials/ of the study of `cfg` (ExperimentPaths.study_dir)."""
    return ExperimentPaths.of(cfg).study_dir(study_key(cfg))


def trial_dir(cfg: ExperimentConfig, number: int) -> Path:
    return ExperimentPaths.of(cfg).trial_dir(number, study_key(cfg))


def trial_run_dir(cfg: ExperimentConfig, number: int, fold: int) -> Path:
    """The student run of one fold of one trial: trials/<number>/fold<k>/student."""
    return trial_dir(cfg, number) / fold_name(fold) / "student"


def _safe_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or any(c.isspace() for c in name):
        raise ConfigError(f"tune.study_name: {name!r} cannot name a folder (no '/', spaces or leading '.')")
    return name


# ----------------------------------------------------------------------------------------------
# Search space


def space_distributions(space: Mapping[str, Mapping[str, Any]]) -> dict[str, BaseDistribution]:
    """Optuna distributions of `tune.space` (dotted key -> {type, low, high, log, step, choices}).

    Raises:
        ConfigError: naming the key, from `config.check_tune_space` (the one validation of the space).
    """
    check_tune_space(dict(space))  # type: ignore[arg-type]
    dists: dict[str, BaseDistribution] = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            dists[key] = CategoricalDistribution(list(spec["choices"]))
        elif spec["type"] == "float":
            step = spec.get("step")
            log = bool(spec.get("log", False))
            dists[key] = FloatDistribution(
                float(spec["low"]), float(spec["high"]), log=log, step=None if step is None else float(step)
            )
        else:
            dists[key] = IntDistribution(
                spec["low"], spec["high"], log=bool(spec.get("log", False)), step=int(spec.get("step", 1))
            )
    return dists


def suggest_params(trial: optuna.trial.BaseTrial, space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Sample (or, for a retried trial, read back) one value per key of the search space."""
    params: dict[str, Any] = {}
    for key, dist in space_distributions(space).items():
        if isinstance(dist, FloatDistribution):
            params[key] = trial.suggest_float(key, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, IntDistribution):
            params[key] = trial.suggest_int(key, dist.low, dist.high, log=dist.log, step=dist.step)
        else:
            assert isinstance(dist, CategoricalDistribution)
            params[key] = trial.suggest_categorical(key, dist.choices)
    return params


def trial_config(cfg: ExperimentConfig, params: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment config with a trial's parameters (dotted keys) and `tune.epochs` applied."""
    overrides: dict[str, Any] = dict(params)
    if cfg.tune.epochs > 0:
        overrides["student.epochs"] = cfg.tune.epochs
    try:
        return apply_overrides(cfg, overrides)
    except ConfigError as err:
        raise ConfigError(f"tune.space: applying {dict(params)} failed: {err}") from None


FIXED_KEYS = ("name", "run_root", "cluster.", "tune.", "data.mura_root", "data.shards", "data.cross_split_patients")
"""Keys a search may not vary: where the experiment, its jobs and its data are (a trial would write outside the
study, or train on other data than its teachers), and the search itself."""


def check_space(cfg: ExperimentConfig) -> None:
    """Fail early (at submit) when a space key is not a config key, is one of FIXED_KEYS, or when a range end
    or ANY categorical choice gives an invalid config (each is checked once, the other keys at a range end)."""
    dists = space_distributions(cfg.tune.space)
    fixed = [k for k in dists if k in FIXED_KEYS or k.startswith(tuple(p for p in FIXED_KEYS if p.endswith(".")))]
    if fixed:
        raise ConfigError(f"tune.space: {', '.join(fixed)} cannot be searched (where the experiment and its data are)")
    for corner in (0, -1):
        sample: dict[str, Any] = {}
        for key, dist in dists.items():
            if isinstance(dist, CategoricalDistribution):
                sample[key] = dist.choices[corner]
            else:
                assert isinstance(dist, (FloatDistribution, IntDistribution))
                sample[key] = dist.low if corner == 0 else dist.high
        trial_config(cfg, sample)
        for key, dist in dists.items():
            if isinstance(dist, CategoricalDistribution):
                for choice in dist.choices[1:-1]:
                    trial_config(cfg, {**sample, key: choice})


def missing_teachers(cfg: ExperimentConfig) -> dict[int, Path]:
    """Fold -> `best.pt` of the teachers of `tune.folds` that are not final (the search reuses them): absent,
    or written by a teacher still training (its metrics.json does not say completed)."""
    paths = ExperimentPaths.of(cfg)
    return {
        f: paths.role_dir(f, "teacher") / BEST_CKPT
        for f in cfg.tune.folds
        if not (paths.role_completed(f, "teacher") and (paths.role_dir(f, "teacher") / BEST_CKPT).is_file())
    }


def check_folds(cfg: ExperimentConfig) -> None:
    bad = [f for f in cfg.tune.folds if not 0 <= f < cfg.data.num_folds]
    if bad:
        raise ConfigError(
            f"tune.folds: {bad} outside 0..{cfg.data.num_folds - 1} (data.num_folds={cfg.data.num_folds})"
        )


# ----------------------------------------------------------------------------------------------
# Storage, sampler, pruner, study


def retry_callback(cfg: ExperimentConfig) -> Any:
    """Optuna's retry callback: a dead trial is re-enqueued (WAITING, same params, same reports)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=cfg.tune.max_retry, inherit_intermediate_values=True
        )


def build_storage(cfg: ExperimentConfig) -> BaseStorage:
    """The study storage: the journal file of the experiment (default) or the RDB at `tune.storage`.

    SQLite is refused: its locking is unreliable on the shared file systems Slurm jobs write to
    (optuna#815); the journal file needs no locking by fcntl. Dead trials are found by `fail_dead_trials`
    (the owner's job or process), not by storage heartbeats.
    """
    import warnings

    url = cfg.tune.storage.strip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if not url:
            journal = ExperimentPaths.of(cfg).tune_journal
            journal.parent.mkdir(parents=True, exist_ok=True)
            lock = JournalFileOpenLock(str(journal), grace_period=LOCK_GRACE_S)
            return JournalStorage(JournalFileBackend(str(journal), lock_obj=lock))
        if url.startswith("sqlite"):
            raise ConfigError(
                "tune.storage: SQLite is not safe on shared file systems; leave tune.storage empty for the "
                "journal file or use a server database (mysql+pymysql://..., postgresql://...)"
            )
        if "://" not in url:
            raise ConfigError(f"tune.storage: {url!r} is not a database URL (e.g. mysql+pymysql://u:p@host/db)")
        try:
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except Exception as err:  # sqlalchemy raises many kinds; the URL (minus password) names the problem
            raise TuneError(f"tune.storage: cannot open {_hide_password(url)}: {err}") from err


def _hide_password(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def study_name(cfg: ExperimentConfig) -> str:
    return cfg.tune.study_name or cfg.name


def build_pruner(cfg: ExperimentConfig) -> optuna.pruners.BasePruner:
    """median: MedianPruner that waits for a few finished trials; halving: successive halving; none."""
    if cfg.tune.pruner == "median":
        # Optuna's default waits for 5 finished trials; small studies would then never prune.
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, cfg.tune.trials // 3)), n_warmup_steps=0)
    if cfg.tune.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def build_sampler(cfg: ExperimentConfig, worker: int = 0) -> optuna.samplers.BaseSampler:
    """TPE seeded from `tune.sampler_seed` and the worker index.

    The sampler is not stored with the study: each task builds its own. Tasks that started at the
    same moment see the same history, so the same seed would make them propose the same point; the
    worker index separates them. constant_liar keeps TPE away from points that running trials test.
    """
    import warnings

    seed = int(np.random.SeedSequence([cfg.tune.sampler_seed, worker]).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def open_study(
    cfg: ExperimentConfig, worker: int = 0, storage: BaseStorage | None = None, create: bool = False
) -> optuna.Study:
    """Create (create=True) or load the study of the experiment, maximising `tune.metric`.

    The search space and metric are stored with the study; creating it again with a different
    space or metric is an error (use another `tune.study_name`).
    """
    storage = storage or build_storage(cfg)
    name = study_name(cfg)
    kwargs: dict[str, Any] = {
        "study_name": name,
        "storage": storage,
        "sampler": build_sampler(cfg, worker),
        "pruner": build_pruner(cfg),
    }
    if create:
        study = optuna.create_study(direction="maximize", load_if_exists=True, **kwargs)
        identity = {"metric": cfg.tune.metric, "space": cfg.tune.space, "folds": list(cfg.tune.folds)}
        for key, value in identity.items():
            old = study.user_attrs.get(key)
            if old is None:
                study.set_user_attr(key, value)
            elif old != value:
                raise TuneError(
                    f"study {name!r} already exists with a different tune.{key} ({old!r}); "
                    "set tune.study_name to start a new study"
                )
        return study
    try:
        return optuna.load_study(**kwargs)
    except KeyError:
        raise TuneError(f"no study {name!r} in {storage_label(cfg)}; run `bonehpc submit tune` first") from None


def storage_label(cfg: ExperimentConfig) -> str:
    return _hide_password(cfg.tune.storage) if cfg.tune.storage else str(ExperimentPaths.of(cfg).tune_journal)


# ----------------------------------------------------------------------------------------------
# One trial


def original_number(trial: FrozenTrial) -> int:
    """The number of the first trial of a retry series (the trial itself when it is not a retry)."""
    history = trial.system_attrs.get("retry_history") or []
    return int(history[0]) if history else int(trial.number)


class Objective:
    """Trains the KD student of one trial on `tune.folds` and returns the mean validation metric.

    `train_fold(cfg, fold, run_dir, on_epoch_end) -> dict` defaults to `bonehpc.train.run` of the student,
    which resumes from `last.pt` and returns at once for a run dir whose `metrics.json` says completed.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        on_start: Callable[[optuna.Trial], None] | None = None,
        train_fold: Callable[..., Mapping[str, Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_start = on_start
        self.train_fold = train_fold or _train_student
        self.trial_number: int | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial_number = trial.number
        if self.on_start:
            self.on_start(trial)
        frozen = _trial_by_number(trial.study, trial.number)  # optuna.Trial does not expose system attrs
        number = original_number(frozen) if frozen is not None else trial.number
        if number != trial.number:
            log.info("trial %d retries trial %d: resuming in %s", trial.number, number, trial_dir(self.cfg, number))
        curves: Curves | None = None
        try:
            params = suggest_params(trial, self.cfg.tune.space)
            cfg = trial_config(self.cfg, params)
            save_config(cfg, trial_dir(self.cfg, number) / RUN_CONFIG)
            epochs = cfg.student.epochs
            metric = self.cfg.tune.metric
            values: list[float] = []
            # the intermediate values the pruner sees, as curves of trials/<number> (beside the runs' own)
            curves = Curves(trial_dir(self.cfg, number))
            for pos, fold in enumerate(self.cfg.tune.folds):
                run_dir = trial_run_dir(self.cfg, number, fold)
                # a fold finished before a preemption returns its metrics at once (train.run reads metrics.json)
                done = self.train_fold(cfg, fold, run_dir, _PruneHook(trial, metric, pos * epochs, curves))
                value = _metric(done, metric, run_dir)
                trial.set_user_attr(f"{fold_name(fold)}/{metric}", value)
                values.append(value)
            return float(np.mean(values))
        except optuna.TrialPruned:
            raise
        except BaseException as err:
            if not _is_preempted(err):
                trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
            raise
        finally:
            if curves is not None:
                curves.close()


class _PruneHook:
    """Per-epoch callback of train.run: report the metric, raise TrialPruned when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str, offset: int, curves: Curves | None = None) -> None:
        self.trial, self.metric, self.offset, self.curves = trial, metric, offset, curves

    def __call__(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        if self.metric not in metrics:
            raise TuneError(
                f"tune.metric {self.metric!r} is not among the epoch metrics ({', '.join(sorted(metrics))})"
            )
        step = self.offset + int(epoch)
        value = float(metrics[self.metric])
        if math.isnan(value):
            value = float("-inf")  # NaN would make the pruner ignore the step; an undefined metric is the worst
        self.trial.report(value, step)
        if self.curves is not None:
            self.curves.scalars(step, {f"tune/{self.metric}": value})
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (epoch {epoch}): {self.metric}={value:.4f}")


def _train_student(
    cfg: ExperimentConfig, fold: int, run_dir: Path, on_epoch_end: Callable[[int, Mapping[str, Any]], None]
) -> Mapping[str, Any]:
    """bonehpc.train.run of the student into the trial's run dir, reporting every epoch to the pruner.

    Runs in this process with world size 1: a trial is one task on one GPU (or CPU); the array
    provides the parallelism, so pruning needs no broadcast between ranks.
    """
    from bonehpc import train

    return train.run(cfg, fold, "student", run_dir=run_dir, on_epoch_end=on_epoch_end)


def _metric(metrics: Mapping[str, Any], metric: str, run_dir: Path) -> float:
    if metric not in metrics:
        raise TuneError(
            f"tune.metric {metric!r} missing from the final metrics of {run_dir} ({', '.join(sorted(metrics))})"
        )
    value = float(metrics[metric])
    return float("-inf") if math.isnan(value) else value


def _is_preempted(err: BaseException) -> bool:
    try:
        from bonehpc.train import Preempted
    except ImportError:
        return False
    return isinstance(err, Preempted)


# ----------------------------------------------------------------------------------------------
# One array task


def _trial_by_number(study: optuna.Study, number: int) -> FrozenTrial | None:
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            return t
    return None


def fail_and_retry(cfg: ExperimentConfig, study: optuna.Study, number: int, reason: str) -> None:
    """Mark a RUNNING trial FAIL and enqueue its retry (same parameters, same intermediate values)."""
    t = _trial_by_number(study, number)
    if t is None or t.state != TrialState.RUNNING:
        if t is not None and t.state == TrialState.FAIL and not _has_retry(study, t.number):
            retry_callback(cfg)(study, t)
        return
    log.warning("trial %d: %s; marking it FAIL and enqueueing a retry", number, reason)
    try:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    except (ValueError, RuntimeError) as err:  # another worker finished it first
        log.info("trial %d could not be failed: %s", number, err)
        return
    failed = _trial_by_number(study, number)
    assert failed is not None
    retry_callback(cfg)(study, failed)


def _has_retry(study: optuna.Study, number: int) -> bool:
    return any(number in (t.system_attrs.get("retry_history") or []) for t in study.get_trials(deepcopy=False))


def _slurm_task_id() -> str:
    """This process's Slurm task id (`<array job>_<index>`, or the job id), '' outside Slurm."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job:
        return f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID", "")


def _pid_start(pid: int) -> str:
    """Start time of a process in clock ticks since boot (/proc/<pid>/stat field 22); '' when unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_attrs() -> dict[str, Any]:
    """Who runs a trial: recorded as user attributes when it starts (pid_start last), read by `owner_alive`."""
    return {
        "slurm_job": _slurm_task_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _pid_start(os.getpid()),
    }


def owner_alive(attrs: Mapping[str, Any], job_states: Mapping[str, str]) -> bool | None:
    """Is the worker that runs a trial alive? True / False, None when it cannot be told.

    Slurm: the owner's task in `job_states` (bonehpc.accounting.job_states): a state that may still run is
    alive, an ended one dead, UNKNOWN undecided; our own task id is dead unless it is this very process (an
    earlier run of a requeued task). Without Slurm: the owner's pid on this host, with its start time (a
    reused pid is not the owner); another host undecided.
    """
    from bonehpc.accounting import ACTIVE_STATES

    me = owner_attrs()
    job = str(attrs.get("slurm_job") or "")
    if "pid_start" not in attrs:
        return None  # the trial was just created; its owner has not written all its attributes yet (last key)
    if job:
        if job == me["slurm_job"]:
            return attrs.get("pid") == me["pid"] and attrs.get("pid_start") == me["pid_start"]
        state = job_states.get(job, "UNKNOWN")
        return None if state == "UNKNOWN" else state in ACTIVE_STATES
    if attrs.get("host") != me["host"]:
        return None
    if not attrs["pid_start"]:  # no /proc where it started: the pid alone
        try:
            os.kill(int(attrs["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _pid_start(int(attrs["pid"])) == attrs["pid_start"]


def fail_dead_trials(cfg: ExperimentConfig, study: optuna.Study) -> list[int]:
    """Fail and retry every RUNNING trial whose owner is dead (`owner_alive` False); their numbers."""
    from bonehpc.accounting import job_states

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    jobs = {str(t.user_attrs["slurm_job"]) for t in running if t.user_attrs.get("slurm_job")}
    states = job_states(jobs - {_slurm_task_id()}) if jobs else {}
    dead = [t.number for t in running if owner_alive(t.user_attrs, states) is False]
    for number in dead:
        fail_and_retry(cfg, study, number, "its worker is gone")
    return dead


def _waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def run_task(
    cfg: ExperimentConfig,
    task_index: int,
    train_fold: Callable[..., Mapping[str, Any]] | None = None,
    storage: BaseStorage | None = None,
) -> list[dict[str, Any]]:
    """Run one array task: recover this task's earlier trial if it died, run one trial, then any retries left.

    Returns one `{"task", "trial", "state", "value"}` per trial run. A trial that raises is recorded as FAIL
    with its error (user attribute `error`) and the task goes on, so one bad trial does not stop the study.
    `Preempted` (and KeyboardInterrupt) propagate after the trial was failed and re-enqueued, for the job to
    requeue itself. Retries enqueued while this task ran (a dead trial of another task) are run here too,
    so a retry is not lost when every other task has already finished.
    """
    study = open_study(cfg, worker=task_index, storage=storage)
    state_file = study_dir(cfg) / "tasks" / f"{task_index}.json"
    previous = read_json(state_file)
    if previous is not None and previous.get("state") is None:
        # The same array task ran before (Slurm requeue) and did not finish its trial: that process is gone.
        fail_and_retry(cfg, study, int(previous["trial"]), f"task {task_index} restarted while the trial was running")

    def on_start(trial: optuna.Trial) -> None:
        atomic_write_json(state_file, {"trial": trial.number, "job": _slurm_task_id(), "state": None})
        trial.set_user_attr("task", task_index)
        for key, value in owner_attrs().items():
            trial.set_user_attr(key, value)

    results: list[dict[str, Any]] = []
    for _ in range(max(1, cfg.tune.trials)):  # bound: never more trials than the study has
        fail_dead_trials(cfg, study)
        if results and not _waiting(study):
            break
        objective = Objective(cfg, on_start=on_start, train_fold=train_fold)
        try:
            study.optimize(objective, n_trials=1, catch=())
        except BaseException as err:
            if objective.trial_number is None:
                raise
            if _is_preempted(err) or isinstance(err, KeyboardInterrupt):
                # optimize() marked it FAIL; queue the retry now, before the job requeues itself.
                fail_and_retry(cfg, study, objective.trial_number, "preempted")
                raise
            log.error("trial %d failed: %s: %s", objective.trial_number, type(err).__name__, err)
        if objective.trial_number is None:
            break
        final = _trial_by_number(study, objective.trial_number)
        assert final is not None
        results.append({"task": task_index, "trial": final.number, "state": final.state.name, "value": final.value})
        atomic_write_json(state_file, {"trial": final.number, "state": final.state.name})
        if final.state == TrialState.COMPLETE:
            write_best_params(study, study_dir(cfg) / BEST_PARAMS)
    return results


# ----------------------------------------------------------------------------------------------
# Results


def best_params_yaml(study: optuna.Study) -> str:
    """The best trial's parameters as flat dotted keys (the format `load_config(params=...)` reads)."""
    best = study.best_trial
    header = (
        f"# best trial {best.number} of study {study.study_name!r}: "
        f"{study.user_attrs.get('metric', 'value')} = {best.value:.6g}\n"
        "# use: make submit-folds PARAMS=<this file>\n"
    )
    return header + yaml.safe_dump({k: _plain(v) for k, v in best.params.items()}, sort_keys=True)


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def write_best_params(study: optuna.Study, path: str | Path) -> Path:
    """Write best_params_yaml atomically (several tasks may write at once).

    Raises:
        ValueError: no trial is COMPLETE yet.
    """
    return atomic_write_text(path, best_params_yaml(study))


def study_status(study: optuna.Study) -> dict[str, Any]:
    """Counts by state, the best trial and one row per trial (number, state, value, params, retry of, error)."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    rows = []
    for t in trials:
        history = t.system_attrs.get("retry_history") or []
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "last_step": t.last_step,
                "retry_of": history[0] if history else None,
                "duration_s": duration,
                "params": dict(t.params),
                "error": t.user_attrs.get("error"),
            }
        )
    status: dict[str, Any] = {
        "study": study.study_name,
        "metric": study.user_attrs.get("metric"),
        "n_trials": len(trials),
        "states": {s.name: counts.get(s.name, 0) for s in TrialState},
        "pruned": counts.get("PRUNED", 0),
        "best": None,
        "trials": rows,
    }
    if counts.get("COMPLETE"):
        best = study.best_trial
        status["best"] = {"number": best.number, "value": best.value, "params": dict(best.params)}
    return status


def format_status(status: Mapping[str, Any]) -> str:
    """A plain-text table of study_status()."""
    lines = [f"study {status['study']}  metric {status['metric']}  trials {status['n_trials']}"]
    lines.append("  " + "  ".join(f"{k}={v}" for k, v in status["states"].items() if v))
    best = status["best"]
    if best:
        lines.append(f"best: trial {best['number']}  value {best['value']:.4f}")
        lines.extend(f"  {k} = {v}" for k, v in best["params"].items())
    else:
        lines.append("best: none yet (no COMPLETE trial)")
    lines.append(f"{'#':>4} {'state':<9} {'value':>8} {'step':>5} {'retry of':>8} {'time s':>7}  params / error")
    for r in status["trials"]:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        step = "" if r["last_step"] is None else str(r["last_step"])
        retry = "" if r["retry_of"] is None else str(r["retry_of"])
        dur = "" if r["duration_s"] is None else f"{r['duration_s']:.0f}"
        params = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in r["params"].items())
        extra = f"  ERROR {r['error']}" if r["error"] else ""
        lines.append(f"{r['number']:>4} {r['state']:<9} {value:>8} {step:>5} {retry:>8} {dur:>7}  {params}{extra}")
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------
# Submission


def prepare(cfg: ExperimentConfig, create: bool = True, queued: Collection[int] = ()) -> optuna.Study | None:
    """Every check that can fail before anything is submitted, then create the study and save the config.

    create=False (a dry run): the checks only; the existing study (None when there is none), nothing written.
    queued: folds whose teacher is not trained yet but queued or running (the trials will wait for it).

    Raises:
        TuneError: listing the teachers of `tune.folds` that are neither trained nor queued.
        ConfigError: for a bad search space, fold list or storage URL.
    """
    check_folds(cfg)
    check_space(cfg)
    paths = ExperimentPaths.of(cfg)
    missing = [p for f, p in missing_teachers(cfg).items() if f not in queued]
    if missing:
        listing = "\n  ".join(str(p) for p in missing)
        raise TuneError(
            f"the search reuses the trained teachers of tune.folds={list(cfg.tune.folds)}, neither trained nor "
            f"queued:\n  {listing}\nsubmit them first (make submit-folds; make submit-all queues both) or change "
            f"tune.folds (experiment {paths.root})"
        )
    if not create:
        exists = bool(cfg.tune.storage.strip()) or ExperimentPaths.of(cfg).tune_journal.is_file()
        try:
            return open_study(cfg) if exists else None
        except TuneError:
            return None
    study_dir(cfg).mkdir(parents=True, exist_ok=True)
    study = open_study(cfg, create=True)
    save_config(cfg, study_dir(cfg) / RUN_CONFIG)
    return study


def load_tune_config(exp_dir: str | Path, study: str = "") -> ExperimentConfig:
    """The config saved by `submit tune` for the experiment's study, or for study `study`."""
    from bonehpc.config import load_config

    base = Path(exp_dir) / "tune"
    path = base / "config.yaml"
    if study and not (path.is_file() and study_name(load_config(path)) == study):
        path = base / "studies" / _safe_name(study) / "config.yaml"
    if not path.is_file():
        others = sorted(p.parent.name for p in base.glob("studies/*/config.yaml"))
        hint = f" (studies here: {', '.join(others)})" if others else ""
        raise TuneError(f"{path} not found: no study was submitted for {exp_dir}{hint}; run `bonehpc submit tune`")
    # the folder given is the only truth: a moved experiment's study is read and written there, not where
    # its saved run_root points (the journal and best_params.yaml would be created at the old place)
    subs = read_registry(base)["submissions"]
    return config_in_place(load_config(path), exp_dir, (subs[-1].get("workdir") if subs else "") or os.getcwd())
