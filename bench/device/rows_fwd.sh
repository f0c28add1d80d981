#!/usr/bin/env bash
# Device run (carry .swrcache .whl .baseline): forward GPU tests of the token-lane forward, then A/B
# against the HEAD sources (.baseline/head_*) at several knob settings (.baseline/specs). RESULTS.md runs
# 30-31; the variant is not in the templates: `git apply bench/experiments/token_lane_forward.diff` first,
# after `swrgen build --no-compile -o .baseline/head_<spec> specs/<spec>.yaml` from the unpatched tree.
source bench/device/env.sh
export SWRGEN_TEST_CACHE_SEED=$PWD/.swrcache
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_swr.py tests/test_gpu_swr_stream.py \
  tests/test_gpu_launch_plans.py 2>&1 | tail -4 | tee "$OUT/tests.txt"
for o in "" _bf16out; do
  python3 bench/ab.py .baseline/head_hopper_k2$o/hopper_k2$o .baseline/specs/hopper_k2${o}_w*.yaml \
    --shapes 8,64,2048 4,64,8192 1,64,32768 1,128,131072 --rounds 3 2>&1 | tee -a "$OUT/ab.txt"
done
