#!/usr/bin/env bash
# Final validation on the lent GPU, part A: every GPU test, the sanitizer, the roofline table, the LM example.
source "$(dirname "$0")/env.sh"
timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_swr.py tests/test_gpu_swr_backward.py \
  tests/test_gpu_swr_stream.py tests/test_state.py tests/test_phalanx.py tests/test_varlen.py --tb=short 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -4
timeout 100 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 20 python3 bench/edge_check.py 2>&1 \
  | tee "$OUT/sanitizer.log" | tail -2
timeout 90 python3 bench/bench_swr.py --k 2 3 --out fp32 bf16 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
timeout 90 python3 examples/tiny_hybrid_lm.py --device cuda 2>&1 | tee "$OUT/lm.log" | tail -6
