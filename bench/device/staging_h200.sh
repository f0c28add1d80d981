#!/usr/bin/env bash
# Device run (carry .swrcache .whl), with no card asked for: on an H200, the staging and tuning-invariance
# GPU tests, swrgen tune of the three plain specs over both stagings (stored under the H200's own key),
# and the suite; on an H100, a finer search of the 2K bucket (T=7, 11, 15; W up to 8). Results: res.tgz.
source bench/device/env.sh
export SWRGEN_TEST_CACHE_SEED=$PWD/.swrcache
mkdir -p /tmp/res
G="warps_per_cta=1,2,4;tiles_per_warp=15;tiles_in_flight=4,8;cluster_size=1;persistent=false;staging=registers,shared;stages=2,3"
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_staging.py \
    "tests/test_gpu_swr.py::test_forward_identical_across_tuning" \
    "tests/test_gpu_swr_backward.py::test_backward_identical_across_tuning_and_deterministic" 2>&1 | tail -4 \
    | tee /tmp/res/tests.txt
  for spec in hopper_k2 hopper_k2_bf16out hopper_k3; do
    g="$G"; [ "$spec" = hopper_k3 ] && g="${G/stages=2,3/stages=2}" && g="${g/tiles_per_warp=15/tiles_per_warp=14}"
    timeout 80 python3 -m swrgen.cli tune specs/$spec.yaml --shape 4,64,8192 --shape 1,64,32768 --shape 8,64,2048 \
      --grid "$g" --json /tmp/res/tune_$spec.json 2>&1 | grep -v "^\[" | tee /tmp/res/tune_$spec.txt
  done
  mkdir -p /tmp/res/tuned && cp .swrcache/tuned/*.json /tmp/res/tuned/
  timeout 170 python3 bench/suite.py --budget-s 100 --json /tmp/res/suite.json 2>&1 | tail -60 | tee /tmp/res/suite.txt
else
  G2="warps_per_cta=1,2,4,8;tiles_per_warp=7,11,15;tiles_in_flight=4,8;cluster_size=1;persistent=false;staging=shared;stages=2,3"
  for spec in hopper_k2 hopper_k2_bf16out; do
    timeout 100 python3 -m swrgen.cli tune specs/$spec.yaml --shape 8,64,2048 --grid "$G2" \
      --json /tmp/res/tune2k_$spec.json 2>&1 | grep -v "^\[" | tee /tmp/res/tune2k_$spec.txt
  done
  mkdir -p /tmp/res/tuned && cp .swrcache/tuned/*.json /tmp/res/tuned/
fi
tar czf "$OUT/res.tgz" -C /tmp res
