#!/usr/bin/env bash
# On the lent GPU: compute-sanitizer memcheck over the fused kernels' edge cases, racecheck over their
# shared-memory transposes, and the plain kernels' edge check once more.
source "$(dirname "$0")/env.sh"
timeout 200 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 20 python3 bench/edge_check_fused.py 2>&1 \
  | tee "$OUT/memcheck_fused.log" | tail -3
timeout 150 compute-sanitizer --tool racecheck --report-api-errors no --print-limit 20 python3 bench/edge_check_fused.py --quick 2>&1 \
  | tee "$OUT/racecheck_fused.log" | tail -3
timeout 60 python3 bench/edge_check.py 2>&1 | tail -2
