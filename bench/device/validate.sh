#!/usr/bin/env bash
# Device run (carry .swrcache .whl): the GPU tests after the backward's re-read loads (Reuse::kAgain) and
# the retuned forward knobs, the ops' path with the shipped configs, and the benchmark suite.
source bench/device/env.sh
export SWRGEN_TEST_CACHE_SEED=$PWD/.swrcache
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_swr.py tests/test_gpu_swr_backward.py \
  tests/test_gpu_swr_stream.py tests/test_gpu_launch_plans.py tests/test_gpu_tune.py tests/test_gpu_phalanx_fused.py \
  tests/test_state.py tests/test_varlen.py tests/test_phalanx.py 2>&1 | tail -6 | tee "$OUT/tests.txt"
timeout 100 python3 bench/tuned_effect.py 2>&1 | tee "$OUT/tuned_effect.txt"
timeout 200 python3 bench/suite.py --budget-s 110 --json "$OUT/suite.json" 2>&1 | tail -45 | tee "$OUT/suite.txt"
