#!/usr/bin/env bash
# Final validation, part C (after the launch-path changes): GPU tests, launch cost, roofline table.
source "$(dirname "$0")/env.sh"
timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_swr.py tests/test_gpu_swr_backward.py \
  tests/test_gpu_swr_stream.py tests/test_state.py tests/test_phalanx.py tests/test_varlen.py --tb=short 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -4
timeout 60 python3 bench/suite.py --skip generated,alternatives --json "$OUT/launch.json" 2>&1 | tail -9
timeout 60 python3 bench/bench_swr.py --k 2 --out fp32 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
