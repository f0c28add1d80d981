#!/usr/bin/env bash
# Device run (carry .swrcache .whl .baseline): shared staging with outputs stored through shared memory.
# 1. its GPU tests and the tuning-invariance tests; 2. A/B at W=1 T=15 F=8 (the forward's best knobs):
# registers, shared (outputs staged), shared without output staging, shared with 3 stages -- folders made
# by bench/variant.py; 3. swrgen tune over both stagings and 2-3 stages; 4. the suite with those configs.
# Candidates are compiled here first, into the carried cache (swrgen tune --compile-only, same grid).
source bench/device/env.sh
export SWRGEN_TEST_CACHE_SEED=$PWD/.swrcache
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_staging.py \
  "tests/test_gpu_swr.py::test_forward_identical_across_tuning" \
  "tests/test_gpu_swr_backward.py::test_backward_identical_across_tuning_and_deterministic" 2>&1 | tail -8 \
  | tee "$OUT/tests.txt"
for spec in hopper_k2 hopper_k2_bf16out; do
  timeout 90 python3 bench/ab.py .baseline/{reg,out,noout,out3}/$spec --rounds 3 2>&1 | tee "$OUT/ab_$spec.txt"
done
G="warps_per_cta=1,2,4;tiles_per_warp=15,31;tiles_in_flight=4,8;cluster_size=1;persistent=false;staging=registers,shared;stages=2,3"
for spec in hopper_k2 hopper_k2_bf16out; do
  timeout 110 python3 -m swrgen.cli tune specs/$spec.yaml --shape 4,64,8192 --shape 1,64,32768 --shape 8,64,2048 \
    --grid "$G" --json "$OUT/tune_$spec.json" 2>&1 | grep -v "^\[" | tee "$OUT/tune_$spec.txt"
done
mkdir -p "$OUT/tuned" && cp .swrcache/tuned/*.json "$OUT/tuned/" 2>/dev/null
timeout 170 python3 bench/suite.py --budget-s 110 --json "$OUT/suite.json" 2>&1 | tail -45 | tee "$OUT/suite.txt"
