"""Where the Phalanx layer's input projection keeps A, B, C and V: one [B, L, N] tensor, column blocks
``[A: H | B: KVH*DH | C: KVH*DH | V: H*DH]``. Head ``h`` reads kv-head ``h // (H // KVH)``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatingLayout:
    heads: int
    kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("heads", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if self.heads % self.kv_heads:
            divisors = [d for d in range(1, self.heads + 1) if self.heads % d == 0]
            raise ValueError(
                f"kv_heads={self.kv_heads} does not divide heads={self.heads}; allowed kv_heads: {divisors}"
            )

    @property
    def kv_group(self) -> int:
        """Heads per kv-head."""
        return self.heads // self.kv_heads

    @property
    def col_a(self) -> int:
        return 0

    @property
    def col_b(self) -> int:
        return self.heads

    @property
    def col_c(self) -> int:
        return self.heads + self.kv_heads * self.head_dim

    @property
    def col_v(self) -> int:
        return self.heads + 2 * self.kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """N: columns of the projection."""
        return self.heads + 2 * self.kv_heads * self.head_dim + self.heads * self.head_dim

    @property
    def split(self) -> tuple[int, int, int, int]:
        """Column counts of A, B, C, V (for ``torch.split``)."""
        kv = self.kv_heads * self.head_dim
        return (self.heads, kv, kv, self.heads * self.head_dim)

    @property
    def inner(self) -> int:
        """Columns of Z: H * DH."""
        return self.heads * self.head_dim
