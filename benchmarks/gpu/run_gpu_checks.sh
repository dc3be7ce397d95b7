#!/usr/bin/env bash
# One device call: install the carried wheels (numba.cuda does not import with the machine's own
# numpy 2.5), then check and time unroll's CUDA backend. Results: $OUT (fetched back by the device
# tool) and benchmarks/results/ on the machine. See benchmarks/gpu/README.md.
#   usage: bash benchmarks/gpu/run_gpu_checks.sh [--quick] [gpu_check.py options]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/ carried: using the machine's packages (numba.cuda may fail to import with numpy 2.5)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=4
export XLA_PYTHON_CLIENT_PREALLOCATE=false          # JAX must leave GPU memory to numba and torch
export NUMBA_CACHE_DIR=/tmp/unroll_numba_cache UNROLL_CACHE_DIR=/tmp/unroll_cache
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c "import numpy, numba; from numba import cuda; print('numpy', numpy.__version__, 'numba', numba.__version__, 'gpu', cuda.is_available())" 2>&1 | tee "$OUT/env.txt"
timeout 470 python3 benchmarks/gpu/gpu_check.py --out "$OUT" --results benchmarks/results "$@" 2>&1 | tee "$OUT/run.txt"
status=${PIPESTATUS[0]}
echo "gpu_check exit status: $status"
# the same rows through `unroll bench --backend cuda` (LSTM only: what the remaining minutes allow)
timeout 90 python3 -m unroll.bench --backend cuda --cells lstm --configs tiny small long xl --repeats 5 \
  --budget 1 --no-plot --out "$OUT/unroll_bench_cuda" 2>&1 | tail -12 | tee "$OUT/unroll_bench_cuda.txt"
exit "$status"
