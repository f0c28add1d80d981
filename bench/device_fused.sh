#!/usr/bin/env bash
# On the lent GPU: every GPU test (fused Phalanx kernels first), then the fused-kernel benchmark.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .whl/bench/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD SWRGEN_CACHE_DIR=$PWD/.swrcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_phalanx_fused.py --tb=short 2>&1 \
  | tee "$OUT/gpu_fused.log" | tail -15
timeout 120 python3 bench/bench_fused.py --sweep --json "$OUT/fused.json" 2>&1 | tee "$OUT/fused.log"
timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/test_gpu_swr.py tests/test_gpu_swr_backward.py \
  tests/test_gpu_swr_stream.py tests/test_phalanx.py --tb=short 2>&1 | tee "$OUT/gpu_tests.log" | tail -6
