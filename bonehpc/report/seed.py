"""Report section: comparison with the seed project's published numbers (quoted, never recomputed)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from bonehpc.paths import CORE_ROLES
from bonehpc.report.cv import cv_tables
from bonehpc.report.doc import LEVELS, METRICS, Section, _pm
from bonehpc.report.experiment import Experiment

# The seed project's published numbers (image level only, no kappa): quoted, never recomputed.
SEED_CV = {"accuracy": 0.822, "precision": 0.838, "recall": 0.716, "f1": 0.772}


SEED_HOLDOUT_ACCURACY = 0.8274


def synthetic_marker(exp: Experiment) -> dict[str, Any] | None:
    """The `bonehpc synth` marker of the experiment's data (None: real data, or no config to tell)."""
    if exp.cfg is None:
        return None
    from bonehpc.data.synthetic import read_marker

    return read_marker(exp.cfg.data.mura_root)


def section_seed(exp: Experiment) -> Section:
    sec = Section("Comparison with the seed project", "seed")
    sec.p(
        "The seed project reported cross-validation accuracy 0.822, precision 0.838, recall 0.716, F1 0.772 and a "
        "holdout accuracy of 0.8274, all at image level and without Cohen's kappa. Those are the seed's numbers, "
        "quoted here, not recomputed; its folds, splits and data may differ from ours."
    )
    marker = synthetic_marker(exp)
    if marker is not None:
        root = exp.cfg.data.mura_root if exp.cfg else "?"
        sec.p(
            f"Not comparable: this experiment ran on synthetic data ({root} carries the `bonehpc synth` marker: "
            f"generator {marker.get('generator', '?')}, {marker.get('patients', '?')} patients, seed "
            f"{marker.get('seed', '?')}), not on MURA, so its numbers are not placed beside the seed's. They test "
            "the pipeline, not the model.",
            "note",
        )
        seed = pd.DataFrame(
            [{"metric": k, "seed project (quoted, image level, CV)": v} for k, v in SEED_CV.items()]
            + [{"metric": "holdout accuracy", "seed project (quoted, image level, CV)": SEED_HOLDOUT_ACCURACY}]
        )
        sec.table(seed, "seed_quoted", "The seed project's published numbers (quoted).")
        return sec
    sec.p("Our numbers are at both levels, side by side.")
    _, summary = cv_tables(exp)
    rows = []
    for metric in METRICS:
        row: dict[str, Any] = {"metric": metric, "seed project (quoted, image level, CV)": SEED_CV.get(metric)}
        for role in CORE_ROLES:
            for level in LEVELS:
                s = summary[(summary.role == role) & (summary.level == level) & (summary.metric == metric)]
                row[f"ours {role} CV {level}"] = _pm(float(s["mean"].iloc[0]), float(s["std"].iloc[0]))
        rows.append(row)
    sec.table(pd.DataFrame(rows), "seed_comparison_cv", "Cross-validation: the seed project's numbers vs ours.")
    hrow: dict[str, Any] = {"metric": "holdout accuracy", "seed project (quoted, image level)": SEED_HOLDOUT_ACCURACY}
    for model, (_, m, _, _) in exp.holdout.items():
        for level in LEVELS:
            hrow[f"ours {model} {level}"] = m.get(f"{level}_accuracy", math.nan)
    sec.table(pd.DataFrame([hrow]), "seed_comparison_holdout", "Holdout accuracy: the seed's vs ours.")
    return sec
