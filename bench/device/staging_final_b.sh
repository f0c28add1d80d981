#!/usr/bin/env bash
# Device run (carry .swrcache .whl): the tuner's GPU tests; swrgen tune of the (1,128,131072) bucket for the
# three plain specs over both stagings; then the suite (alternatives, launch cost) with the shipped configs
# of staging_final_a.sh plus those. Everything comes back in $OUT/res.tgz.
source bench/device/env.sh
export SWRGEN_TEST_CACHE_SEED=$PWD/.swrcache
mkdir -p /tmp/res
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_tune.py 2>&1 | tail -4 | tee /tmp/res/tests_tune.txt
G="warps_per_cta=1,2,4;tiles_per_warp=15,63;tiles_in_flight=4,8;cluster_size=1;persistent=false;staging=registers,shared;stages=2"
for spec in hopper_k2 hopper_k2_bf16out hopper_k3; do
  g="$G"; [ "$spec" = hopper_k3 ] && g="${G/tiles_per_warp=15,63/tiles_per_warp=14,62}"
  timeout 60 python3 -m swrgen.cli tune specs/$spec.yaml --shape 1,128,131072 --grid "$g" \
    --json /tmp/res/tune128_$spec.json 2>&1 | grep -v "^\[" | tee /tmp/res/tune128_$spec.txt
done
mkdir -p /tmp/res/tuned && cp .swrcache/tuned/*.json /tmp/res/tuned/
timeout 200 python3 bench/suite.py --budget-s 110 --json /tmp/res/suite.json 2>&1 | tail -60 | tee /tmp/res/suite.txt
tar czf "$OUT/res.tgz" -C /tmp res
