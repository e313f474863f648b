#!/usr/bin/env bash
# GPU check, in one go on a CUDA machine (no network): the CUDA-marked tests, the GPU layer sweep,
# the grouped (mixed-adapter) benchmark, then the whole-model benchmark in bfloat16.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Runs from the repository root with PYTHONPATH=. (no install needed). Writes under OUTDIR:
#   env.txt            versions and the device
#   pytest_cuda.log    python -m pytest -q -m cuda tests/
#   bench_stdout.txt   the sweep's table; bench_progress.log its progress bar
#   <date>_cuda-*.csv / .json / _lora.png / _dora.png   the sweep's results
#   grouped_stdout.txt / grouped.json   python -m benchmarks grouped: mixed_lora_linear (16
#                      adapters r=16, bf16, x 8192x4096, W 4096x4096) vs the one-adapter
#                      lora_linear, both triton: correctness vs float32, then the paired
#                      ratio (target <= 1.10x; status 4 when missed, 1 when wrong)
#   model_stdout.txt   the whole-model table (bf16, batch 4x128, LoRA/DoRA r=16 on all linear
#                      layers: floor / lightning-peft / peft, decoding); model_progress.log
#   <date>_cuda-*_model.csv / .json / .png   its results
# The whole-model benchmark uses the embedded SmolLM2-135M when it loads here, else the same
# shape with random weights (speed does not depend on the values); it needs transformers and
# lightning (peft too for its columns) and says so when they are missing.
# Bounded by `timeout`: 150 s for the tests, 180 s for the sweep, 90 s for the grouped benchmark,
# 150 s for the whole-model benchmark (about 10 minutes in all, at most).
# Exit status: 0 when every step passes, else the first failing step's status (124: timed out).
set -u -o pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python}"

echo "== environment" | tee "$OUT/env.txt"
timeout 60 "$PYTHON" - <<'PY' 2>&1 | tee -a "$OUT/env.txt"
import importlib.metadata as md
import torch
for name in ("torch", "triton", "peft", "matplotlib", "tqdm"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} (not installed)")
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), torch.version.cuda)
PY

echo "== CUDA tests (log: $OUT/pytest_cuda.log)"
timeout 150 "$PYTHON" -m pytest -q -m cuda tests/ 2>&1 | tee "$OUT/pytest_cuda.log"
tests_status=$?

echo "== GPU sweep (progress: $OUT/bench_progress.log)"
timeout 180 "$PYTHON" -m benchmarks --device cuda --out "$OUT" \
    >"$OUT/bench_stdout.txt" 2>"$OUT/bench_progress.log"
bench_status=$?
if [[ $bench_status -ne 0 ]]; then
    echo "-- sweep failed (status $bench_status); last lines of its stderr:"
    tail -n 30 "$OUT/bench_progress.log"
fi

echo "== grouped benchmark: mixed adapters vs one adapter (stdout: $OUT/grouped_stdout.txt)"
timeout 90 "$PYTHON" -m benchmarks grouped --json "$OUT/grouped.json" \
    >"$OUT/grouped_stdout.txt" 2>&1
grouped_status=$?
if [[ $grouped_status -ne 0 ]]; then
    echo "-- grouped benchmark: status $grouped_status (1: wrong, 4: target missed); its tail:"
    tail -n 30 "$OUT/grouped_stdout.txt"
fi

echo "== whole-model benchmark, bf16 (progress: $OUT/model_progress.log)"
model_args=()
if ! timeout 60 "$PYTHON" -c "import transformers, lightning" >>"$OUT/model_progress.log" 2>&1; then
    echo "-- transformers or lightning does not import here: whole-model benchmark skipped"
    model_status=3
else
    if ! timeout 120 "$PYTHON" -c "from lightning_peft.cli.embedded import smollm2_path; smollm2_path()" \
        >>"$OUT/model_progress.log" 2>&1; then
        echo "-- the embedded SmolLM2 is not available: its shape with random weights"
        model_args=(--random-weights)
    fi
    timeout 150 "$PYTHON" -m benchmarks model --device cuda --dtype bfloat16 --out "$OUT" \
        "${model_args[@]}" >"$OUT/model_stdout.txt" 2>>"$OUT/model_progress.log"
    model_status=$?
    if [[ $model_status -ne 0 ]]; then
        echo "-- whole-model benchmark failed (status $model_status); last lines of its stderr:"
        tail -n 30 "$OUT/model_progress.log"
    fi
fi

if [[ $tests_status -eq 5 ]]; then
    echo "-- pytest status 5: no CUDA-marked test was collected"
fi
echo "== CUDA tests: status $tests_status ($(tail -n 1 "$OUT/pytest_cuda.log"))"
echo "== GPU sweep: status $bench_status"
cat "$OUT/bench_stdout.txt"
echo "== grouped benchmark: status $grouped_status"
cat "$OUT/grouped_stdout.txt"
echo "== whole-model benchmark: status $model_status"
[[ -f "$OUT/model_stdout.txt" ]] && cat "$OUT/model_stdout.txt"

for status in "$tests_status" "$bench_status" "$grouped_status" "$model_status"; do
    if [[ $status -ne 0 ]]; then
        exit "$status"
    fi
done
exit 0
