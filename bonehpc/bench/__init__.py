"""Benchmarks behind `bonehpc bench`: every figure next to the one it is compared with, measured in the same run.

Sections (`run.run_benchmarks` runs a selection and records failures per section):

- pack: packing img/s vs decode-only img/s, same images and processes (`pack.benchmark_pack`).
- reads: warm random-access shard reads vs decoding the PNGs of the same images (`pack.benchmark_reads`).
- loader: img/s of each loader backend alone (`loader.benchmark_loader`).
- train: img/s of the real training step (`bonehpc.engine.train_one_epoch`) for the teacher, the student and
  the KD step (student + frozen teacher), on a device-resident batch ("ceiling": the synthetic backend,
  no reading, no augmentation) and end to end with each loader backend; eager and torch.compile (`train`).
- infer: inference img/s of the teacher and the student (`infer`, `bonehpc.models.info.measure_throughput`).
- ddp: the same training step in 1 and N processes under torchrun (GPUs: NCCL; CPU: gloo, labelled so)
  (`ddp`; each process runs `ddp_worker`, started as `python -m bonehpc.bench ddp-worker`).
- parity: albumentations vs DALI output on the same shard images (GPU fp16 NHWC when there is a GPU) (`parity`).

The other modules: `options` (BenchOptions, torch-free), `probe` (machine, versions, what imports),
`data` (the synthetic MURA-layout set packed into shards in a work folder, temporary unless given, and
the config the sections read), `common` (sync, median, ratio, the endless batch stream), `table` (the
Markdown table). Timed loops have no host sync except one synchronize at their end; warm-up steps are
not timed; img/s is the median of `repeats` timed windows where that is cheap.

The names below are imported on first use, so that `import bonehpc.bench.pack` (the decode-only pool
workers) and `bonehpc.bench.options` (the CLI, before it sets OMP_WAIT_POLICY) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SECTIONS": "options",
    "BenchError": "options",
    "BenchOptions": "options",
    "machine_info": "probe",
    "device_label": "probe",
    "BenchData": "data",
    "prepare_data": "data",
    "bench_config": "data",
    "train_ratios": "train",
    "ddp_worker": "ddp_worker",
    "run_benchmarks": "run",
    "default_out_path": "run",
    "write_result": "run",
    "format_table": "table",
    "table_rows": "table",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from bonehpc.bench.data import BenchData, bench_config, prepare_data
    from bonehpc.bench.ddp_worker import ddp_worker
    from bonehpc.bench.options import SECTIONS, BenchError, BenchOptions
    from bonehpc.bench.probe import device_label, machine_info
    from bonehpc.bench.run import default_out_path, run_benchmarks, write_result
    from bonehpc.bench.table import format_table, table_rows
    from bonehpc.bench.train import train_ratios


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
