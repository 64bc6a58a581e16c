"""Cluster profiles: validation that names the bad key, per-kind overrides, and the sbatch scripts they render."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonehpc.config import ConfigError, load_config
from bonehpc.slurm import PROFILE_DIR, executor_parameters, load_profile, render_sbatch, resolve_mode

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "sbatch_profiles.txt"


def _render_all() -> str:
    # the same rendering that produced tests/golden/sbatch_profiles.txt (regenerate it when a profile changes)
    out = []
    for name in ("dev", "example-gpu"):
        prof = load_profile(name)
        for kind, dep in (("train", "aftercorr:100"), ("evaluate", "afterany:100:101")):
            out.append(f"##### profile={name} kind={kind}")
            out.append(
                render_sbatch(
                    prof.for_kind(kind),
                    "/RUNS/exp/submitit/%j",
                    f"exp-{kind}",
                    dep,
                    command="PYTHON -u -m submitit.core._submit /RUNS/exp/submitit/%j",
                )
            )
    return "\n".join(out) + "\n"


def test_sbatch_scripts_match_golden() -> None:
    assert _render_all() == GOLDEN.read_text()


def test_every_shipped_profile_loads() -> None:
    names = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
    assert {"dev", "local", "example-gpu"} <= set(names)
    for name in names:
        assert load_profile(name).name == name


def test_per_kind_override_and_defaults() -> None:
    prof = load_profile("example-gpu")
    ev = prof.for_kind("evaluate")
    assert (ev.gpus_per_node, ev.time_min, ev.partition) == (1, 60, "gpu")
    assert prof.for_kind("train").gpus_per_node == 4
    params = executor_parameters(prof.for_kind("train"), "x", "slurm")
    assert params["slurm_signal_delay_s"] == 120 and params["gpus_per_node"] == 4
    # without Slurm only the name and the time limit are passed on
    assert executor_parameters(prof.for_kind("train"), "x", "local") == {"name": "x", "timeout_min": 720}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("partition: gpu\ngpus_per_nod: 4\n", "gpus_per_nod"),
        ("time_min: ten\n", "time_min"),
        ("time_min: 1\nsignal_delay_s: 120\n", "signal_delay_s"),
        ("per_kind:\n  evaluat: {time_min: 5}\n", "per_kind.evaluat"),
        ("per_kind:\n  evaluate: {cpus: 5}\n", "cpus"),
        ("additional:\n  exclusive: false\n", "additional.exclusive"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_profiles_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_profile(str(path))


def test_missing_profile_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="known profiles: .*dev"):
        load_profile("nosuchcluster")


def test_explicit_modes_and_bad_mode() -> None:
    assert resolve_mode("local") == "local" and resolve_mode("debug") == "debug"
    with pytest.raises(ConfigError, match="cluster.mode"):
        resolve_mode("kubernetes")
    assert load_config(None, ["cluster.mode=auto"]).cluster.mode == "auto"
