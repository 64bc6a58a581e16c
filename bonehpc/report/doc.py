"""The report's document model (text, tables, figures, sections) and the number formats every section uses."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bonehpc import metrics as M
from bonehpc.report import plots

METRICS = ("accuracy", "precision", "recall", "f1", "auroc", "kappa")


LEVELS = ("image", "study")


UNIT_NOTE = (
    "Units: image-level metrics count every image (view) once; study-level metrics count every study once. "
    "The study probability is the mean of the abnormal probabilities of its views and a study is called abnormal "
    "when that mean is > 0.5 (MURA protocol); images use the same 0.5 threshold on their own probability. "
    "AUROC is threshold-free. Cohen's kappa is the official MURA metric (study level)."
)


@dataclass
class Text:
    text: str
    kind: str = "p"  # p | note | missing | flag | pre


@dataclass
class Table:
    df: pd.DataFrame
    name: str  # CSV file stem
    caption: str = ""
    show: bool = True  # False: CSV only (machine-readable duplicates of a displayed table)


@dataclass
class Figure:
    png: bytes
    name: str  # PNG file stem
    caption: str = ""


Block = Text | Table | Figure


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)

    def p(self, text: str, kind: str = "p") -> None:
        self.blocks.append(Text(text, kind))

    def table(self, df: pd.DataFrame, name: str, caption: str = "", show: bool = True) -> None:
        self.blocks.append(Table(df, name, caption, show))

    def figure(self, fig: Any, name: str, caption: str = "") -> None:
        self.blocks.append(Figure(plots.png_bytes(fig), name, caption))


def _int_or_none(x: Any) -> int | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else int(x)


def _metric_row(m: Mapping[str, float], level: str) -> dict[str, Any]:
    row: dict[str, Any] = {k: _int_or_none(m.get(f"{level}_{k}")) for k in ("n", "n_pos")}
    row.update({k: m.get(f"{level}_{k}") for k in METRICS})
    return row


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, (float, np.floating)):
        v = float(x)
        # 3 decimals for metrics; small values (learning rates) keep 3 significant digits
        return f"{v:.3g}" if 0 < abs(v) < 1e-2 else f"{v:.3f}"
    return str(x)


def _pm(mean: float, std: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


CI_NOTE = (
    f"95 % confidence intervals [in brackets]: percentile intervals of {M.N_BOOT:,} bootstrap resamples of "
    f"patients (every study of a drawn patient comes along; seed {M.BOOT_SEED}), study level. Differences are "
    "paired: both models are scored on the same resamples of the same studies; an interval that excludes 0 is "
    "unlikely to be resampling noise."
)


def _ci(est: float, lo: float, hi: float) -> str:
    if est is None or math.isnan(est):
        return "—"
    if math.isnan(lo):
        return f"{est:.3f} [undefined]"
    return f"{est:.3f} [{lo:.3f}, {hi:.3f}]"


def ci_wide(long: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """Long CI rows (metrics.ci_table / paired_diff_table) -> one row per `index`, "metric [95 % CI]" cells."""
    d = long.assign(cell=[_ci(e, lo, hi) for e, lo, hi in zip(long.estimate, long.ci_low, long.ci_high, strict=True)])
    wide = d.pivot_table(index=[*index, "n_studies", "n_patients"], columns="metric", values="cell", aggfunc="first")
    wide = wide.reindex(columns=list(M.CI_METRICS))
    wide.columns = [f"{m} [95 % CI]" for m in wide.columns]
    order = list(dict.fromkeys(map(tuple, long[index].to_numpy().tolist())))
    wide = wide.reset_index()
    key = wide[index].apply(tuple, axis=1).map({k: i for i, k in enumerate(order)})
    return (
        wide.assign(_k=key)
        .sort_values("_k")
        .drop(columns="_k")
        .rename(columns={"n_studies": "studies", "n_patients": "patients"})
    )


def paired_rows(pairs: list[tuple[str, str, str, Mapping[str, pd.DataFrame]]]) -> pd.DataFrame:
    """Paired bootstrap differences for (where, a, b, tables) when both a and b exist in tables."""
    frames = []
    for where, a, b, tables in pairs:
        if a in tables and b in tables:
            d = M.paired_diff_table(a, tables[a], b, tables[b])
            frames.append(d.assign(comparison=f"{where}: " + d["comparison"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
