"""Specs the benchmark times (kept here so bench/warm_cache.py can pre-build them)."""

from __future__ import annotations

from swrgen.spec import Spec, default_spec


def bench_specs() -> list[Spec]:
    specs = []
    for k in (1, 2, 3):
        for out in ("fp32", "bf16"):
            specs.append(default_spec(window_blocks=k, output_dtype=out))
    from bench.sweep import sweep_specs

    return specs + sweep_specs(2) + sweep_specs(3)
