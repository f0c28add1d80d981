#!/usr/bin/env bash
# Device run (carry .swrcache .whl): the benchmark suite, generated kernels timed with the knobs the ops
# launch (tuned where stored), and the launch-path host cost.
source bench/device/env.sh
timeout 200 python3 bench/suite.py --budget-s 110 --json "$OUT/suite.json" 2>&1 | tail -48 | tee "$OUT/suite.txt"
timeout 60 python3 bench/launch_overhead.py --repeats 7 --json "$OUT/launch.json" 2>&1 | tail -14
