"""Pre-build the cubins that the GPU tests and the benchmarks compile into the disk cache (no GPU needed).

NVRTC output depends only on source, options, NVRTC version and arch, so a cache built on a CPU machine with
the same NVRTC serves the GPU machine: point ``SWRGEN_CACHE_DIR`` at the same folder there, and the GPU run
spends its time running, not compiling.

    SWRGEN_CACHE_DIR=.swrcache python bench/tools/warm_cache.py --arch sm_90a
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def bench_specs() -> list:
    """Every spec the benchmarks build: the default spec for k = 1..3 and both output dtypes, the
    ``bench/ops/swr.py --sweep`` grid for k = 2 and 3, and the fused kernels' sweep."""
    from bench.ops.phalanx_gating import fused_sweep_specs
    from bench.ops.swr import sweep_specs
    from swrgen.spec import default_spec

    specs = [default_spec(window_blocks=k, output_dtype=out) for k in (1, 2, 3) for out in ("fp32", "bf16")]
    return specs + sweep_specs(2) + sweep_specs(3) + fused_sweep_specs()


def _compile(args: tuple[str, str]) -> str:
    from swrgen.compiler import CompileCache

    source, arch = args
    CompileCache().compile(source, arch)
    return arch


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/tools/warm_cache.py", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90a", help="the GPU's arch (sm_90a: H100, H200)")
    ap.add_argument("--jobs", type=int, default=2, help="compiler processes")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from swrgen.codegen import render_source
    from tests.gpu_util import all_gpu_test_specs

    sources = sorted({render_source(s) for s in all_gpu_test_specs() + bench_specs()})
    print(f"{len(sources)} distinct sources for {args.arch}")
    with ProcessPoolExecutor(args.jobs) as pool:
        for i, _ in enumerate(pool.map(_compile, [(s, args.arch) for s in sources]), 1):
            print(f"  {i}/{len(sources)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
