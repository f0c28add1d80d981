#!/usr/bin/env bash
# Device run (carry .swrcache .whl .baseline): shared staging, three questions, folders by bench/variant.py.
# 1. forward: 16 tiles per stage (512-byte runs of bf16) against 8; 2. backward at F=4: dx stored through
# shared memory or straight; 3. ncu of the staged forward (F=8) and backward (F=4) at (4,64,8192).
source bench/device/env.sh
for spec in hopper_k2 hopper_k2_bf16out; do
  timeout 100 python3 bench/ab.py .baseline/{f8,f16,f16t31,b4,b4nodx,b4w2nodx}/$spec --rounds 3 2>&1 | tee "$OUT/ab_$spec.txt"
done
for cfg in "tiles_in_flight=8" "tiles_in_flight=4"; do
  timeout 120 ncu --clock-control none -k regex:swr_ --launch-skip 2 --launch-count 2 --section SpeedOfLight \
    --section WarpStateStats --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    python3 bench/profile_one.py --shape 4,64,8192 --tune "staging=shared,warps_per_cta=1,tiles_per_warp=15,$cfg" \
    > "$OUT/ncu_${cfg#tiles_in_flight=}.txt" 2>&1
  grep -E "swr_|Throughput|Issue Slots|Occupancy|Registers|Shared Memory Config|Stall|Warp Cycles|Block Limit" \
    "$OUT/ncu_${cfg#tiles_in_flight=}.txt" | head -60
done
