#!/usr/bin/env bash
# GPU check, in one go on a CUDA machine (no network): the CUDA-marked tests, then the GPU sweep.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Runs from the repository root with PYTHONPATH=. (no install needed). Writes under OUTDIR:
#   env.txt            versions and the device
#   pytest_cuda.log    python -m pytest -q -m cuda tests/
#   bench_stdout.txt   the sweep's table; bench_progress.log its progress bar
#   <date>_cuda-*.csv / .json / _lora.png / _dora.png   the sweep's results
# Bounded by `timeout`: 150 s for the tests and 300 s for the sweep (8 minutes in all, at most).
# Exit status: 0 when both steps pass, else the first failing step's status (124: timed out).
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
timeout 300 "$PYTHON" -m benchmarks --device cuda --out "$OUT" \
    >"$OUT/bench_stdout.txt" 2>"$OUT/bench_progress.log"
bench_status=$?
if [[ $bench_status -ne 0 ]]; then
    echo "-- sweep failed (status $bench_status); last lines of its stderr:"
    tail -n 30 "$OUT/bench_progress.log"
fi

if [[ $tests_status -eq 5 ]]; then
    echo "-- pytest status 5: no CUDA-marked test was collected"
fi
echo "== CUDA tests: status $tests_status ($(tail -n 1 "$OUT/pytest_cuda.log"))"
echo "== GPU sweep: status $bench_status"
cat "$OUT/bench_stdout.txt"

if [[ $tests_status -ne 0 ]]; then
    exit "$tests_status"
fi
exit "$bench_status"
