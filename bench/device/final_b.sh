#!/usr/bin/env bash
# Final validation on the lent GPU, part B: the suite vs alternatives, the autotuner, the layer benchmark.
source "$(dirname "$0")/env.sh"
timeout 240 python3 bench/suite.py --budget-s 150 --json "$OUT/suite.json" > "$OUT/suite.log" 2>&1; tail -40 "$OUT/suite.log"
timeout 120 python3 -m swrgen.cli tune specs/hopper_k2.yaml --shape 4,64,8192 --grid "tiles_in_flight=2,4,8;persistent=false" \
  --json "$OUT/tune.json" > "$OUT/tune.log" 2>&1; tail -5 "$OUT/tune.log"; cp .swrcache/tuned/*.json "$OUT/" 2>/dev/null
timeout 150 python3 bench/layer_bench.py --dim 1024 --batch 2 --lengths 2048 8192 32768 --json "$OUT/layer.json" 2>&1 | tee "$OUT/layer.log"
