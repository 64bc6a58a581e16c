"""sacct -P text parsing (recorded on the dev cluster, Slurm 22.05.8) and the experiment status table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bonehpc.accounting import (
    expand_array_ids,
    experiment_status,
    group_rows,
    parse_elapsed,
    parse_sacct,
    parse_tres_gpus,
    totals,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("00:00:03", 3),
        ("01:02:03", 3723),
        ("2-03:04:05", 2 * 86400 + 11045),
        ("12:34", 754),
        ("1-02", 93600),
        ("INVALID", 0),
        ("", 0),
    ],
)
def test_parse_elapsed(text: str, seconds: int) -> None:
    assert parse_elapsed(text) == seconds


def test_tres_gpus_total_typed_and_none() -> None:
    assert parse_tres_gpus("billing=1,cpu=1,gres/gpu=2,mem=500M,node=1") == 2
    assert parse_tres_gpus("cpu=8,gres/gpu:a100=4,mem=60G") == 4
    assert parse_tres_gpus("cpu=8,gres/gpu=4,gres/gpu:a100=4") == 4
    assert parse_tres_gpus("") == 0


def test_expand_pending_array_ranges() -> None:
    assert expand_array_ids("1_[0-3%1]") == ["1_0", "1_1", "1_2", "1_3"]
    assert expand_array_ids("7_[1,4-5]") == ["7_1", "7_4", "7_5"]
    assert expand_array_ids("7_[0-6:3]") == ["7_0", "7_3", "7_6"]
    assert expand_array_ids("123_4") == ["123_4"]
    assert expand_array_ids("123") == ["123"]


def test_running_snapshot_with_pending_array() -> None:
    recs = group_rows(parse_sacct((GOLDEN / "sacct_running.txt").read_text()))
    assert recs["2"].state == "FAILED" and recs["2"].last.exit_code == 3
    assert recs["4"].state == "RUNNING" and recs["4"].last.end == ""
    assert [recs[f"1_{i}"].state for i in range(4)] == ["PENDING"] * 4
    assert recs["1_0"].last.node == ""


def test_final_snapshot_requeue_cancel_gpus() -> None:
    recs = group_rows(parse_sacct((GOLDEN / "sacct_done.txt").read_text()))
    assert recs["4"].state == "CANCELLED" and recs["4"].last.cancelled_by == "0"
    rq = recs["5"]
    assert [r.state for r in rq.runs] == ["REQUEUED", "COMPLETED"]
    assert rq.requeues == 1 and rq.state == "COMPLETED" and rq.last.elapsed_s == 8
    assert recs["3"].last.gpus == 2 and recs["3"].gpu_hours == pytest.approx(2 / 3600)
    assert [recs[f"1_{i}"].state for i in range(4)] == ["COMPLETED"] * 4
    assert recs["1_3"].last.start == "2026-11-27T07:36:12"


def test_malformed_lines_are_skipped() -> None:
    rows = parse_sacct("garbage\n5|x|FAILED|1:0|00:00:01|vm||Unknown|Unknown\n\n1|2|3\n")
    assert [r.job_id for r in rows] == ["5"]
    assert rows[0].start == "" and rows[0].exit_code == 1


def _registry(tmp: Path) -> Path:
    exp = tmp / "exp"
    (exp / "fold0" / "teacher").mkdir(parents=True)
    (exp / "fold0" / "teacher" / "metrics.json").write_text(json.dumps({"status": "completed"}))
    reg = {
        "version": 1,
        "submissions": [
            {
                "mode": "slurm",
                "time": "2000-01-01T00:00:00+00:00",
                "jobs": [
                    {
                        "kind": "train",
                        "role": "teacher",
                        "job_id": "1",
                        "tasks": [
                            {"index": 0, "fold": "fold0", "task_id": "1_0"},
                            {"index": 1, "fold": "final", "task_id": "1_1"},
                        ],
                    },
                    {
                        "kind": "train",
                        "role": "student",
                        "job_id": "5",
                        "tasks": [{"index": 0, "fold": "fold0", "task_id": "5"}],
                    },
                    {"kind": "evaluate", "role": "", "job_id": "99", "tasks": [{"task_id": "99"}]},
                ],
            }
        ],
    }
    (exp / "jobs.json").write_text(json.dumps(reg))
    return exp


def test_experiment_status_table_and_totals(tmp_path: Path) -> None:
    exp = _registry(tmp_path)
    recs = group_rows(parse_sacct((GOLDEN / "sacct_done.txt").read_text()))
    df = experiment_status(exp, records=recs)
    assert list(zip(df["fold"], df["role"], strict=True)) == [
        ("fold0", "teacher"),
        ("fold0", "student"),
        ("final", "teacher"),
        ("holdout", "evaluate"),
    ]
    row = df.set_index(["fold", "role"])
    assert row.loc[("fold0", "teacher"), "state"] == "COMPLETED"
    assert row.loc[("fold0", "teacher"), "metrics"] == "completed"
    assert row.loc[("fold0", "student"), "requeues"] == 1
    # job 99 is neither in sacct nor (long after its submission) in squeue: UNKNOWN, not an error
    assert row.loc[("holdout", "evaluate"), "state"] == "UNKNOWN"
    tot = totals(df)
    assert tot["tasks"] == 4 and tot["requeues"] == 1 and tot["states"]["COMPLETED"] == 3


def test_status_of_experiment_without_registry(tmp_path: Path) -> None:
    assert experiment_status(tmp_path).empty
