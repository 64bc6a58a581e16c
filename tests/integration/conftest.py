"""Fixtures for integration tests on the real dev Slurm cluster (slurm/dev/with-cluster.sh brings it up)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """SLURM_CONF of a cluster that answers `sinfo`; skips the test when there is none."""
    if not shutil.which("sinfo"):
        pytest.skip("no Slurm client installed (run the tests through slurm/dev/with-cluster.sh)")
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo did not answer in 20 s")
    if res.returncode != 0:
        pytest.skip(f"no Slurm cluster answers sinfo ({res.stderr.strip()[:200]}); use slurm/dev/with-cluster.sh")
    return os.environ.get("SLURM_CONF", "")
