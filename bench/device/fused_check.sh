#!/usr/bin/env bash
# On the lent GPU, final check: GPU tests of the layer/state/op/CLI/tuner, the LM example (default layer is
# now fused on CUDA), then the fused kernels and the layer benchmark once more.
source "$(dirname "$0")/env.sh"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_swr_stream.py tests/test_state.py \
  tests/test_phalanx.py tests/test_op_cpu.py tests/test_cli.py tests/test_tune.py --tb=short 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -4
timeout 90 python3 examples/tiny_hybrid_lm.py --device cuda 2>&1 | tee "$OUT/lm.log" | tail -6
timeout 60 python3 bench/bench_fused.py --json "$OUT/fused.json" 2>&1 | tee "$OUT/fused.log"
timeout 100 python3 bench/layer_bench.py --dim 1024 --batch 2 --lengths 8192 2048 8192 32768 --json "$OUT/layer.json" 2>&1 \
  | tee "$OUT/layer.log"
