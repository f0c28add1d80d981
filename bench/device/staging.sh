#!/usr/bin/env bash
# Device run (carry .swrcache .whl): shared staging (target.staging: shared) -- its GPU tests, the tuning
# invariance tests that now include it, then `swrgen tune` over both stagings for the fp32- and
# bf16-output specs. Candidates are compiled here first, into the carried cache:
#   SWRGEN_CACHE_DIR=.swrcache swrgen tune SPEC --grid "$G" --compile-only --arch sm_90a
source bench/device/env.sh
export SWRGEN_TEST_CACHE_SEED=$PWD/.swrcache
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_staging.py \
  "tests/test_gpu_swr.py::test_forward_identical_across_tuning" \
  "tests/test_gpu_swr_backward.py::test_backward_identical_across_tuning_and_deterministic" 2>&1 | tail -15 \
  | tee "$OUT/tests.txt"
G="warps_per_cta=1,2,4;tiles_per_warp=15,31,63;tiles_in_flight=4,8;cluster_size=1;persistent=false;staging=registers,shared"
for spec in hopper_k2 hopper_k2_bf16out; do
  timeout 150 python3 -m swrgen.cli tune specs/$spec.yaml --shape 4,64,8192 --shape 1,64,32768 --shape 8,64,2048 \
    --grid "$G" --json "$OUT/tune_$spec.json" 2>&1 | grep -v "^\[" | tee "$OUT/tune_$spec.txt"
done
mkdir -p "$OUT/tuned" && cp .swrcache/tuned/*.json "$OUT/tuned/" 2>/dev/null
