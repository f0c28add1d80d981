"""Distributed training of SWR / Phalanx models: context parallelism (a sequence split across ranks) and
the pieces a hybrid model needs around it (docs/context-parallel.md).

    y = swrgen.swr(a, x, cp_group=group)                    # this rank's slice of every sequence
    out = layer(x_slice, cp_group=swrgen.distributed.cp_context(group, x_slice.shape[1]))
"""

from swrgen.distributed.context_parallel import CPContext, HaloTimer, cp_context, phalanx_gating, swr
from swrgen.distributed.layout import ContextParallelError, SliceLayout

__all__ = ["CPContext", "ContextParallelError", "HaloTimer", "SliceLayout", "cp_context", "phalanx_gating", "swr"]
