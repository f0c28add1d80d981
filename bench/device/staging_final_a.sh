#!/usr/bin/env bash
# Device run (carry .swrcache .whl): after shared staging landed -- every GPU test, then swrgen tune over both
# stagings for the three plain specs at 8K, 32K and 2K. Candidates are compiled into the carried cache
# first (swrgen tune --compile-only with the same grids). Everything comes back in $OUT/res.tgz.
source bench/device/env.sh
export SWRGEN_TEST_CACHE_SEED=$PWD/.swrcache
mkdir -p /tmp/res
timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_swr.py tests/test_gpu_swr_backward.py \
  tests/test_gpu_swr_stream.py tests/test_gpu_launch_plans.py tests/test_gpu_tune.py tests/test_gpu_phalanx_fused.py \
  tests/test_gpu_staging.py tests/test_state.py tests/test_varlen.py tests/test_phalanx.py 2>&1 | tail -8 \
  | tee /tmp/res/tests.txt
G="warps_per_cta=1,2,4;tiles_per_warp=15;tiles_in_flight=4,8;cluster_size=1;persistent=false;staging=registers,shared;stages=2,3"
for spec in hopper_k2 hopper_k2_bf16out hopper_k3; do
  g="$G"; [ "$spec" = hopper_k3 ] && g="${G/stages=2,3/stages=2}" && g="${g/tiles_per_warp=15/tiles_per_warp=14}"
  timeout 80 python3 -m swrgen.cli tune specs/$spec.yaml --shape 4,64,8192 --shape 1,64,32768 --shape 8,64,2048 \
    --grid "$g" --json /tmp/res/tune_$spec.json 2>&1 | grep -v "^\[" | tee /tmp/res/tune_$spec.txt
done
mkdir -p /tmp/res/tuned && cp .swrcache/tuned/*.json /tmp/res/tuned/
tar czf "$OUT/res.tgz" -C /tmp res
