"""GPU tests of the generated SWR kernels against the float64 reference (skip without CUDA)."""

from __future__ import annotations

import pytest
import torch

import swrgen
from swrgen.ops.swr import launch
from swrgen.ops.swr.reference import swr_reference
from tests.gpu_util import FWD_VARIANTS, TUNING, make_inputs, rel_err, spec_for

pytestmark = pytest.mark.gpu

POISON = float("nan")
EDGE_LENGTHS = [1, 15, 16, 17, 1000, 8192, 8193, 32768, 131072]


def _forward(spec, a, x):
    op = swrgen.load(spec)
    return launch.forward(op.kernels, a, x, poison=POISON)[0]


def _reference(spec, a, x):
    r = spec.recurrence
    return swr_reference(a.double(), x.double(), r.window_blocks, r.block_len)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("length", EDGE_LENGTHS)
def test_forward_matches_reference(k, length):
    bh = (1, 2) if length >= 32768 else (3, 5)
    spec = spec_for(k=k)
    a, x = make_inputs(*bh, 16, length, seed=length + k)
    y = _forward(spec, a, x)
    assert rel_err(y, _reference(spec, a, x)) <= 2e-3


@pytest.mark.parametrize("kw", FWD_VARIANTS, ids=str)
@pytest.mark.parametrize("length", [17, 4096, 4100])
def test_forward_variants(kw, length):
    spec = spec_for(**kw)
    r = spec.recurrence
    a, x = make_inputs(2, 3, r.head_dim, length, dtype=torch.bfloat16 if r.input_dtype == "bf16" else
                       {"fp16": torch.float16, "fp32": torch.float32}[r.input_dtype],
                       gate_dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[r.gate_dtype],
                       per_channel=r.gate_layout == "per_channel", seed=length)  # fmt: skip
    y = _forward(spec, a, x)
    tol = 2e-3 if r.output_dtype == "fp32" else 8e-3  # bf16 output rounding
    assert rel_err(y, _reference(spec, a, x)) <= tol


@pytest.mark.parametrize("gates", ["near0", "near1", "signed"])
def test_forward_gate_ranges(gates):
    spec = spec_for(k=2)
    a, x = make_inputs(2, 4, 16, 3000, gates=gates, seed=7)
    assert rel_err(_forward(spec, a, x), _reference(spec, a, x)) <= 2e-3


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("length", [8193, 40000])
def test_forward_identical_across_tuning(k, length):
    """The jagged window never depends on tuning knobs: outputs are bitwise identical."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cluster configs need sm_90")
    base = spec_for(k=k)
    a, x = make_inputs(2, 3, 16, length, seed=11 * k)
    y0 = _forward(base, a, x)
    assert rel_err(y0, _reference(base, a, x)) <= 2e-3
    for kw in TUNING:
        y = _forward(base.replace_target(**kw), a, x)
        assert torch.equal(y, y0), f"output changed with tuning {kw}"


def test_vector_and_scalar_paths_agree():
    spec = spec_for(k=2)
    a, x = make_inputs(2, 3, 16, 4096, seed=3)
    program = swrgen.load(spec).kernels
    assert launch.forward_plan(program, a, x).kernel.name == "swr_fwd_vec"
    y_vec = _forward(spec, a, x)
    # Same values in row-strided storage that breaks 16-byte alignment -> scalar kernel.
    xs = torch.empty(2, 3, 16, 4096 + 1, dtype=x.dtype, device=x.device)[..., 1:]
    xs.copy_(x)
    assert launch.forward_plan(program, a, xs).kernel.name == "swr_fwd_scalar"
    assert torch.equal(_forward(spec, a, xs), y_vec)


def test_public_api_and_spec_files():
    a, x = make_inputs(2, 2, 16, 777, seed=5)
    y = swrgen.swr(a, x, window_blocks=2, block_len=16)
    assert y.dtype == torch.float32
    y2 = swrgen.load("specs/hopper_k2.yaml")(a, x)
    assert torch.equal(y, y2)
    assert rel_err(y, swr_reference(a.double(), x.double(), 2, 16)) <= 2e-3


def test_errors_on_mismatch():
    a, x = make_inputs(1, 2, 16, 64, seed=1)
    op = swrgen.load("specs/hopper_k2.yaml")
    with pytest.raises(TypeError, match="dtype"):
        op(a.float(), x)
    with pytest.raises(TypeError, match="float64"):
        swrgen.swr(a.double(), x.double())
    with pytest.raises(ValueError, match="one device"):
        swrgen.swr(a.cpu(), x)


def test_non_contiguous_batch_and_head_strides():
    spec = spec_for(k=2)
    a, x = make_inputs(3, 4, 16, 2048, seed=9)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # [B,H] strides permuted, L still unit-stride
    assert torch.equal(_forward(spec, a, xt), _forward(spec, a, x))
