"""`bonehpc bench`: every section runs end to end at tiny sizes, numbers are positive, ratios match the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bonehpc.bench import BenchError, BenchOptions, format_table, run_benchmarks, train_ratios
from bonehpc.bench.loader import benchmark_loader
from bonehpc.bench.pack import benchmark_pack, benchmark_reads
from bonehpc.config import load_config
from bonehpc.data.shards import ShardReader

REPO = Path(__file__).resolve().parents[2]


def tiny(tmp_path: Path, **kw: object) -> BenchOptions:
    """Sizes that run in seconds on a busy 2-core machine (1 thread: spinning OpenMP threads stall there)."""
    base: dict[str, object] = {
        "image_size": 32,
        "batch_size": 4,
        "steps": 2,
        "warmup": 1,
        "repeats": 2,
        "loader_steps": 3,
        "patients": 10,
        "max_side": 64,
        "teacher": "resnet18",
        "student": "hybrid_tiny",
        "read_images": 60,
        "workers": 1,
        "pack_workers": 1,
        "threads": 1,
        "ddp_procs": 2,
        "workdir": str(tmp_path / "work"),
    }
    base.update(kw)
    return BenchOptions(**base)  # type: ignore[arg-type]


def close(ratio: float, a: float, b: float) -> bool:
    """ratio was computed from unrounded a/b; a and b are rounded to 0.1."""
    return abs(ratio - a / b) <= 0.01 * (a / b) + 0.1 / b + 0.002


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    opts = tiny(tmp_path_factory.mktemp("bench"))
    return run_benchmarks(["pack", "reads", "loader", "train", "infer", "parity"], opts)


def test_every_section_has_positive_numbers_and_its_ratio(result: dict) -> None:
    assert result["errors"] == {}
    secs = result["sections"]
    assert set(secs) == {"pack", "reads", "loader", "train", "infer", "parity"}
    m = result["machine"]
    assert m["cpu"] and m["cpu_cores_usable"] >= 1 and m["torch"] and "date" in m
    assert result["data"]["images"] >= 4

    p = secs["pack"]
    assert p["pack_img_per_s"] > 0 and p["decode_img_per_s"] > 0 and p["target_ratio"] == 0.8
    assert close(p["ratio"], p["pack_img_per_s"], p["decode_img_per_s"])
    assert p["meets_target"] == (p["ratio"] >= 0.8)

    r = secs["reads"]
    assert r["shard_img_per_s"] > 0 and r["png_img_per_s"] > 0 and r["images"] == 60
    assert close(r["ratio"], r["shard_img_per_s"], r["png_img_per_s"])

    for backend in ("dali", "torch"):
        lb = secs["loader"]["backends"][backend]
        assert lb["loader_img_s"] > 0 and lb["backend"] == backend and lb["image_size"] == 32

    inf = secs["infer"]
    t, s = inf["models"]["teacher"], inf["models"]["student"]
    assert t["img_s"] > 0 and s["img_s"] > 0 and t["params"] > s["params"] and t["gflops"] > s["gflops"]
    assert close(inf["ratio"], s["img_s"], t["img_s"]) and inf["target_ratio"] == 3.0

    par = secs["parity"]
    assert par["images"] >= 4 and par["within_tolerance"] and par["max_abs_diff"] <= par["tolerance"]
    assert par["dali_output"]["dtype"] == "float32"  # CPU-only DALI; fp16 NHWC is the GPU path


def test_train_runs_cover_roles_sources_and_ratios(result: dict) -> None:
    tr = result["sections"]["train"]
    assert tr["modes"] == ["eager"] and "not measured" in tr["compile"]  # said, not silently skipped
    runs = {(r["role"], r["mode"], r["source"]): r for r in tr["runs"]}
    for role in ("teacher", "student", "kd", "kd_cached", "outputs"):
        for source in ("ceiling", "dali", "torch"):
            run = runs[(role, "eager", source)]
            assert run["img_s"] > 0 and len(run["img_s_repeats"]) == 2, run
            assert run["loss"] == run["loss"]  # finite, the step really trained
    assert runs[("kd", "eager", "ceiling")]["teacher"] == "resnet18"
    ratios = tr["ratios"]
    for role in ("teacher", "student", "kd"):
        for source in ("dali", "torch"):
            a, b = runs[(role, "eager", source)]["img_s"], runs[(role, "eager", "ceiling")]["img_s"]
            assert close(ratios[f"{role}/eager/{source}_vs_ceiling"], a, b)
    a, b = runs[("kd", "eager", "ceiling")]["img_s"], runs[("student", "eager", "ceiling")]["img_s"]
    assert close(ratios["kd/eager/ceiling_vs_student"], a, b)
    # kd cached (student + logits looked up by id) beside kd online; the outputs job's inference beside the
    # teacher's training step on the same source
    a = runs[("kd_cached", "eager", "ceiling")]["img_s"]
    assert close(ratios["kd_cached/eager/ceiling_vs_student"], a, b)
    for source in ("ceiling", "dali", "torch"):
        a, b = runs[("outputs", "eager", source)]["img_s"], runs[("teacher", "eager", source)]["img_s"]
        assert close(ratios[f"outputs/eager/{source}_vs_teacher_train"], a, b)
    # The loaders hand the step what the contract says: float on the device, [B, 3, H, W].
    for source in ("ceiling", "dali", "torch"):
        fmt = tr["loader_format"][source]
        assert fmt["dtype"] == "float32" and fmt["device"] == "cpu" and fmt["shape"] == [4, 3, 32, 32]


def test_table_lists_every_figure_with_its_comparison(result: dict) -> None:
    table = format_table(result)
    assert result["machine"]["cpu"] in table.splitlines()[0]
    for needle in ("decode only", "PNG decode", "loader dali alone", "loader torch alone", "ceiling", "teacher"):
        assert needle in table, needle
    assert "| infer student hybrid_tiny |" in table and "x | >= 3x |" in table
    assert "| train torch.compile | not measured: eager only" in table  # said in the table too
    assert "| train kd cached hybrid_tiny+resnet18 cached logits eager ceiling (device batch) |" in table
    assert "student ceiling" in table and "| outputs job resnet18 inference eager torch e2e |" in table
    assert "teacher train" in table


def test_train_ratios_from_runs() -> None:
    runs = [
        {"role": "teacher", "mode": "eager", "source": "ceiling", "img_s": 100.0},
        {"role": "teacher", "mode": "eager", "source": "dali", "img_s": 90.0},
        {"role": "teacher", "mode": "eager", "source": "torch", "img_s": 45.0},
        {"role": "teacher", "mode": "compile", "source": "ceiling", "img_s": 150.0},
        {"role": "teacher", "mode": "compile", "source": "dali", "error": "boom"},
    ]
    r = train_ratios(runs)
    assert r["teacher/eager/dali_vs_ceiling"] == 0.9 and r["teacher/eager/dali_vs_torch"] == 2.0
    assert r["teacher/ceiling/compile_vs_eager"] == 1.5
    assert "teacher/compile/dali_vs_ceiling" not in r  # no figure, no ratio
    # A model that did not build leaves a run without a source: no ratio from it, and no crash.
    failed = {"role": "kd", "mode": "eager", "error": "boom"}
    assert train_ratios([*runs, failed]) == r
    assert "| train kd  eager | boom |" in format_table({"sections": {"train": {"runs": [failed]}}})


def test_ddp_one_vs_two_cpu_processes(tmp_path: Path) -> None:
    res = run_benchmarks(["ddp"], tiny(tmp_path, steps=1, repeats=1))
    assert res["errors"] == {}
    d = res["sections"]["ddp"]
    assert d["kind"] == "cpu-gloo" and "CPU" in d["note"]
    one, two = d["runs"]["1"], d["runs"]["2"]
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["backend"] == "gloo"
    assert one["img_s"] > 0 and two["img_s"] > 0 and close(d["ratio"], two["img_s"], one["img_s"])


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    res = run_benchmarks(["infer"], tiny(tmp_path, teacher="no_such_model_xyz", repeats=1, steps=1))
    assert "infer" in res["errors"] and "no_such_model_xyz" in res["errors"]["infer"]
    assert "infer: FAILED" in format_table(res)


def test_bad_options_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="batch_size"):
        tiny(tmp_path, batch_size=0)
    with pytest.raises(BenchError, match="backend 'jax'"):
        tiny(tmp_path, backends=("jax",))
    with pytest.raises(BenchError, match="unknown benchmark section"):
        run_benchmarks(["warp"], tiny(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "bonehpc", "bench", "reads", "--batch-size", "0"]
    proc = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2 and "batch_size must be > 0" in proc.stdout + proc.stderr


def test_cli_writes_json_and_table_without_submitit_or_optuna(tmp_path: Path) -> None:
    """The GPU image has neither submitit nor optuna: the bench and everything it imports must do without."""
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('submitit', 'optuna'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import bonehpc.train, bonehpc.engine, bonehpc.data.loaders, bonehpc.data.pack, bonehpc.distill\n"
        "from bonehpc.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "b.json"
    args = ["bench", "reads", "--patients", "6", "--max-side", "64", "--read-images", "20", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", blocker, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| warm random shard reads" in proc.stdout and str(out) in proc.stdout
    data = json.loads(out.read_text())
    assert data["sections"]["reads"]["ratio"] > 0 and data["machine"]["omp_wait_policy"] == "PASSIVE"


def test_pack_and_reads_benchmarks_return_measured_numbers(synth_root: Path, shards_dir: Path) -> None:
    p = benchmark_pack(synth_root, workers=1, limit=24, pack_size=64, repeats=1)
    assert p["images"] == 24 and p["pack_img_per_s"] > 0 and p["decode_img_per_s"] > 0
    assert p["ratio"] == pytest.approx(p["pack_img_per_s"] / p["decode_img_per_s"], rel=0.02)
    r = benchmark_reads(shards_dir, n=64)
    assert r["images"] == 64 and r["shard_img_per_s"] > 0 and r["png_img_per_s"] > 0


def test_benchmark_loader_reports_throughput(shards_dir: Path) -> None:
    cfg = load_config(None, ["data.image_size=64", "data.pack_size=64", "data.num_workers=1", "train.batch_size=8"])
    reader = ShardReader(shards_dir)
    steps = len(reader) // 8 + 1  # more batches than one epoch holds: the stream runs over the epoch boundary
    res = benchmark_loader(cfg, reader, "torch", steps=steps, warmup=1, device=torch.device("cpu"))
    assert res["backend"] == "torch" and res["device"] == "cpu" and res["batch_size"] == 8 and res["steps"] == steps
    assert res["loader_img_s"] > 0 and res["startup_s"] > 0


def test_pack_section_and_cli_options_import_without_torch() -> None:
    """The decode-only pool workers import bonehpc.bench.pack, and the CLI reads SECTIONS before it sets
    OMP_WAIT_POLICY: neither may pull in torch (seconds per worker, and the OpenMP runtime too early)."""
    code = "import sys, bonehpc.bench.pack, bonehpc.cli.bench; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    assert proc.stdout.strip() == "False"
