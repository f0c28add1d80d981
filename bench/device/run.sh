#!/usr/bin/env bash
# One call on the lent GPU: GPU tests, compute-sanitizer at the edge lengths, benchmark, sweep.
# Usage (device tool, carry .swrcache and .whl): bash bench/device/run.sh
source "$(dirname "$0")/env.sh"
python3 -c "import torch, cuda.bindings, triton; print('torch', torch.__version__, 'cuda-bindings', cuda.bindings.__version__, 'triton', triton.__version__)"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_swr.py tests/test_gpu_swr_backward.py tests/test_gpu_swr_stream.py --tb=short 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
timeout 150 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 20 python3 bench/edge_check.py 2>&1 | tee "$OUT/sanitizer.log" | tail -4
timeout 150 python3 bench/bench_swr.py --k 1 2 3 --out fp32 bf16 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
timeout 120 python3 bench/sweep.py --k 2 --shape 4,64,8192 --grid "tiles_in_flight=2,4,8;tiles_per_warp=64,128,256;warps_per_cta=4" 2>&1 | tee "$OUT/sweep.log"
