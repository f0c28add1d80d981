"""Specs the benchmark times (kept here so bench/warm_cache.py can pre-build them)."""

from __future__ import annotations

from swrgen.spec import Spec, default_spec


def bench_specs() -> list[Spec]:
    specs = []
    for k in (1, 2, 3):
        for out in ("fp32", "bf16"):
            specs.append(default_spec(window_blocks=k, output_dtype=out))
    from bench.sweep import sweep_specs

    return specs + sweep_specs(2) + sweep_specs(3) + fused_sweep_specs()


def fused_sweep_specs() -> list[Spec]:
    """The fused Phalanx kernels' default (first) and the knobs swept around it."""
    base = default_spec(fused_gating=True, output_dtype="bf16")
    knobs = [dict(), dict(tiles_in_flight=1), dict(warps_per_cta=8), dict(tiles_per_warp=16),
             dict(tiles_per_warp=16, warps_per_cta=8), dict(tiles_per_warp=32), dict(persistent=True)]  # fmt: skip
    return [base.replace_target(**kw) if kw else base for kw in knobs]
