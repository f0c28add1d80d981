"""Shared helpers for the GPU tests: inputs, error metric, specs."""

from __future__ import annotations

import torch

from swrgen import constants
from swrgen.spec import SpecError, default_spec

GATE_KINDS = {
    "typical": (0.5, 1.0),
    "near0": (0.0, 0.05),
    "near1": (0.95, 1.0),
    "signed": (-1.0, 1.0),
}


# Tuning configs that must all give bitwise-identical results (the window never depends on them).
TUNING = [
    dict(warps_per_cta=1),
    dict(warps_per_cta=8),
    dict(warps_per_cta=32),
    dict(tiles_per_warp=1),
    dict(tiles_per_warp=3),
    dict(tiles_per_warp=1024),
    dict(tiles_in_flight=1),
    dict(tiles_in_flight=2),
    dict(tiles_in_flight=4),
    dict(cluster_size=2, archs=("sm_90a",)),
    dict(cluster_size=4, archs=("sm_90a",), warps_per_cta=2),
    dict(persistent=True),
    dict(persistent=True, tiles_per_warp=5, warps_per_cta=8),
    dict(staging="shared"),
    dict(staging="shared", tiles_in_flight=2, warps_per_cta=8, tiles_per_warp=5),
    dict(staging="shared", tiles_in_flight=2, warps_per_cta=1, min_warps_per_sm=16),
]

# Knobs around a shared-staging ring (tests/test_gpu_staging.py): one tile per stage, a chunk shorter than
# a stage, chunks ending mid-stage, many warps per CTA, persistent CTAs, clusters.
SHARED_KNOBS = [
    dict(),
    dict(warps_per_cta=1, tiles_per_warp=3),
    dict(tiles_in_flight=1, tiles_per_warp=5),
    dict(tiles_in_flight=2, warps_per_cta=8, persistent=True, tiles_per_warp=7),
    dict(tiles_in_flight=4, tiles_per_warp=1024),
    dict(tiles_in_flight=8, tiles_per_warp=15, warps_per_cta=2),
    dict(cluster_size=2, tiles_in_flight=4, tiles_per_warp=9),
    dict(tiles_in_flight=2, stages=3, min_warps_per_sm=16, warps_per_cta=1),
]


# Recurrence variants the forward tests cover (beyond the default k=2 bf16->fp32 spec).
FWD_VARIANTS = [
    dict(dtype="fp16"),
    dict(dtype="fp32"),
    dict(out="bf16"),
    dict(dtype="bf16", gate_dtype="fp32"),
    dict(per_channel=True),
    dict(dh=32),
    dict(dh=64, k=3),
    dict(bl=32),
    dict(bl=64, k=3),
    dict(k=5),
]
# Variants the backward tests cover.
BWD_VARIANTS = [dict(dtype="fp32"), dict(dtype="fp16"), dict(out="bf16"), dict(per_channel=True), dict(dh=32),
     dict(dh=64, k=3), dict(bl=32), dict(bl=64, k=2), dict(k=5), dict(per_channel=True, k=3, bl=32)]  # fmt: skip


def make_inputs(batch, heads, head_dim, length, *, dtype=torch.bfloat16, gate_dtype=None, per_channel=False,
                gates="typical", seed=0, device="cuda"):  # fmt: skip
    """Fresh random x ~ N(0,1) and gates ~ U(lo, hi): never zeros, so unwritten outputs can't hide."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, heads, head_dim, length, generator=g)
    shape = (batch, heads, head_dim, length) if per_channel else (batch, heads, length)
    lo, hi = GATE_KINDS[gates]
    a = lo + (hi - lo) * torch.rand(shape, generator=g)
    return a.to(device=device, dtype=gate_dtype or dtype), x.to(device=device, dtype=dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double().to(out.device)
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def spec_for(k=2, bl=16, dh=16, dtype="bf16", gate_dtype=None, out="fp32", per_channel=False, **target):
    spec = default_spec(head_dim=dh, block_len=bl, window_blocks=k, input_dtype=dtype, gate_dtype=gate_dtype or dtype,
                        output_dtype=out, gate_layout="per_channel" if per_channel else "per_head")  # fmt: skip
    return spec.replace_target(**target) if target else spec


def shared(spec, **knobs):
    """``spec`` with shared staging and ``knobs``; fewer warps per CTA where the ring would not fit."""
    for warps in (knobs.pop("warps_per_cta", spec.target.warps_per_cta), 2, 1):
        try:
            return spec.replace_target(staging="shared", warps_per_cta=warps, **knobs)
        except SpecError:
            continue
    raise AssertionError(f"no shared-staging config of {spec.name} fits")


def torch_dtype(name: str) -> torch.dtype:
    return constants.torch_dtype(name)


def fused_spec_for(k=2, bl=16, dtype="bf16", **target):
    """A spec with the fused Phalanx kernels (projections, gates and Z all in ``dtype``)."""
    spec = default_spec(head_dim=16, block_len=bl, window_blocks=k, input_dtype=dtype, gate_dtype=dtype,
                        output_dtype=dtype, fused_gating=True)  # fmt: skip
    return spec.replace_target(**target) if target else spec


def all_gpu_test_specs():
    """Every spec the GPU tests compile (bench/tools/warm_cache.py pre-builds their cubins)."""
    base = [spec_for(k=k) for k in (1, 2, 3)]
    specs = base + [spec_for(**kw) for kw in FWD_VARIANTS + BWD_VARIANTS]
    specs += [b.replace_target(**kw) for b in base for kw in TUNING]
    specs += [fused_spec_for(k=k) for k in (1, 2, 3)]
    specs += [fused_spec_for(k=2, bl=bl, dtype=dt) for bl in (16, 32, 64) for dt in ("fp16", "fp32")]
    specs += [fused_spec_for(k=3, **kw) for kw in TUNING]
    # the CTA loads' test (test_gpu_phalanx_fused.py)
    specs += [fused_spec_for(k=k, warps_per_cta=w, tiles_per_warp=3) for k in (2, 3) for w in (1, 2, 4, 8, 16)]
    # tests/test_gpu_staging.py
    specs += [shared(spec_for(**kw)) for kw in FWD_VARIANTS + BWD_VARIANTS]
    specs += [shared(b, **kw) for b in base for kw in SHARED_KNOBS]
    specs += [shared(b, tiles_per_warp=t) for b in base for t in (3, 5)]
    bf16 = [spec_for(k=k, out="bf16") for k in (1, 2, 3)]
    specs += bf16 + [shared(b, **kw) for b in bf16 for kw in (dict(), dict(warps_per_cta=1, min_warps_per_sm=24),
                                                              dict(tiles_in_flight=2, stages=3))]  # fmt: skip
    # tests/test_gpu_state.py
    specs += [spec_for(k=k, bl=bl, per_channel=pc) for k, bl in ((1, 16), (2, 16), (3, 16), (2, 32))
              for pc in (False, True)]  # fmt: skip
    specs += [spec_for(dtype="fp32", out=out, k=k) for k in (1, 2, 3) for out in ("fp32",)]
    return list({s.digest(): s for s in specs}.values())


def random_state(n, heads, head_dim, k, bl, positions, seed):
    """A valid random state: random carriers, and (w, g) = (0, 1) where a sequence sits on a tile edge."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, heads, head_dim, 2 + 2 * (k - 1), generator=g, dtype=torch.float64)
    data[..., 1] = 0.5 + 0.5 * data[..., 1].abs().clamp(max=1)  # gate products of moderate size
    data[..., 2 + (k - 1) :] = 0.3 + 0.6 * torch.rand(data[..., 2 + (k - 1) :].shape, generator=g, dtype=torch.float64)
    for i, p in enumerate(positions):
        if p % bl == 0:
            data[i, ..., 0], data[i, ..., 1] = 0.0, 1.0
    return data
