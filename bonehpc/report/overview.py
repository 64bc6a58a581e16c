"""Report section: the experiment's expected runs and their states."""

from __future__ import annotations

import datetime as _dt

import pandas as pd

from bonehpc.report.doc import Section
from bonehpc.report.experiment import Experiment


def section_overview(exp: Experiment) -> Section:
    sec = Section(f"Experiment {exp.name}", "overview")
    sec.p(f"Folder {exp.root.resolve()}; report built {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}.")
    rows = []
    for (fold, role), r in exp.runs.items():
        rows.append({"run": fold, "role": role, "state": r.state, "detail": r.reason, "path": str(r.path)})
    for model, (_, _, _, problem) in exp.holdout.items():
        rows.append(
            {"run": "holdout", "role": model, "state": "missing" if problem else "completed", "detail": problem}
        )
    df = pd.DataFrame(rows)
    missing = df[df.state != "completed"]
    if len(missing):
        sec.p(
            f"Partial experiment: {len(missing)} of {len(df)} expected results are missing or incomplete "
            "(listed below; the tables use what exists).",
            "missing",
        )
    sec.table(df, "runs", "Every expected run and holdout evaluation, with its state.")
    return sec
