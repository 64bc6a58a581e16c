"""Figures of the aggregated report (matplotlib, object API with the Agg canvas: no display, no pyplot state).

Every function takes plain DataFrames (study-level rows: study, label, prob) and returns a Figure; the
report turns it into PNG bytes with `png_bytes`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import ConfusionMatrixDisplay, auc, confusion_matrix, precision_recall_curve, roc_curve

from bonehpc.metrics import expected_calibration_error

GRID = np.linspace(0.0, 1.0, 101)


def new_figure(width: float = 10.0, height: float = 4.0) -> Figure:
    """A Figure bound to the Agg canvas (works without a display and without pyplot)."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _both_classes(df: pd.DataFrame) -> bool:
    return df["label"].nunique() == 2


def roc_pr_figure(curves: Mapping[str, pd.DataFrame], title: str, mean_label: str | None = "mean of folds") -> Figure:
    """ROC and precision-recall curves of several study-level prediction sets, plus their mean.

    Args:
        curves: name -> DataFrame with label (0/1) and prob, one row per study.
        title: figure title.
        mean_label: legend of the mean curve (vertical mean of the interpolated curves); None: no mean.
    """
    fig = new_figure(11, 4.4)
    ax_roc, ax_pr = fig.subplots(1, 2)
    tprs, precs = [], []
    for name, df in curves.items():
        if not _both_classes(df):
            continue
        y, p = df["label"].to_numpy(), df["prob"].to_numpy()
        fpr, tpr, _ = roc_curve(y, p)
        ax_roc.plot(fpr, tpr, lw=1, alpha=0.8, label=f"{name} (AUROC {auc(fpr, tpr):.3f})")
        tprs.append(np.interp(GRID, fpr, tpr))
        prec, rec, _ = precision_recall_curve(y, p)
        # recall decreases along the curve; np.interp needs increasing x
        ax_pr.plot(rec, prec, lw=1, alpha=0.8, label=f"{name} (AP-like area {auc(rec, prec):.3f})")
        precs.append(np.interp(GRID, rec[::-1], prec[::-1]))
    if mean_label and len(tprs) > 1:
        mt, st = np.mean(tprs, axis=0), np.std(tprs, axis=0)
        mt[0] = 0.0
        ax_roc.plot(GRID, mt, color="black", lw=2, label=f"{mean_label} (AUROC {auc(GRID, mt):.3f})")
        ax_roc.fill_between(GRID, np.clip(mt - st, 0, 1), np.clip(mt + st, 0, 1), color="grey", alpha=0.2)
        mp, sp = np.mean(precs, axis=0), np.std(precs, axis=0)
        ax_pr.plot(GRID, mp, color="black", lw=2, label=mean_label)
        ax_pr.fill_between(GRID, np.clip(mp - sp, 0, 1), np.clip(mp + sp, 0, 1), color="grey", alpha=0.2)
    ax_roc.plot([0, 1], [0, 1], ls=":", color="grey")
    ax_roc.set(xlabel="false positive rate (studies)", ylabel="true positive rate (studies)", title="ROC")
    ax_pr.set(xlabel="recall (studies)", ylabel="precision (studies)", title="precision-recall")
    for ax in (ax_roc, ax_pr):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
    fig.suptitle(title)
    return fig


def confusion_figure(sets: Mapping[str, pd.DataFrame], threshold: float = 0.5) -> Figure:
    """One study-level confusion matrix per prediction set (positive when prob > threshold)."""
    n = max(len(sets), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = new_figure(3.6 * cols, 3.3 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (name, df) in zip(axes, sets.items(), strict=False):
        pred = (df["prob"].to_numpy() > threshold).astype(int)
        cm = confusion_matrix(df["label"].to_numpy(), pred, labels=[0, 1])
        ConfusionMatrixDisplay(cm, display_labels=["normal", "abnormal"]).plot(ax=ax, colorbar=False, cmap="Blues")
        ax.set_title(name, fontsize=9)
    for ax in axes[len(sets) :]:
        ax.set_axis_off()
    return fig


def calibration_figure(sets: Mapping[str, pd.DataFrame], n_bins: int = 10) -> Figure:
    """Reliability diagram (fraction abnormal vs mean predicted probability per bin, with each set's expected
    calibration error in the legend: the same equal-width bins) and the histogram."""
    fig = new_figure(10, 4.2)
    ax, ax_h = fig.subplots(1, 2)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfectly calibrated")
    for name, df in sets.items():
        if not _both_classes(df):
            continue
        frac, mean_p = calibration_curve(df["label"], df["prob"], n_bins=n_bins, strategy="uniform")
        ece = expected_calibration_error(df["label"].to_numpy(), df["prob"].to_numpy(), n_bins)
        ax.plot(mean_p, frac, marker="o", ms=3, lw=1, label=f"{name} (ECE {ece:.3f})")
        ax_h.hist(df["prob"], bins=n_bins, range=(0, 1), histtype="step", label=name)
    ax.set(xlabel="mean predicted probability (studies)", ylabel="fraction abnormal", title="reliability")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax_h.set(xlabel="predicted probability (studies)", ylabel="studies", title="probability histogram")
    ax_h.legend(fontsize=7)
    return fig


def learning_curve_figure(histories: Mapping[str, pd.DataFrame], metric: str, title: str) -> Figure:
    """Per-epoch train/val loss and the early-stop metric of several runs (metrics.jsonl rows)."""
    fig = new_figure(11, 4.0)
    ax_loss, ax_m = fig.subplots(1, 2)
    for i, (name, h) in enumerate(histories.items()):
        color = f"C{i % 10}"
        if "train/loss" in h:
            ax_loss.plot(h["epoch"], h["train/loss"], color=color, marker=".", label=f"{name} train")
        if "val/loss" in h:
            ax_loss.plot(h["epoch"], h["val/loss"], color=color, ls="--", marker=".", label=f"{name} val")
        if metric in h:
            ax_m.plot(h["epoch"], h[metric], color=color, marker=".", label=name)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (solid: train, dashed: validation)")
    ax_m.set(xlabel="epoch", ylabel=metric, title=f"early-stop metric {metric}")
    for ax in (ax_loss, ax_m):
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig
