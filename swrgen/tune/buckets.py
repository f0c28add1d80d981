"""Shape buckets: which tuned entry serves a given input shape.

The kernels' speed depends on the shape only through two numbers: how many independent warp *rows*
there are (``rows = B * H * DH / 16``: one warp owns 16 channels of one head, so rows is the
parallelism across the GPU) and the sequence length ``L`` (how many tiles each row walks). Both are
bucketed to the largest power of two not above them, so bucket ``b`` holds ``[b, 2b)``:

    rows 256..511 -> 256,  L 8192..16383 -> 8192

A tuned config is stored per (rows bucket, L bucket). The batch and head counts matter only through
their product, so (B=4, H=64) and (B=1, H=256) share an entry, as they launch the same grid.

The fused Phalanx kernels (``fused_gating`` specs) also run one warp per head (head_dim 16): their
shape (B, L, H) is bucketed as (B, H, 16, L), i.e. rows = B * H.
"""

from __future__ import annotations

from swrgen import constants


def pow2_floor(n: int) -> int:
    """Largest power of two <= n (0 for n <= 0)."""
    return 1 << (int(n).bit_length() - 1) if n > 0 else 0


def rows_of(shape: tuple[int, int, int, int]) -> int:
    """Warp rows of an x of shape [B, H, DH, L]: one per 16 channels of each head."""
    batch, heads, head_dim, _ = shape
    return batch * heads * max(1, head_dim // constants.CHANNELS_PER_WARP)


def bucket_of(shape: tuple[int, int, int, int]) -> tuple[int, int]:
    """(rows bucket, L bucket) of x.shape = [B, H, DH, L]."""
    return pow2_floor(rows_of(shape)), pow2_floor(shape[3])


def bucket_name(bucket: tuple[int, int]) -> str:
    """The store's text form of a bucket, e.g. ``rows256/L8192``."""
    return f"rows{bucket[0]}/L{bucket[1]}"
