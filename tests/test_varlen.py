"""Packed variable-length batches (swrgen/ops/swr/varlen.py): the window restarts at every sequence start,
so the packed reference equals running every sequence alone, and differs from running the buffer as one
sequence; gradients; and the cu_seqlens checks."""

from __future__ import annotations

import pytest
import torch

from swrgen.ops.swr.reference import swr_reference
from swrgen.ops.swr.varlen import check_cu_seqlens, cu_seqlens_list, swr_varlen_reference

F64 = torch.float64
H, DH = 2, 4


def make(T: int, per_channel: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = 0.3 + 0.69 * torch.rand((1, H, DH, T) if per_channel else (1, H, T), generator=g, dtype=F64)
    x = torch.randn(1, H, DH, T, generator=g, dtype=F64)
    return a, x


def cu_of(lengths: list[int], dtype=torch.int32) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("k", "bl"), [(1, 16), (2, 16), (3, 16), (2, 32)])
@pytest.mark.parametrize("lengths", [[5, 16, 33, 1, 40], [70], [17, 0, 31, 16, 2]])
def test_varlen_equals_each_sequence_alone(lengths, k, bl, per_channel) -> None:
    T = sum(lengths)
    a, x = make(T, per_channel, seed=len(lengths) + k)
    cu = cu_of(lengths)
    y = swr_varlen_reference(a, x, cu, k, bl)
    assert y.shape == x.shape and y.dtype == F64
    start = 0
    for n in lengths:
        if n:
            alone = swr_reference(a[..., start : start + n], x[..., start : start + n], k, bl)
            torch.testing.assert_close(y[..., start : start + n], alone, rtol=0, atol=0)
        start += n


@pytest.mark.parametrize(("k", "bl"), [(2, 16), (3, 16)])
def test_varlen_is_not_the_buffer_as_one_sequence(k, bl) -> None:
    """Even with a = 0 at every start (history cut), the tiles must follow the sequence, not the buffer."""
    lengths = [21, 75, 50]  # not multiples of BL
    T = sum(lengths)
    a, x = make(T, False, seed=1)
    a = 0.9 + 0.1 * a  # slow decay, so a window that reaches too far (or not far enough) shows
    starts = cu_of(lengths)[:-1].long()
    a[..., starts] = 0.0
    packed = swr_varlen_reference(a, x, cu_of(lengths), k, bl)
    as_one = swr_reference(a, x, k, bl)
    torch.testing.assert_close(packed[..., :21], as_one[..., :21])  # the first sequence is aligned either way
    assert (packed - as_one).abs().max() > 1e-3


def test_varlen_with_tile_multiples_and_cut_history_equals_one_sequence() -> None:
    """Control: sequences of whole tiles with a = 0 at their starts are the same either way."""
    lengths = [32, 16, 48]
    a, x = make(sum(lengths), True, seed=2)
    starts = cu_of(lengths)[:-1].long()
    a[..., starts] = 0.0
    torch.testing.assert_close(
        swr_varlen_reference(a, x, cu_of(lengths), 2, 16), swr_reference(a, x, 2, 16), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("per_channel", [False, True])
def test_varlen_gradcheck(per_channel) -> None:
    lengths = [3, 5, 1, 6]
    a, x = make(sum(lengths), per_channel, seed=3)
    a.requires_grad_()
    x.requires_grad_()
    cu = cu_of(lengths, torch.int64)
    assert torch.autograd.gradcheck(lambda a, x: swr_varlen_reference(a, x, cu, 2, 4), (a, x))


def test_varlen_backward_equals_each_sequence_alone() -> None:
    lengths = [19, 30, 7]
    a, x = make(sum(lengths), False, seed=4)
    dy = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    a1, x1 = a.clone().requires_grad_(), x.clone().requires_grad_()
    da, dx = torch.autograd.grad((swr_varlen_reference(a1, x1, cu_of(lengths), 2, 16) * dy).sum(), (a1, x1))
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        a2, x2 = a[..., sl].clone().requires_grad_(), x[..., sl].clone().requires_grad_()
        ra, rx = torch.autograd.grad((swr_reference(a2, x2, 2, 16) * dy[..., sl]).sum(), (a2, x2))
        torch.testing.assert_close(da[..., sl], ra, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx[..., sl], rx, rtol=1e-12, atol=1e-12)
        start += n


# --- cu_seqlens checks ---------------------------------------------------------------------------------------


def test_check_cu_seqlens_accepts_valid() -> None:
    cu = check_cu_seqlens(torch.tensor([0, 3, 3, 10], dtype=torch.int32), 10)
    assert cu.dtype == torch.int64 and cu.tolist() == [0, 3, 3, 10]
    assert check_cu_seqlens([0, 4], 4).tolist() == [0, 4]
    assert cu_seqlens_list([0, 3, 3, 10], 10) == [(0, 3), (3, 10)]  # the empty sequence is skipped


@pytest.mark.parametrize(
    ("cu", "exc", "fragment"),
    [
        (torch.tensor([[0, 4]]), ValueError, "1-D"),
        (torch.tensor([4]), ValueError, "at least 2"),
        (torch.tensor([1, 4]), ValueError, "start at 0"),
        (torch.tensor([0, 3, 2, 4]), ValueError, "non-decreasing; entry 2 = 2 < entry 1 = 3"),
        (torch.tensor([0, 3]), ValueError, "end at the packed length T = 4; got 3"),
        (torch.tensor([0.0, 4.0]), TypeError, "integer"),
        (torch.tensor([False, True]), TypeError, "integer"),
        ("abc", TypeError, "cu_seqlens must be"),
    ],
)
def test_check_cu_seqlens_errors(cu, exc, fragment) -> None:
    with pytest.raises(exc, match=fragment):
        check_cu_seqlens(cu, 4)


def test_varlen_rejects_batched_x() -> None:
    a, x = make(8, False)
    with pytest.raises(ValueError, match=r"\[1, H, DH, T\]"):
        swr_varlen_reference(a.expand(2, -1, -1), x.expand(2, -1, -1, -1), [0, 8], 2, 4)
    with pytest.raises(ValueError, match="end at"):
        swr_varlen_reference(a, x, [0, 7], 2, 4)
