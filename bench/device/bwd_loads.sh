#!/usr/bin/env bash
# Device run (carry .swrcache .whl .baseline): A/B of the backward's look-ahead load caching (RESULTS.md
# run 33). The folders are `swrgen build --no-compile -o .baseline/vN specs/hopper_k2.yaml` outputs whose
# swr.cu was edited by hand as below (v2 is now the templates' Reuse::kAgain, so v0 needs the edit undone).
# v0: as generated; v1: dy look-ahead with an L2::256B prefetch hint (L1 still allocates, for the
# re-read); v2: v1 + the gate loads hinted too; v3: dy look-ahead streamed (L1::no_allocate); v4: v2 + the
# 256-byte hint on the streamed x loads (L2_PREFETCH_BYTES = 256). The last call compared v0, v2 and v4.
source bench/device/env.sh
python3 bench/ab.py .baseline/v0/hopper_k2 .baseline/v2/hopper_k2 .baseline/v4/hopper_k2 \
  --shapes 8,64,2048 4,64,8192 1,64,32768 1,128,131072 --rounds 5 2>&1 | tee "$OUT/ab.txt"
