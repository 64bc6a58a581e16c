"""Aggregated experiment report: one self-contained HTML file, the same content as Markdown, every table as CSV.

`build_report(exp_dir)` reads only the files of an experiment (docs/architecture.md, "Files of one
training run" and "Experiment layout"), recomputes every metric from the saved predictions with
`bonehpc.metrics.evaluate_predictions` (so the tables always match the predictions), and writes
`<exp_dir>/report/{index.html, report.md, *.csv, *.png}`. A partial experiment (failed or running folds,
no holdout, no tuning, no Slurm) still gets a report that says what is missing and why.

One module per section (cv, holdout, operating_point, body_parts, curves, learning, kd, distill_cost, seed, data,
tuning, cluster, repro, overview), over the document model (doc), the experiment as read from disk
(experiment: through bonehpc.paths only), the figures (plots) and the two renderers (render).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from bonehpc.fsio import atomic_write_bytes, atomic_write_text
from bonehpc.paths import REPORT_INDEX, REPORT_MARKDOWN
from bonehpc.report.body_parts import section_body_parts
from bonehpc.report.cluster import failure_lines, section_slurm
from bonehpc.report.curves import section_curves
from bonehpc.report.cv import section_cv
from bonehpc.report.data import section_data
from bonehpc.report.distill_cost import section_distill_cost
from bonehpc.report.doc import Figure, Section, Table
from bonehpc.report.experiment import Experiment, load_experiment, study_level
from bonehpc.report.holdout import section_holdout
from bonehpc.report.kd import measure_inference, section_kd_gain, section_teacher_student
from bonehpc.report.learning import section_learning
from bonehpc.report.operating_point import section_operating_point
from bonehpc.report.overview import section_overview
from bonehpc.report.render import render_html, render_markdown
from bonehpc.report.repro import section_repro
from bonehpc.report.seed import section_seed
from bonehpc.report.tuning import section_tuning

__all__ = ["SECTIONS", "build_report", "failure_lines", "load_experiment", "measure_inference", "study_level"]

log = logging.getLogger(__name__)


SECTIONS: tuple[Callable[[Experiment], Section], ...] = (
    section_overview,
    section_data,
    section_cv,
    section_holdout,
    section_operating_point,
    section_body_parts,
    section_curves,
    section_learning,
    section_teacher_student,
    section_kd_gain,
    section_distill_cost,
    section_seed,
    section_tuning,
    section_slurm,
    section_repro,
)


def _write_atomic(path: Path, data: bytes | str) -> None:
    if isinstance(data, str):
        atomic_write_text(path, data)
    else:
        atomic_write_bytes(path, data)


def build_report(exp_dir: str | Path) -> Path:
    """Write runs/<exp>/report/{index.html, report.md, <table>.csv, <figure>.png}; returns the index.html path.

    Args:
        exp_dir: the experiment folder (runs/<exp>).

    Raises:
        FileNotFoundError: the experiment folder does not exist. Anything missing inside it is reported
            in the document instead.
    """
    exp = load_experiment(exp_dir)
    sections = []
    for make in SECTIONS:
        try:
            sections.append(make(exp))
        except Exception as err:  # noqa: BLE001 - one broken section must not cost the whole report
            log.exception("report section %s failed", make.__name__)
            sec = Section(make.__name__.removeprefix("section_"), make.__name__)
            sec.p(f"section failed: {type(err).__name__}: {err}", "missing")
            sections.append(sec)
    out = exp.paths.report
    out.mkdir(parents=True, exist_ok=True)
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Table):
                _write_atomic(out / f"{b.name}.csv", b.df.to_csv(index=False, lineterminator="\n"))
            elif isinstance(b, Figure):
                _write_atomic(out / f"{b.name}.png", b.png)
    title = f"bonehpc report: {exp.name}"
    _write_atomic(out / REPORT_MARKDOWN, render_markdown(title, sections))
    index = out / REPORT_INDEX
    _write_atomic(index, render_html(title, sections))
    log.info("report written: %s", index)
    return index
