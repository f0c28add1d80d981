"""Autotuner: search the target knobs a spec leaves open, per arch and shape bucket, on the GPU.

    from swrgen.tune import tune, lookup
    tune(spec, [(4, 64, 8192)], device="cuda")          # checks, times, saves the winners
    lookup(spec, "sm_90a", x.shape)                     # -> {"warps_per_cta": 4, ...} or None
    lookup(spec, "sm_90a", x.shape, "fwd")              # the forward's own knobs where stored, else the same

    tune(fused_spec, [(4, 8192, 64)])                   # fused_gating spec: shapes are B,L,H, and the
    lookup(fused_spec, "sm_90a", (4, 64, 16, 8192))     # fused Phalanx kernels are tuned (B, H, 16, L)

Which kernels a spec's tuning covers is its *kernel family* (``search.family_for``): the plain SWR
kernels (``swr``; shapes B,H,L or B,H,DH,L) or, with ``recurrence.fused_gating: true``, the fused
Phalanx kernels (``phalanx``; shapes B,L,H with the spec's head_dim 16 and kv_heads = heads).

Modules: ``space`` (candidates), ``buckets`` (shape -> bucket), ``store`` (JSON files, memoized
lookups), ``search`` (the tuning loop). ``lookup`` imports nothing heavy, so the launch path can use it.
"""

from swrgen.tune.buckets import bucket_of
from swrgen.tune.space import DEFAULT_GRID, candidates, parse_grid
from swrgen.tune.store import lookup

__all__ = ["DEFAULT_GRID", "bucket_of", "candidates", "lookup", "parse_grid", "tune"]


def tune(*args, **kwargs):  # lazy: search imports torch-heavy pieces only when tuning
    from swrgen.tune.search import tune as _tune

    return _tune(*args, **kwargs)


tune.__doc__ = "See :func:`swrgen.tune.search.tune`."
