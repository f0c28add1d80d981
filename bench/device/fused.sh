#!/usr/bin/env bash
# On the lent GPU: fused kernels with the 16-byte vector path: tests, kernel sweep, layer and model benchmarks.
source "$(dirname "$0")/env.sh"
timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_gpu_phalanx_fused.py --tb=short 2>&1 \
  | tee "$OUT/gpu_fused.log" | tail -4
grep -q " passed" "$OUT/gpu_fused.log" && ! grep -q "failed" "$OUT/gpu_fused.log" || exit 1
timeout 100 python3 bench/bench_fused.py --sweep --json "$OUT/fused.json" 2>&1 | tee "$OUT/fused.log"
timeout 100 python3 bench/layer_bench.py --dim 1024 --batch 2 --lengths 8192 2048 8192 32768 --json "$OUT/layer.json" 2>&1 \
  | tee "$OUT/layer.log"
timeout 150 python3 bench/model_bench.py --lengths 4096 8192 32768 --json "$OUT/model.json" 2>&1 | tee "$OUT/model.log"
