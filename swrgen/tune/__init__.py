"""Autotuner: search the target knobs a spec leaves open, per arch and shape bucket, on the GPU.

    from swrgen.tune import tune, lookup
    tune(spec, [(4, 64, 8192)], device="cuda")          # checks, times, saves the winners
    lookup(spec, "sm_90a", x.shape)                     # -> {"warps_per_cta": 4, ...} or None

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
