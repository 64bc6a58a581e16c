"""Multi-node torchrun through `torchrun_command`: two agents with --nnodes=2 on localhost (two "nodes" as two
processes, c10d rendezvous on the port derived from the job id), a gloo all-reduce across both.

No Slurm needed: the Slurm variables a two-node task would see are set by hand (node 0 and node 1 of job J).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bonehpc.resources import ephemeral_port_range, rendezvous_port
from jobs.train import torchrun_command

# The "training module" torchrun starts: the same command-line shape as bonehpc.train
# (--config C --fold k --role r); it all-reduces its rank and writes what it saw.
ALLREDUCE = """
import argparse, json, os, torch, torch.distributed as dist
p = argparse.ArgumentParser(); p.add_argument("--config"); p.add_argument("--fold"); p.add_argument("--role")
a = p.parse_args()
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
out = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "MASTER_PORT")}
out.update(sum=t.item(), omp=os.environ.get("OMP_NUM_THREADS"), fold=a.fold, role=a.role)
with open(os.path.join(a.config, f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


def test_two_node_rendezvous_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "allreduce_mod.py").write_text(ALLREDUCE)
    job_id = str(7_000_000 + os.getpid() % 100_000)  # a fresh port for every test run
    port = rendezvous_port(job_id)
    assert port < ephemeral_port_range()[0]
    procs = []
    for node in (0, 1):
        env = {
            **os.environ,
            "SLURM_JOB_ID": job_id,
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_NODEID": str(node),
            "PYTHONPATH": str(tmp_path),
            "OMP_NUM_THREADS": "1",
        }
        env.pop("SLURM_JOB_NODELIST", None)  # rendezvous host: 127.0.0.1
        env.pop("SLURM_ARRAY_JOB_ID", None)
        cmd = torchrun_command(str(tmp_path), 0, "teacher", 1, sys.executable, "allreduce_mod", env=env)
        assert "--nnodes=2" in cmd and f"--node_rank={node}" in cmd and "--rdzv_backend=c10d" in cmd
        assert f"--rdzv_endpoint=127.0.0.1:{port}" in cmd and f"--rdzv_id={job_id}_0" in cmd
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    t0 = time.monotonic()
    outs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["sum"] for r in ranks] == [3.0, 3.0]  # 1 + 2: both "nodes" joined one group
    assert {r["GROUP_RANK"] for r in ranks} == {"0", "1"} and {r["WORLD_SIZE"] for r in ranks} == {"2"}
    assert ranks[0]["fold"] == "0" and ranks[0]["role"] == "teacher"
    print(f"\n[timing] two-node rendezvous on localhost: {time.monotonic() - t0:.1f} s (port {port})")
