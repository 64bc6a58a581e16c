#!/usr/bin/env bash
# The whole GPU measurement of bonehpc in one go, on a GPU machine without a package index.
#
#   bash bench/gpu.sh [--cpu] OUT_DIR
#
# Run from the repository root. Steps (each logged with its time; a failing step is recorded in
# OUT_DIR/steps.tsv and the next one still runs):
#   install   DALI + the small wheels from .gpu/ (made by shared/gpu/prepare-dali-carry.sh) into /tmp/site
#   env       nvidia-smi, versions, what imports
#   bench     bonehpc bench all, GPU sizes (224 px, batch 256, bf16, channels_last), eager
#   pytest    the GPU tests of the augmentations (DALI fp16 NHWC vs albumentations), if pytest imports
#   anchor    the shared anchor script on the same card (.gpu/anchor/gpu_anchor.py), if present
#   compile   bonehpc bench train --modes compile (torch.compile of teacher, student and KD step)
#   summary   OUT_DIR/summary.md: the tables (eager and compile merged: bench-merged.json) + the step table
# --cpu: the same steps with tiny sizes on the CPU (to test this script without a GPU).
# Environment: PYTHON (python3), SITE (/tmp/site), BENCH_ARGS / ANCHOR_ARGS (extra arguments),
# T_BENCH, T_PYTEST, T_ANCHOR, T_COMPILE (time limits of the steps, seconds), STEPS (the steps to run,
# default all; e.g. STEPS="install env bench pytest" then STEPS="install anchor compile summary" with
# the same OUT_DIR to split the work over two calls: steps.tsv is appended to, the summary reads both).
set -euo pipefail

CPU=0
if [[ "${1:-}" == "--cpu" ]]; then CPU=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: bash bench/gpu.sh [--cpu] OUT_DIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
export OUT  # the anchor script writes $OUT/anchor.json
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
export PY SITE PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu.log") 2>&1
[[ -f "$OUT/steps.tsv" ]] || printf 'step\trc\tseconds\n' > "$OUT/steps.tsv"
STEPS=${STEPS:-install env bench pytest anchor compile summary}
want() { [[ " $STEPS " == *" $1 "* ]]; }

say() { echo "[gpu.sh $(date +%H:%M:%S)] $*"; }
export -f say

# step NAME LIMIT_S CMD...: run CMD with a time limit, log start/end/rc/time, never abort the script.
step() {
  local name=$1 limit=$2 rc=0 t0 t1
  shift 2
  if ! want "$name"; then say "step $name: not in STEPS, skipped"; return 0; fi
  say "step $name: start (limit ${limit}s): $*"
  t0=$(date +%s.%N)
  timeout --kill-after=15 "$limit" "$@" || rc=$?
  t1=$(date +%s.%N)
  local dt
  dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >> "$OUT/steps.tsv"
  if [[ $rc -eq 0 ]]; then say "step $name: ok in ${dt}s"; else say "step $name: FAILED rc=$rc in ${dt}s"; fi
  return 0
}

install_wheels() {
  if "$PY" -c "import nvidia.dali" 2>/dev/null; then
    say "nvidia.dali already imports ($SITE or system): nothing to install"
    return 0
  fi
  if [[ ! -f .gpu/dali.name ]] || ! compgen -G ".gpu/dali.part*" >/dev/null; then
    say "no .gpu/dali.name / .gpu/dali.part*: no DALI here (the dali backend will be reported as skipped)"
    return 1
  fi
  mkdir -p /tmp/d "$SITE"
  local whl
  whl="/tmp/d/$(cat .gpu/dali.name)"
  cat .gpu/dali.part* > "$whl"
  local extra=()
  if compgen -G ".gpu/w/*.whl" >/dev/null; then extra=(.gpu/w/*.whl); fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$whl" "${extra[@]}"
  "$PY" -c "import nvidia.dali as d; print('DALI', d.__version__)"
}

env_info() {
  nvidia-smi || echo "no nvidia-smi"
  nproc
  "$PY" - <<'PYEOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("nvidia.dali", "albumentations", "timm", "h5py", "cv2", "pytest", "submitit", "optuna"):
    try:
        mod = importlib.import_module(m)
        print(f"{m}: {getattr(mod, '__version__', 'ok')}")
    except Exception as err:  # noqa: BLE001
        print(f"{m}: not importable ({type(err).__name__}: {err})")
import bonehpc.bench  # noqa: F401  (must import without submitit/optuna)
print("bonehpc.bench imports")
PYEOF
}

if [[ $CPU -eq 1 ]]; then
  SIZES=(--device cpu --image-size 32 --batch-size 4 --steps 1 --warmup 1 --repeats 1 --loader-steps 2
         --patients 10 --max-side 64 --teacher resnet18 --student hybrid_tiny --read-images 50 --threads 1)
  ANCHOR_DEFAULT="--bs 4 --steps 1 --warm 1 --n 16 --pack 64 --students resnet18 --skip seed,shardsalbu,dali --loader-warm 1"  # fastvit_t8 segfaulted on this CPU (torch 2.14)
  : "${T_BENCH:=400}" "${T_PYTEST:=200}" "${T_ANCHOR:=300}" "${T_COMPILE:=400}"
else
  # 300 patients ~ 1,100 images of up to 512 px, packed at 256; the sizes of shared/docs/gpu-anchors.md.
  SIZES=(--device cuda --image-size 224 --batch-size 256 --steps 15 --warmup 5 --repeats 3 --loader-steps 40
         --patients 300 --max-side 512 --pack-size 256 --amp bf16 --channels-last --read-images 2000)
  ANCHOR_DEFAULT="--steps 20 --warm 5 --n 1024 --students fastvit_t8"
  : "${T_BENCH:=300}" "${T_PYTEST:=120}" "${T_ANCHOR:=240}" "${T_COMPILE:=300}"
fi
read -r -a EXTRA <<< "${BENCH_ARGS:-}"
read -r -a AARGS <<< "${ANCHOR_ARGS:-$ANCHOR_DEFAULT}"
WORK=/tmp/bonehpc-bench-work  # shared by the steps: the data is generated and packed once

say "out: $OUT   python: $PY   PYTHONPATH: $PYTHONPATH   cpu mode: $CPU"
export -f install_wheels env_info
step install 600 bash -c install_wheels
step env 120 bash -c env_info
step bench "$T_BENCH" "$PY" -m bonehpc bench all "${SIZES[@]}" --no-compile --workdir "$WORK" \
  --out "$OUT/bench.json" "${EXTRA[@]}"
if "$PY" -c "import pytest" 2>/dev/null; then
  step pytest "$T_PYTEST" "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_augment.py -m gpu -rs
else
  say "pytest does not import: GPU parity comes from the bench's parity section only"
fi
ANCHOR=${ANCHOR:-}
for a in .gpu/anchor/gpu_anchor.py ../shared/bench/gpu_anchor.py; do
  if [[ -z "$ANCHOR" && -f "$a" ]]; then ANCHOR=$a; fi
done
if [[ -n "$ANCHOR" ]]; then
  step anchor "$T_ANCHOR" "$PY" "$ANCHOR" "${AARGS[@]}"
else
  say "no anchor script (.gpu/anchor/gpu_anchor.py): same-card anchor figures not measured"
fi
# torch.compile of the teacher and the student (KD compiles the student again: left out for time), ceiling + DALI.
step compile "$T_COMPILE" "$PY" -m bonehpc bench train "${SIZES[@]}" --modes compile --roles teacher,student \
  --backends dali --workdir "$WORK" \
  --out "$OUT/bench-compile.json" "${EXTRA[@]}"

summary() {
  "$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
from bonehpc.bench import format_table, train_ratios, write_result
out = Path(sys.argv[1])
parts = ["# bonehpc GPU benchmark", ""]
res = {n: json.loads((out / n).read_text()) for n in ("bench.json", "bench-compile.json") if (out / n).is_file()}
if len(res) == 2 and "train" in res["bench.json"]["sections"] and "train" in res["bench-compile.json"]["sections"]:
    # One table with compile next to eager: the compile runs come from the second process on the same card.
    merged = res["bench.json"]
    tr = merged["sections"]["train"]
    tr["runs"] += res["bench-compile.json"]["sections"]["train"]["runs"]
    tr["modes"] = tr["modes"] + ["compile"]
    tr["ratios"] = train_ratios(tr["runs"])
    tr["compile"] = "compile runs: bench-compile.json (a second process on the same machine, minutes later)"
    write_result(merged, out / "bench-merged.json")
    parts += ["## bench.json + bench-compile.json (bench-merged.json)", "", format_table(merged), ""]
else:
    for name in ("bench.json", "bench-compile.json"):
        table = format_table(res[name]) if name in res else "(not written: see gpu.log)"
        parts += [f"## {name}", "", table, ""]
p = out / "anchor.json"
if p.is_file():
    a = json.loads(p.read_text())
    parts += ["## anchor.json (shared/bench/gpu_anchor.py, same card)", "", "| measure | img/s |", "|---|---:|"]
    parts += [f"| {k} | {v:,.0f} |" for k, v in a.items() if k.endswith("_img_s")]
    parts += [""]
parts += ["## steps", "", "| step | rc | seconds |", "|---|---:|---:|"]
for line in (out / "steps.tsv").read_text().splitlines()[1:]:
    parts.append("| " + " | ".join(line.split("\t")) + " |")
(out / "summary.md").write_text("\n".join(parts) + "\n")
print("\n".join(parts))
PYEOF
}
export -f summary
step summary 120 bash -c summary
say "done: $OUT/summary.md, $OUT/bench.json, $OUT/bench-compile.json, $OUT/anchor.json, $OUT/gpu.log"
