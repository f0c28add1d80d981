#!/usr/bin/env bash
# Final validation, part C (after the launch-path changes): GPU tests, launch cost, roofline table.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD SWRGEN_CACHE_DIR=$PWD/.swrcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_swr.py tests/test_gpu_swr_backward.py \
  tests/test_gpu_swr_stream.py tests/test_state.py tests/test_phalanx.py tests/test_varlen.py --tb=short 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -4
timeout 60 python3 bench/suite.py --skip generated,alternatives --json "$OUT/launch.json" 2>&1 | tail -9
timeout 60 python3 bench/bench_swr.py --k 2 --out fp32 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
