#!/usr/bin/env bash
# Device run (carry .swrcache .whl): swrgen tune of the new hopper_k3_bf16out spec (4 buckets, shared staging,
# batch-filling T=6/14 for k=3, min_warps_per_sm 0 or 24), then the suite. Results in $OUT/res.tgz.
source bench/device/env.sh
mkdir -p /tmp/res
G="warps_per_cta=1,2,4;tiles_per_warp=6,14;tiles_in_flight=4,8;cluster_size=1;persistent=false;staging=shared;stages=2;min_warps_per_sm=0,24"
timeout 120 python3 -m swrgen.cli tune specs/hopper_k3_bf16out.yaml --shape 4,64,8192 --shape 1,64,32768 \
  --shape 8,64,2048 --shape 1,128,131072 --grid "$G" --json /tmp/res/tune_k3_bf16out.json 2>&1 | grep -v "^\[" \
  | tee /tmp/res/tune_k3_bf16out.txt
mkdir -p /tmp/res/tuned && cp .swrcache/tuned/*.json /tmp/res/tuned/
timeout 170 python3 bench/suite.py --budget-s 100 --json /tmp/res/suite.json 2>&1 | tail -60 | tee /tmp/res/suite.txt
tar czf "$OUT/res.tgz" -C /tmp res
