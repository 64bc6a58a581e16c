"""Report section: the Optuna study (trials, best parameters, plots)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from bonehpc.report.doc import Section
from bonehpc.report.experiment import Experiment


def _load_study(exp: Experiment) -> tuple[Any, str]:
    """(optuna Study or None, reason when None)."""
    storage_url = exp.cfg.tune.storage if exp.cfg else str(exp.raw_cfg.get("tune", {}).get("storage", ""))
    study_name = (exp.cfg.tune.study_name if exp.cfg else "") or exp.name
    journal = exp.paths.tune_journal
    if not storage_url and not journal.is_file():
        return None, f"no tuning study ({journal} not found and tune.storage is empty)"
    import optuna  # only here: a report of an untuned experiment does not need it

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if storage_url:
            storage: Any = storage_url
        else:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            storage = JournalStorage(JournalFileBackend(str(journal), lock_obj=JournalFileOpenLock(str(journal))))
        return optuna.load_study(study_name=study_name, storage=storage), ""
    except Exception as err:  # noqa: BLE001 - an unreachable DB or unknown study is reported
        return None, f"cannot load study {study_name!r}: {type(err).__name__}: {err}"


def section_tuning(exp: Experiment) -> Section:
    sec = Section("Hyperparameter tuning (Optuna)", "tuning")
    study, problem = _load_study(exp)
    if study is None:
        sec.p(problem, "missing")
        return sec
    import matplotlib

    matplotlib.use("Agg")  # optuna's matplotlib plots go through pyplot; never open a window
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    trials = study.trials_dataframe()
    sec.p(f"Study {study.study_name!r}, direction {study.direction.name.lower()}, {len(study.trials)} trials.")
    counts = pd.Series([t.state.name for t in study.trials]).value_counts().rename_axis("state").reset_index()
    sec.table(counts, "tune_trial_states", "Trials by state.")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        bp = pd.DataFrame([{"param": k, "value": v} for k, v in best.params.items()])
        sec.p(f"Best trial #{best.number}: objective {best.value:.4f}.")
        sec.table(bp, "tune_best_params", "Best parameters.")
    else:
        sec.p("no completed trial yet: no best parameters", "missing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend
        plotters: list[tuple[str, Callable[[Any], Any], str]] = [
            ("tune_history", ovm.plot_optimization_history, "Optimisation history."),
            ("tune_importances", ovm.plot_param_importances, "Parameter importances (fANOVA)."),
        ]
        for name, fn, caption in plotters:
            try:
                ax = fn(study)
                fig = ax.figure if hasattr(ax, "figure") else np.ravel(ax)[0].figure
                fig.set_size_inches(8, 4.5)
                sec.figure(fig, name, caption)
                plt.close(fig)
            except Exception as err:  # noqa: BLE001 - e.g. importances need >= 2 completed trials
                sec.p(f"{caption} not available: {err}", "note")
    if len(trials):
        sec.table(trials, "tune_trials", "All trials.")
    return sec
