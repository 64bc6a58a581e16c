"""Report section: reproducibility (code, data, seeds, machine, packages, resolved config)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path

import pandas as pd
import yaml

from bonehpc.report.doc import Section
from bonehpc.report.experiment import Experiment, _read_json

PACKAGES = {
    "torch": ("torch",),
    "timm": ("timm",),
    "nvidia-dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
    "optuna": ("optuna",),
    "submitit": ("submitit",),
    "albumentations": ("albumentations",),
    "h5py": ("h5py",),
    "scikit-learn": ("scikit-learn",),
    "pandas": ("pandas",),
    "numpy": ("numpy",),
    "matplotlib": ("matplotlib",),
}


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (from package metadata: nothing heavy is imported)."""
    out = {}
    for label, dists in PACKAGES.items():
        out[label] = "not installed"
        for d in dists:
            try:
                out[label] = (
                    f"{importlib.metadata.version(d)} ({d})" if len(dists) > 1 else importlib.metadata.version(d)
                )
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "not found"


def section_repro(exp: Experiment) -> Section:
    sec = Section("Reproducibility", "repro")
    from bonehpc.data.shards import MANIFEST_JSON
    from bonehpc.registry import git_sha  # the one implementation (also recorded in jobs.json and the tuning study)

    sha = git_sha()
    recorded = sorted({str(v) for r in exp.runs.values() for k, v in r.summary.items() if k in ("git_sha", "git")})
    shards_hash, shards_dir = "unknown", ""
    if exp.cfg:
        sd = Path(exp.cfg.data.shards)
        shards_dir = str(sd)
        mj = sd / MANIFEST_JSON
        if mj.is_file():
            try:
                shards_hash = str(_read_json(mj).get("source_manifest_sha256", "not recorded"))
            except (OSError, ValueError) as err:
                shards_hash = f"unreadable ({err})"
        else:
            shards_hash = f"{mj} not found"
    rows = [
        ("git SHA of the code that built this report (+dirty: uncommitted changes)", sha),
        ("git SHA recorded by the runs", ", ".join(recorded) or "not recorded"),
        ("config problem", exp.cfg_problem or "none"),
        ("train.seed", exp.cfg.train.seed if exp.cfg else "?"),
        ("data.fold_seed", exp.cfg.data.fold_seed if exp.cfg else "?"),
        ("tune.sampler_seed", exp.cfg.tune.sampler_seed if exp.cfg else "?"),
        ("shards folder", shards_dir),
        ("shards source manifest SHA-256 (manifest.json)", shards_hash),
        ("runs/<exp>/manifest.csv SHA-256", _sha256(exp.paths.manifest)),
        ("runs/<exp>/folds.csv SHA-256", _sha256(exp.paths.folds)),
        ("report machine", f"{platform.node()} | {platform.platform()} | {os.cpu_count()} CPUs"),
        ("python", platform.python_version()),
    ]
    nodes = sorted(set(exp.acct["node"].astype(str))) if exp.acct is not None and "node" in exp.acct else []
    rows.append(("training nodes (sacct)", ", ".join(nodes) or "unknown (no Slurm accounting)"))
    rows += [(f"package {k}", v) for k, v in package_versions().items()]
    sec.table(pd.DataFrame(rows, columns=["item", "value"]), "reproducibility", "Code, data, seeds, machine.")
    if exp.paths.config.is_file():
        sec.p(f"Resolved config (config.yaml):\n{exp.paths.config.read_text()}", "pre")
    elif exp.raw_cfg:
        sec.p(
            f"Resolved config (config.yaml of a run; none at the top):\n{yaml.safe_dump(exp.raw_cfg, sort_keys=False)}",
            "pre",
        )
    else:
        sec.p("Resolved config: no config.yaml found", "missing")
    return sec
