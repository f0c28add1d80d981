#!/usr/bin/env bash
# Device run (carry .swrcache .whl), kind nvidia-h200 (an H200 only if one comes): on an H200, every GPU test
# and the ops' path with the shipped configs (the H200's own entries); on an H100, nothing. Results: res.tgz.
source bench/device/env.sh
if ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then echo "not an H200: nothing to do"; exit 0; fi
export SWRGEN_TEST_CACHE_SEED=$PWD/.swrcache
mkdir -p /tmp/res
timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_swr.py tests/test_gpu_swr_backward.py \
  tests/test_gpu_swr_stream.py tests/test_gpu_launch_plans.py tests/test_gpu_tune.py tests/test_gpu_phalanx_fused.py \
  tests/test_gpu_staging.py tests/test_state.py tests/test_varlen.py tests/test_phalanx.py 2>&1 | tail -6 \
  | tee /tmp/res/tests.txt
timeout 100 python3 bench/tuned_effect.py 2>&1 | tee /tmp/res/tuned_effect.txt
tar czf "$OUT/res.tgz" -C /tmp res
