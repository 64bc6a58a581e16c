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


# Fault drills as sacct and the task logs show them (issue 19 item 6): a task killed by a signal (the
# batch shell died of USR2), a launch failure (srun exit 65), submitit giving up after too many time
# limits, a node failure followed by a requeue.
FAULTS = """\
7_0|x|FAILED|0:12|00:00:40|vm|cpu=2,gres/gpu=1|2026-12-06T10:00:00|2026-12-06T10:00:40|0:0
7_1|x|FAILED|65:0|00:00:01|vm|cpu=2|2026-12-06T10:00:00|2026-12-06T10:00:01|0:0
8|x|FAILED|1:0|00:01:00|vm|cpu=2|2026-12-06T10:00:00|2026-12-06T10:01:00|0:0
9|x|NODE_FAIL|0:0|00:10:00|n1|cpu=2,gres/gpu=2|2026-12-06T10:00:00|2026-12-06T10:10:00|0:0
9|x|COMPLETED|0:0|00:20:00|n2|cpu=2,gres/gpu=2|2026-12-06T10:11:00|2026-12-06T10:31:00|0:0
10|x|COMPLETED|0:0|00:00:05|vm|cpu=2|2026-12-06T10:00:00|2026-12-06T10:00:05|0:9
"""


def test_fault_drills_are_explained(tmp_path: Path) -> None:
    from bonehpc.accounting import exit_label, failure_line

    recs = group_rows(parse_sacct(FAULTS))
    assert exit_label(0, 12) == "0:12 (USR2)" and exit_label(65, 0) == "65:0" and exit_label(None, None) == ""
    sub = tmp_path / "submitit"
    # signal kill without a line in the log: the signal, named
    assert failure_line(sub, "7_0", recs["7_0"]) == "killed by signal 12 (USR2)"
    (sub / "7_1").mkdir(parents=True)
    (sub / "7_1" / "7_1_0_log.err").write_text(
        "srun: error: Task launch for StepId=7.0 failed on node vm: Unable to layout tasks on given cpus\n"
        "srun: error: Application launch failed: Unable to layout tasks on given cpus\n"
    )
    assert (
        failure_line(sub, "7_1", recs["7_1"])
        == "srun: error: Application launch failed: Unable to layout tasks on given cpus"
    )
    (sub / "8").mkdir()
    (sub / "8" / "8_0_log.err").write_text(
        "submitit WARNING - Caught signal SIGUSR2 on vm: this job is timed-out.\n"
        "submitit.core.utils.UncompletedJobError: Job not requeued because: timed-out too many times.\n"
    )
    assert failure_line(sub, "8", recs["8"]).endswith("Job not requeued because: timed-out too many times.")
    node = recs["9"]
    assert node.requeues == 1 and node.elapsed_s == 1800 and node.gpu_hours == pytest.approx(1.0)
    assert recs["10"].last.derived_signal == 9  # a step killed by SIGKILL although the batch shell exited 0


def test_status_json_is_strict_and_sums_every_run(tmp_path: Path) -> None:
    import subprocess
    import sys

    exp = _registry(tmp_path)
    recs = group_rows(parse_sacct((GOLDEN / "sacct_done.txt").read_text()))
    df = experiment_status(exp, records=recs)
    row = df.set_index(["fold", "role"])
    assert row.loc[("fold0", "student"), "elapsed_s"] == 3 + 8  # both runs of the requeued task
    # the evaluation is in neither sacct nor squeue: its numbers are missing -> null in JSON, never NaN
    out = subprocess.run(
        [sys.executable, "-m", "bonehpc", "status", "--exp", str(exp), "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    ).stdout

    def no_nan(text: str) -> None:
        raise AssertionError(f"not strict JSON: {text}")

    doc = json.loads(out, parse_constant=no_nan)
    ev = next(t for t in doc["tasks"] if t["role"] == "evaluate")
    assert ev["elapsed_s"] is None and ev["state"] == "UNKNOWN"


def test_completed_only_when_metrics_and_job_agree(tmp_path: Path) -> None:
    exp = _registry(tmp_path)
    failed = FAULTS.splitlines()[2].replace("8|", "1_0|", 1)  # fold0/teacher's task ended FAILED 1:0
    recs = group_rows(parse_sacct(failed + "\n"))
    row = experiment_status(exp, records=recs, live={}).set_index(["fold", "role"]).loc[("fold0", "teacher")]
    assert row["state"] == "FAILED" and row["metrics"] == "completed, task FAILED"
