#!/usr/bin/env bash
# Device run (carry .swrcache .whl): tune the k=3 spec like the k=2 one (run 32;
# T = 14/30 also fill whole batches with k=3's two-tile halo), then the suite's generated section for k=2
# and k=3 (fp32 out), each with the knobs the ops launch.
# Candidates are compiled here first, into the carried cache: SWRGEN_CACHE_DIR=.swrcache swrgen tune SPEC
# --grid "$G" --compile-only --arch sm_90a (same SPEC and grid as below).
source bench/device/env.sh
G="warps_per_cta=1,2,4,8;tiles_per_warp=7,14,15,16,30,31,32,63;tiles_in_flight=4,8;cluster_size=1;persistent=false"
timeout 150 python3 -m swrgen.cli tune specs/hopper_k3.yaml --shape 4,64,8192 --shape 1,64,32768 --shape 8,64,2048 \
  --grid "$G" --json "$OUT/tune_k3.json" 2>&1 | grep -v "^\[" | tee "$OUT/tune_k3.txt"
mkdir -p "$OUT/tuned" && cp .swrcache/tuned/*.json "$OUT/tuned/" 2>/dev/null
timeout 60 python3 bench/suite.py --skip alternatives,launch --k 2 3 --out fp32 --json "$OUT/suite_k.json" 2>&1 | tail -12
