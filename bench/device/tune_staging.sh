#!/usr/bin/env bash
# Device run (carry .swrcache2 .whl; the machine still holds the .swrcache of the call before): the
# configs tuned by staging2.sh come back, then swrgen tune over both stagings for hopper_k3 (its own
# batch-filling T=14, 30) and, on a smaller grid, for the (1,128,131072) bucket of all three specs.
# .swrcache2 holds only the new candidates' cubins (swrgen tune --compile-only, same grids).
source bench/device/env.sh
cp -n .swrcache2/*.cubin .swrcache/ 2>/dev/null
mkdir -p /tmp/res/tuned_before && cp .swrcache/tuned/*.json /tmp/res/tuned_before/
G3="warps_per_cta=1,2,4;tiles_per_warp=14,30;tiles_in_flight=4,8;cluster_size=1;persistent=false;staging=registers,shared;stages=2,3"
timeout 120 python3 -m swrgen.cli tune specs/hopper_k3.yaml --shape 4,64,8192 --shape 1,64,32768 --shape 8,64,2048 \
  --grid "$G3" --json /tmp/res/tune_hopper_k3.json 2>&1 | grep -v "^\[" | tee /tmp/res/tune_hopper_k3.txt
G128="warps_per_cta=1,2,4;tiles_per_warp=15,63;tiles_in_flight=4,8;cluster_size=1;persistent=false;staging=registers,shared;stages=2"
for spec in hopper_k2 hopper_k2_bf16out hopper_k3; do
  timeout 100 python3 -m swrgen.cli tune specs/$spec.yaml --shape 1,128,131072 --grid "$G128" \
    --json /tmp/res/tune128_$spec.json 2>&1 | grep -v "^\[" | tee /tmp/res/tune128_$spec.txt
done
mkdir -p /tmp/res/tuned && cp .swrcache/tuned/*.json /tmp/res/tuned/
tar czf "$OUT/res.tgz" -C /tmp res
