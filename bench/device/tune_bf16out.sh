#!/usr/bin/env bash
# Device run (carry .swrcache .whl): tune the bf16-output spec over the run-32 grid
# (chunks that fill whole load batches); the stored configs come back in $OUT/tuned.
# Candidates are compiled here first, into the carried cache: SWRGEN_CACHE_DIR=.swrcache swrgen tune SPEC
# --grid "$G" --compile-only --arch sm_90a (same SPEC and grid as below).
source bench/device/env.sh
G="warps_per_cta=1,2,4,8;tiles_per_warp=7,15,16,31,32,63;tiles_in_flight=4,8;cluster_size=1;persistent=false"
timeout 150 python3 -m swrgen.cli tune specs/hopper_k2_bf16out.yaml --shape 4,64,8192 --shape 1,64,32768 \
  --shape 8,64,2048 --grid "$G" --json "$OUT/tune_bf16out.json" 2>&1 | grep -v "^\[" | tee "$OUT/tune_bf16out.txt"
mkdir -p "$OUT/tuned" && cp .swrcache/tuned/*.json "$OUT/tuned/" 2>/dev/null
