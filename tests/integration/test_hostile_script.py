"""Odd but valid values reach the real sbatch as written (issue 20): an experiment folder with a space, a
quote and a `;`, an `additional` comment holding quotes, `;`, `%` and `#`, a setup line with a quoted `;`.
Slurm parses the quoted #SBATCH lines (its own quote rules, not bash's), the job runs in that folder and
returns its result; one short job, seconds of cluster time.
"""

from __future__ import annotations

import functools
import operator
import subprocess
from pathlib import Path

import pytest
import submitit
import yaml

from bonehpc import slurm
from bonehpc.config import load_config
from bonehpc.paths import ExperimentPaths

pytestmark = [pytest.mark.slurm]

COMMENT = "a b;c'd\"e %j #x"


def test_quoted_values_reach_sbatch_and_the_job_runs(slurm_cluster, tmp_path: Path) -> None:
    root = tmp_path / "we ird;'q\"" / "runs"
    dev = yaml.safe_load(slurm.profile_path("dev").read_text())
    dev.update(additional={"comment": COMMENT}, setup=[*dev.get("setup", []), "echo 'set; up'"])
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(dev))
    cfg = load_config(None, ["name=inj-1", f"run_root={root}", "cluster.mode=slurm"])
    profile = slurm.load_profile(str(tmp_path / "site.yaml"))
    ctx = slurm.SubmitContext(cfg, ExperimentPaths.of(cfg), profile, "slurm", str(tmp_path))
    record = slurm.submit(ctx, "evaluate", functools.partial(operator.add, 40, 2))
    job_id = record["job_id"]

    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    fields = {k: v for k, _, v in (line.strip().partition("=") for line in shown.splitlines()) if v}
    assert fields["Comment"] == COMMENT  # Slurm read the quoted value exactly
    assert fields["StdOut"] == f"{root}/inj-1/submitit/{job_id}/{job_id}_0_log.out"
    assert "Requeue=1" in shown and "JobName=inj-1-evaluate" in shown

    job: submitit.Job[int] = submitit.SlurmJob(folder=ExperimentPaths.of(cfg).submitit / "%j", job_id=job_id)
    assert job.result() == 42
    log = Path(fields["StdOut"]).read_text()
    assert "set; up" in log or "set; up" in Path(str(fields["StdOut"]).replace("_0_log.out", "_0_log.err")).read_text()
