#!/usr/bin/env bash
# Device run (carry .swrcache .whl): k=3 at 2K over batch-filling chunks (T=6, 10, 14), every GPU test, then
# the suite with the shipped configs plus that entry. Results in $OUT/res.tgz.
source bench/device/env.sh
export SWRGEN_TEST_CACHE_SEED=$PWD/.swrcache
mkdir -p /tmp/res
G3="warps_per_cta=1,2,4,8;tiles_per_warp=6,10,14;tiles_in_flight=4,8;cluster_size=1;persistent=false;staging=shared;stages=2,3"
timeout 60 python3 -m swrgen.cli tune specs/hopper_k3.yaml --shape 8,64,2048 --grid "$G3" \
  --json /tmp/res/tune2k_hopper_k3.json 2>&1 | grep -v "^\[" | tee /tmp/res/tune2k_hopper_k3.txt
mkdir -p /tmp/res/tuned && cp .swrcache/tuned/*.json /tmp/res/tuned/
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_swr.py tests/test_gpu_swr_backward.py \
  tests/test_gpu_swr_stream.py tests/test_gpu_launch_plans.py tests/test_gpu_tune.py tests/test_gpu_phalanx_fused.py \
  tests/test_gpu_staging.py tests/test_state.py tests/test_varlen.py tests/test_phalanx.py 2>&1 | tail -6 \
  | tee /tmp/res/tests.txt
timeout 170 python3 bench/suite.py --budget-s 100 --json /tmp/res/suite.json 2>&1 | tail -60 | tee /tmp/res/suite.txt
tar czf "$OUT/res.tgz" -C /tmp res
