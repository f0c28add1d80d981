"""Pre-build the cubins the GPU tests and benchmarks need into the disk cache.

NVRTC output depends only on source, options, NVRTC version and arch, so a cache
built on a CPU machine with the same NVRTC serves the GPU machine: carry the folder
(SWRGEN_CACHE_DIR) along and the device spends its time running, not compiling.

    SWRGEN_CACHE_DIR=.swrcache python bench/warm_cache.py --arch sm_90a
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swrgen.codegen import render_source
from swrgen.compiler import CompileCache


def _compile(args: tuple[str, str]) -> str:
    source, arch = args
    CompileCache().compile(source, arch)
    return arch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    from bench.specs import bench_specs
    from tests.gpu_util import all_gpu_test_specs

    sources = sorted({render_source(s) for s in all_gpu_test_specs() + bench_specs()})
    print(f"{len(sources)} distinct sources for {args.arch}")
    with ProcessPoolExecutor(args.jobs) as pool:
        for i, _ in enumerate(pool.map(_compile, [(s, args.arch) for s in sources]), 1):
            print(f"  {i}/{len(sources)}", flush=True)


if __name__ == "__main__":
    main()
