#!/usr/bin/env bash
# Device run (carry .swrcache .whl; candidates pre-compiled into .swrcache): tune the plain kernels of the
# default spec and of its bf16-output sibling at the benchmark shapes; the stored configs come back in $OUT/tuned.
source bench/device/env.sh
G="warps_per_cta=2,4;tiles_per_warp=32,64,128;tiles_in_flight=4,8;cluster_size=1;persistent=false,true"
python3 -m swrgen.cli tune specs/hopper_k2.yaml --shape 8,64,2048 --shape 4,64,8192 --shape 1,64,32768 \
  --shape 1,128,131072 --grid "$G" --json "$OUT/tune_k2.json" 2>&1 | grep -v "^\[" | tee "$OUT/tune_k2.txt"
python3 -m swrgen.cli tune specs/hopper_k2_bf16out.yaml --shape 8,64,2048 --shape 4,64,8192 --shape 1,64,32768 \
  --grid "$G" --json "$OUT/tune_bf16out.json" 2>&1 | grep -v "^\[" | tee "$OUT/tune_bf16out.txt"
mkdir -p "$OUT/tuned" && cp .swrcache/tuned/*.json "$OUT/tuned/" 2>/dev/null
