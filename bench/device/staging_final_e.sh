#!/usr/bin/env bash
# Device run (carry .swrcache .whl .baseline): bf16 in and out, the forward writes y over x in its stage
# (no output buffer, 9.8 instead of 14.4 KB a warp). 1. the staging GPU tests; 2. A/B against the folders
# of the commit before (cur, cur_w2) and with min_warps_per_sm 24 (80 registers, no spills);
# 3. swrgen tune of hopper_k2_bf16out over those knobs, 4 buckets; 4. the suite. Results in $OUT/res.tgz.
source bench/device/env.sh
export SWRGEN_TEST_CACHE_SEED=$PWD/.swrcache
mkdir -p /tmp/res
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_staging.py 2>&1 | tail -4 | tee /tmp/res/tests.txt
timeout 100 python3 bench/ab.py .baseline/{cur,cur_w2,new,new_w2,new_m24,new_w2_m24}/hopper_k2_bf16out --rounds 3 \
  --shapes 4,64,8192 1,64,32768 8,64,2048 1,128,131072 2>&1 | tee /tmp/res/ab.txt
G="warps_per_cta=1,2,4;tiles_per_warp=7,15;tiles_in_flight=4,8;cluster_size=1;persistent=false;staging=shared;stages=2;min_warps_per_sm=0,24"
timeout 120 python3 -m swrgen.cli tune specs/hopper_k2_bf16out.yaml --shape 4,64,8192 --shape 1,64,32768 \
  --shape 8,64,2048 --shape 1,128,131072 --grid "$G" --json /tmp/res/tune_bf16out.json 2>&1 | grep -v "^\[" \
  | tee /tmp/res/tune_bf16out.txt
mkdir -p /tmp/res/tuned && cp .swrcache/tuned/*.json /tmp/res/tuned/
timeout 170 python3 bench/suite.py --budget-s 100 --json /tmp/res/suite.json 2>&1 | tail -60 | tee /tmp/res/suite.txt
tar czf "$OUT/res.tgz" -C /tmp res
