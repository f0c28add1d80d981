#!/usr/bin/env bash
# Device run (carry .swrcache .whl): min_warps_per_sm. The staging and tuning-invariance GPU tests, then
# swrgen tune of the three plain specs at 8K/32K/2K and at (1,128,131072) over shared staging with
# F=2,4,8 and min_warps_per_sm 0 or 16 (F=2 at 16 warps fits 128 registers without spills). Results in
# $OUT/res.tgz. Candidates are compiled into the carried cache first (swrgen tune --compile-only).
source bench/device/env.sh
export SWRGEN_TEST_CACHE_SEED=$PWD/.swrcache
mkdir -p /tmp/res
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_staging.py \
  "tests/test_gpu_swr.py::test_forward_identical_across_tuning" \
  "tests/test_gpu_swr_backward.py::test_backward_identical_across_tuning_and_deterministic" 2>&1 | tail -4 \
  | tee /tmp/res/tests.txt
G="warps_per_cta=1,2,4;tiles_per_warp=15;tiles_in_flight=2,4,8;cluster_size=1;persistent=false;staging=shared;stages=2;min_warps_per_sm=0,16"
for spec in hopper_k2 hopper_k2_bf16out hopper_k3; do
  g="$G"; [ "$spec" = hopper_k3 ] && g="${G/tiles_per_warp=15/tiles_per_warp=14}"
  timeout 90 python3 -m swrgen.cli tune specs/$spec.yaml --shape 4,64,8192 --shape 1,64,32768 --shape 8,64,2048 \
    --shape 1,128,131072 --grid "$g" --json /tmp/res/tune_$spec.json 2>&1 | grep -v "^\[" | tee /tmp/res/tune_$spec.txt
done
mkdir -p /tmp/res/tuned && cp .swrcache/tuned/*.json /tmp/res/tuned/
tar czf "$OUT/res.tgz" -C /tmp res
