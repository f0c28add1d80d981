#!/usr/bin/env bash
# Device run (carry .swrcache .whl): GPU tests of the launch plans and the tuner, the host cost of the
# launch paths, tuning the fused kernels, and the tuned fused forward against the spec's own knobs.
source bench/device/env.sh
export SWRGEN_TEST_CACHE_SEED=$PWD/.swrcache
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_launch_plans.py tests/test_launch_plans.py \
  tests/test_gpu_tune.py tests/test_gpu_swr.py tests/test_gpu_swr_backward.py tests/test_gpu_phalanx_fused.py \
  tests/test_gpu_swr_stream.py tests/test_phalanx.py tests/test_op_cpu.py tests/test_phalanx_fused_cpu.py \
  2>&1 | tail -8 | tee "$OUT/tests.txt"
python3 bench/launch_overhead.py --repeats 7 --json "$OUT/launch.json" 2>&1 | tee "$OUT/launch.txt"
python3 -m swrgen.cli tune specs/hopper_k2_fused.yaml --shape 1,32768,64 --shape 2,8192,64 --shape 1,131072,128 \
  --grid "warps_per_cta=4;tiles_per_warp=32,64,128;tiles_in_flight=1,2;cluster_size=1;persistent=false" \
  --json "$OUT/tune_fused.json" 2>&1 | grep -v "^\[" | tee "$OUT/tune_fused.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/tuned_effect.txt"
# The fused forward through swrgen.phalanx_gating (inference) with the stored tuned knobs and without them.
import os, torch, swrgen
from bench.bench_swr import bench_ms
from swrgen.tune import store
for b, l, h in [(1, 32768, 64), (2, 8192, 64), (1, 131072, 128)]:
    P = torch.randn(b, l, h + 2 * h * 16 + h * 16, device="cuda").bfloat16()
    row = []
    for tuned in ("1", "0"):
        os.environ["SWRGEN_TUNED"] = tuned
        store.clear_memo()
        z = swrgen.phalanx_gating(P, heads=h)
        row.append((bench_ms(lambda: swrgen.phalanx_gating(P, heads=h)), z))
    same = torch.equal(row[0][1], row[1][1])
    print(f"B={b} L={l} H={h}: fwd tuned {row[0][0]:.4f} ms, spec's own knobs {row[1][0]:.4f} ms, identical={same}")
PY
mkdir -p "$OUT/tuned" && cp .swrcache/tuned/*.json "$OUT/tuned/" 2>/dev/null
