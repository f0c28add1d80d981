"""``swrgen.swr`` / ``swrgen.load`` on CPU tensors: the custom ops' CPU path (float64 reference), autograd,
torch.compile, opcheck and the input checks. No GPU needed (CUDA-only checks skip without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO, SPECS_DIR

import swrgen
from swrgen.ops.swr.reference import swr_reference
from swrgen.ops.swr.state import SwrState
from swrgen.spec import load_spec


def make(B=2, H=3, DH=16, L=45, dtype=torch.float32, per_channel=False, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    a_shape = (B, H, DH, L) if per_channel else (B, H, L)
    a = (0.3 + 0.69 * torch.rand(a_shape, generator=g, dtype=torch.float64)).to(dtype)
    x = torch.randn(B, H, DH, L, generator=g, dtype=torch.float64).to(dtype)
    return a.requires_grad_(requires_grad), x.requires_grad_(requires_grad)


def ref(a, x, k=2, bl=16):
    return swr_reference(a.detach(), x.detach(), window_blocks=k, block_len=bl)


def ref_grads(a, x, dy, k=2, bl=16):
    a64 = a.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    dx, da = torch.autograd.grad(swr_reference(a64, x64, k, bl), (x64, a64), dy.double())
    return dx, da


# --- forward matches the reference ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "out", "tol"),
    [
        (torch.float32, torch.float32, 1e-6),
        (torch.float64, torch.float64, 1e-12),
        (torch.bfloat16, torch.float32, 1e-6),
    ],
)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("k", "bl"), [(1, 16), (2, 16), (3, 16), (2, 32), (4, 8)])
def test_forward_matches_reference(dtype, out, tol, per_channel, k, bl) -> None:
    a, x = make(dtype=dtype, per_channel=per_channel, L=77)
    y = swrgen.swr(a, x, window_blocks=k, block_len=bl)
    assert y.dtype == out and y.shape == x.shape and y.device.type == "cpu"
    assert y.is_contiguous()
    expected = ref(a, x, k, bl)  # the inputs as given (bf16 values) in float64
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


def test_default_window_is_k2_bl16() -> None:
    a, x = make(L=70)
    torch.testing.assert_close(swrgen.swr(a, x).double(), ref(a, x, 2, 16), rtol=1e-6, atol=1e-6)
    # and not another window: k=1 and k=3 give different results on 70 tokens
    assert not torch.allclose(swrgen.swr(a, x).double(), ref(a, x, 3, 16))
    assert not torch.allclose(swrgen.swr(a, x).double(), ref(a, x, 1, 16))


def test_out_dtype() -> None:
    a, x = make(dtype=torch.bfloat16)
    y = swrgen.swr(a, x, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref(a, x).to(torch.bfloat16))
    a32, x32 = make(dtype=torch.float32)
    assert swrgen.swr(a32, x32, out_dtype=torch.float16).dtype == torch.float16
    assert swrgen.swr(a32, x32, out_dtype=torch.float64).dtype == torch.float64


def test_length_one_and_empty_batch() -> None:
    a, x = make(L=1)
    torch.testing.assert_close(swrgen.swr(a, x), x)  # one token: y_0 = u_0
    a0, x0 = make(B=0)
    assert swrgen.swr(a0, x0).shape == x0.shape


def test_meta_tensors_give_shape_and_dtype() -> None:
    a, x = make(dtype=torch.bfloat16)
    y = swrgen.swr(a.to("meta"), x.to("meta"))
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == torch.float32


# --- spec= ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "how",
    ["str", "path", "spec", "generated_folder"],
)
def test_spec_argument(how: str) -> None:
    path = SPECS_DIR / "hopper_k3.yaml"
    spec_arg = {
        "str": str(path),
        "path": path,
        "spec": load_spec(path),
        "generated_folder": REPO / "generated" / "hopper_k3",
    }[how]
    a, x = make(dtype=torch.bfloat16, L=100)
    y = swrgen.swr(a, x, spec=spec_arg)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref(a, x, 3, 16), rtol=1e-6, atol=1e-6)
    # The keyword arguments may repeat what the spec says.
    torch.testing.assert_close(swrgen.swr(a, x, spec=spec_arg, window_blocks=3, block_len=16), y)


def test_spec_with_bf16_output() -> None:
    a, x = make(dtype=torch.bfloat16)
    y = swrgen.swr(a, x, spec=SPECS_DIR / "hopper_k2_bf16out.yaml")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref(a, x).to(torch.bfloat16))
    y2 = swrgen.swr(a, x, spec=SPECS_DIR / "hopper_k2_bf16out.yaml", out_dtype=torch.bfloat16)
    torch.testing.assert_close(y2, y)


def test_load_returns_one_op_per_spec() -> None:
    path = SPECS_DIR / "hopper_k3.yaml"
    op = swrgen.load(path)  # every op of one spec shares its runtime object (compiled kernels, plans)
    assert op.kernels is swrgen.load(str(path)).kernels and op.kernels is swrgen.load(load_spec(path)).kernels
    assert op.kernels is not swrgen.load(SPECS_DIR / "hopper_k2.yaml").kernels
    assert op.spec.recurrence.window_blocks == 3
    assert "hopper_k3" in repr(op) and "window_blocks=3" in repr(op)
    a, x = make(dtype=torch.bfloat16)
    torch.testing.assert_close(op(a, x).double(), ref(a, x, 3, 16), rtol=1e-6, atol=1e-6)


def test_load_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no spec file or generated folder"):
        swrgen.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"window_blocks": 2}, "window_blocks=2 disagrees with spec 'hopper_k3' (window_blocks=3)"),
        ({"block_len": 32}, "block_len=32 disagrees with spec 'hopper_k3' (block_len=16)"),
        ({"out_dtype": torch.bfloat16}, "out_dtype=torch.bfloat16 disagrees with spec 'hopper_k3' (output fp32)"),
    ],
)
def test_keywords_disagreeing_with_spec(kwargs, fragment) -> None:
    a, x = make(dtype=torch.bfloat16)
    with pytest.raises(ValueError) as info:
        swrgen.swr(a, x, spec=SPECS_DIR / "hopper_k3.yaml", **kwargs)
    assert fragment in str(info.value)


# --- input checks ---------------------------------------------------------------------------------------


def test_rejects_x_not_4d() -> None:
    a, x = make()
    with pytest.raises(ValueError, match=r"x must be \[B, H, DH, L\] \(4 dims\); got shape \[3, 16, 45\]"):
        swrgen.swr(a[0], x[0])
    with pytest.raises(ValueError, match="4 dims"):
        swrgen.swr(a, x.unsqueeze(0))


@pytest.mark.parametrize(
    "a_shape",
    [(2, 3, 44), (2, 3, 46), (3, 2, 45), (2, 3, 8, 45), (2, 3, 16, 44), (2, 45), (2, 3, 1, 45)],
)
def test_rejects_wrong_gate_shape(a_shape) -> None:
    _, x = make()
    with pytest.raises(ValueError, match=r"a must be \[B, H, L\] = \[2, 3, 45\].*\[B, H, DH, L\] = \[2, 3, 16, 45\]"):
        swrgen.swr(torch.rand(a_shape), x)


def test_rejects_device_mismatch() -> None:
    a, x = make()
    with pytest.raises(ValueError, match="one device; got a on meta, x on cpu"):
        swrgen.swr(a.to("meta"), x)
    with pytest.raises(ValueError, match="one device; got a on cpu, x on meta"):
        swrgen.swr(a, x.to("meta"))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_rejects_non_float_dtypes(dtype) -> None:
    a, x = make()
    with pytest.raises(TypeError, match=f"x must be a floating-point tensor; got {dtype}"):
        swrgen.swr(a, x.to(dtype))
    with pytest.raises(TypeError, match=f"a must be a floating-point tensor; got {dtype}"):
        swrgen.swr(a.to(dtype), x)


def test_rejects_non_tensors() -> None:
    a, x = make()
    with pytest.raises(TypeError, match="takes tensors"):
        swrgen.swr(a.tolist(), x)


def test_rejects_non_unit_stride_along_length() -> None:
    a, x = make(L=90)
    with pytest.raises(ValueError, match="x must have unit stride along L"):
        swrgen.swr(a[..., ::2], x[..., ::2])
    with pytest.raises(ValueError, match="a must have unit stride along L"):
        swrgen.swr(a[..., ::2], x[..., ::2].contiguous())
    # [B, H, L, DH] memory viewed as [B, H, DH, L]: right shape, L stride is DH.
    x_t = torch.randn(2, 3, 90, 16).transpose(-1, -2)
    assert x_t.shape == x.shape
    with pytest.raises(ValueError, match=r"unit stride along L.*\.contiguous\(\)"):
        swrgen.swr(a, x_t)
    torch.testing.assert_close(swrgen.swr(a, x_t.contiguous()).double(), ref(a, x_t))


def test_accepts_strided_batch_and_head_dims() -> None:
    # Only the L stride must be 1: slices along B, H and DH are fine.
    a, x = make(B=4, H=3, DH=32, L=40)
    a_s, x_s = a[::2, 1:], x[::2, 1:, :16]
    assert not x_s.is_contiguous() and x_s.stride(-1) == 1
    torch.testing.assert_close(swrgen.swr(a_s, x_s).double(), ref(a_s, x_s), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("k", "bl"), [(0, 16), (2, 0), (-1, 16)])
def test_rejects_bad_window(k, bl) -> None:
    a, x = make()
    with pytest.raises(ValueError, match=">= 1"):
        swrgen.swr(a, x, window_blocks=k, block_len=bl)


# --- autograd -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "bl"), [(2, 16), (3, 16), (3, 4), (1, 4)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_gradcheck(k: int, bl: int, per_channel: bool) -> None:
    a, x = make(B=1, H=1, DH=16, L=20, dtype=torch.float64, per_channel=per_channel, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a_, x_: swrgen.swr(a_, x_, window_blocks=k, block_len=bl), (a, x), eps=1e-6, atol=1e-8
    )


def test_gradcheck_mixed_sign_and_zero_gates() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.empty(1, 2, 19, dtype=torch.float64).uniform_(-1.4, 1.4, generator=g)
    a[0, 0, 7] = 0.0
    x = torch.randn(1, 2, 16, 19, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(
        lambda a_, x_: swrgen.swr(a_, x_, window_blocks=2, block_len=4),
        (a.requires_grad_(), x.requires_grad_()),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_backward_matches_reference_autograd(dtype, per_channel) -> None:
    a, x = make(dtype=dtype, per_channel=per_channel, L=50, requires_grad=True)
    y = swrgen.swr(a, x, window_blocks=3)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(dy)
    assert a.grad.dtype == dtype and x.grad.dtype == dtype
    assert a.grad.shape == a.shape and x.grad.shape == x.shape
    dx, da = ref_grads(a, x, dy, k=3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x.grad.double(), dx, rtol=tol, atol=tol)
    torch.testing.assert_close(a.grad.double(), da, rtol=tol, atol=tol * da.abs().max().item())


def test_backward_with_expanded_upstream_gradient() -> None:
    # y.sum() sends an expanded (stride 0) gradient of ones.
    a, x = make(L=33, requires_grad=True)
    swrgen.swr(a, x).sum().backward()
    dx, da = ref_grads(a, x, torch.ones(x.shape))
    torch.testing.assert_close(x.grad.double(), dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad.double(), da, rtol=1e-5, atol=1e-4)


def test_backward_only_saves_what_it_needs() -> None:
    # Gradient flows to x alone when a needs none, and the reverse.
    a, x = make(L=20)
    x.requires_grad_()
    swrgen.swr(a, x).sum().backward()
    assert x.grad is not None and a.grad is None
    a2, x2 = make(L=20)
    a2.requires_grad_()
    swrgen.swr(a2, x2).sum().backward()
    assert a2.grad is not None and x2.grad is None


# --- torch.compile and opcheck --------------------------------------------------------------------------


def test_torch_compile_fullgraph_matches_eager() -> None:
    # backend="aot_eager": AOTAutograd traces forward and backward through the ops' fake implementations and
    # autograd registration (what fullgraph needs) without inductor's C++ build (~20 s on 2 cores).
    torch._dynamo.reset()

    def f(a, x):
        y = swrgen.swr(a, x, window_blocks=3, block_len=16)
        return (y * y).sum() + y.mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for L in (40, 64):
        a, x = make(L=L, requires_grad=True)
        a_e, x_e = (t.detach().clone().requires_grad_() for t in (a, x))
        out = compiled(a, x)
        out.backward()
        out_e = f(a_e, x_e)
        out_e.backward()
        torch.testing.assert_close(out, out_e)
        torch.testing.assert_close(a.grad, a_e.grad)
        torch.testing.assert_close(x.grad, x_e.grad)


def test_torch_compile_with_spec() -> None:
    torch._dynamo.reset()
    op = swrgen.load(SPECS_DIR / "hopper_k3.yaml")
    compiled = torch.compile(lambda a, x: op(a, x), fullgraph=True, backend="aot_eager")
    a, x = make(dtype=torch.bfloat16)
    torch.testing.assert_close(compiled(a, x), op(a, x))


@pytest.mark.parametrize(
    ("dtype", "per_channel", "L", "out"),
    [
        (torch.float32, False, 45, torch.float32),
        (torch.float64, False, 45, torch.float64),  # L not a multiple of block_len
        (torch.float64, True, 32, torch.float64),
        (torch.bfloat16, False, 40, torch.float32),
    ],
)
def test_opcheck_swr_fwd(dtype, per_channel, L, out) -> None:
    a, x = make(B=1, H=2, L=L, dtype=dtype, per_channel=per_channel, requires_grad=True)
    result = torch.library.opcheck(torch.ops.swrgen.swr_fwd.default, (a, x, None, None, None, 2, 16, "", out, False))
    assert set(result.values()) == {"SUCCESS"}, result
    # with a state to continue from (positions 5) and the new state asked for
    state = SwrState.zeros(1, 2, 16, 2, dtype=torch.float64)
    data = state.data.clone().requires_grad_()
    pos = torch.full((1,), 16, dtype=torch.int64)
    args = (a, x, data, pos, None, 2, 16, "", out, True)
    result = torch.library.opcheck(torch.ops.swrgen.swr_fwd.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_swr_bwd_with_permuted_gates() -> None:
    # a dense but not contiguous (heads-major memory): fake and real outputs must agree on strides.
    g = torch.Generator().manual_seed(3)
    a = torch.rand(3, 2, 40, dtype=torch.float64, generator=g).transpose(0, 1)
    x = torch.randn(2, 3, 16, 40, dtype=torch.float64, generator=g)
    dy = torch.randn(2, 3, 16, 40, dtype=torch.float64, generator=g)
    result = torch.library.opcheck(torch.ops.swrgen.swr_bwd.default, (a, x, dy, None, None, None, None, 2, 16, "",
                                                                      False))  # fmt: skip
    assert set(result.values()) == {"SUCCESS"}, result


def test_default_key_is_a_compile_time_constant() -> None:
    """Under torch.compile the CUDA path resolves its kernel set through default_key; dynamo must not trace into
    it (fullgraph), and the mark it relies on is what torch.compiler.assume_constant_result sets."""
    from swrgen.ops.swr.op import default_key

    probe = torch.compiler.assume_constant_result(lambda: 0)
    assert {k for k in vars(probe) if k.startswith("_dynamo")} == {"_dynamo_marked_constant"}
    assert default_key._dynamo_marked_constant is True

    def f(t: torch.Tensor) -> torch.Tensor:
        key = default_key(16, False, torch.bfloat16, torch.bfloat16, 2, 16, torch.float32)
        return t + len(key)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 33.0))


# --- non-finite gates ----------------------------------------------------------------------------------------


def _paths(a, x, k, splits=(1, 19, 20, 33)):
    """y by the one-shot op, by chunks with the state handed over at each split, and by decode steps."""
    from swrgen.ops.swr.state import decode_step

    out = {"one-shot": swrgen.swr(a, x, window_blocks=k)}
    for split in splits:
        y1, s = swrgen.swr(a[..., :split], x[..., :split], window_blocks=k, return_state=True)
        out[f"chunks@{split}"] = torch.cat([y1, swrgen.swr(a[..., split:], x[..., split:], window_blocks=k,
                                                            initial_state=s)], -1)  # fmt: skip
    st, ys = SwrState.zeros(*x.shape[:3], k, dtype=x.dtype), []
    for t in range(x.shape[-1]):
        y_t, st = decode_step(a[..., t], x[..., t], st, k, 16)
        ys.append(y_t)
    out["decode"] = torch.stack(ys, -1)
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("pos", [0, 5, 16, 17, 20, 31, 32])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_gates_agree_across_paths(k, pos, value) -> None:
    """One arithmetic everywhere (tile scans and carriers): the same NaN and inf outputs on every path, and
    exactly the span docs/semantics.md states: from the gate's token to the end of tile i + k - 1."""
    g = torch.Generator().manual_seed(pos)
    a = 0.3 + 0.6 * torch.rand(1, 2, 70, dtype=torch.float64, generator=g)
    x = torch.randn(1, 2, 16, 70, dtype=torch.float64, generator=g)
    a[..., pos] = value
    outs = _paths(a, x, k)
    y = outs["one-shot"]
    for name, o in outs.items():
        assert torch.equal(torch.isnan(o), torch.isnan(y)), name
        assert torch.equal(torch.isinf(o), torch.isinf(y)), name
        assert torch.equal(o[torch.isfinite(o)], y[torch.isfinite(y)]), name
    tile = pos // 16
    end = min(70, (tile + k) * 16)
    assert torch.isfinite(y[..., :pos]).all() and torch.isfinite(y[..., end:]).all()
    assert not torch.isfinite(y[..., pos:end]).all()
