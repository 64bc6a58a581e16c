"""Report section: what was packed, rejected and lost."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bonehpc.report.doc import Section
from bonehpc.report.experiment import Experiment
from bonehpc.report.seed import synthetic_marker


def _csv_rows(path: Path) -> int | None:
    """Data rows of a CSV with a header (None when the file is missing or unreadable)."""
    try:
        return len(pd.read_csv(path))
    except pd.errors.EmptyDataError:
        return 0
    except (OSError, ValueError):
        return None


def section_data(exp: Experiment) -> Section:
    sec = Section("Data: packed, rejected and lost", "data")
    if exp.cfg is None:
        sec.p("no config: the shard folder is unknown", "missing")
        return sec
    from bonehpc.data.shards import INDEX_CSV, LOST_STUDIES_CSV, REJECTED_CSV

    shards = Path(exp.cfg.data.shards)
    rows = []
    for what, name in (
        ("images packed", INDEX_CSV),
        ("images rejected (unreadable, corrupt, too small, ...)", REJECTED_CSV),
        ("studies lost (every image rejected)", LOST_STUDIES_CSV),
    ):
        n = _csv_rows(shards / name)
        rows.append({"what": what, "count": "not found" if n is None else n, "file": str(shards / name)})
    sec.table(pd.DataFrame(rows), "data_counts", f"Counts from the shard folder {shards}.")
    rej = shards / REJECTED_CSV
    if rej.is_file():
        try:
            reasons = pd.read_csv(rej)
        except (OSError, ValueError, pd.errors.EmptyDataError):
            reasons = pd.DataFrame()
        if len(reasons) and "reason" in reasons:
            by = reasons["reason"].value_counts().rename_axis("reason").reset_index()
            sec.table(by, "data_rejected_reasons", "Rejected images by reason.")
    if synthetic_marker(exp) is not None:
        sec.p("The data are synthetic (`bonehpc synth` marker in the MURA root).", "note")
    return sec
