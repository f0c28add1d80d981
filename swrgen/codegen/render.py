"""Render a spec into one self-contained CUDA translation unit.

The templates read like CUDA; everything they need comes from one context built
here: the spec, the shared constants and the kernel parameter struct.
"""

from __future__ import annotations

from types import SimpleNamespace

import jinja2

from swrgen import constants, resources
from swrgen.runtime.params import template_fields
from swrgen.spec import Spec
from swrgen.spec.staging import spec_layouts

TEMPLATE_DIR = resources.templates_dir()
MAIN_TEMPLATE = "swr.cu.j2"
# Entry points every rendered module defines: "vec" needs 16-byte aligned rows and
# L % (block_len / 2) == 0; "scalar" takes any L and any strides. The "_state" ones also continue from a
# state and write the new one (forward), or hand back the gradients of both (backward); the backward's
# "_state_aligned" one only where every sequence starts at a tile (pos % block_len == 0; no phase to read).
KERNEL_NAMES = ("swr_fwd_vec", "swr_fwd_scalar", "swr_bwd_vec", "swr_bwd_scalar",
                "swr_fwd_state_vec", "swr_fwd_state_scalar", "swr_bwd_state_vec", "swr_bwd_state_scalar",
                "swr_bwd_state_aligned_vec")  # fmt: skip
# Added by fused_gating: the Phalanx layer's gating fused around the SWR, on its [B, L, N] projections.
# "vec" needs 16-bit types and 16-byte aligned rows and column blocks; "scalar" takes any layout.
FUSED_KERNEL_NAMES = (*(f"phalanx_{d}{s}_{k}" for d in ("fwd", "bwd") for s in ("", "_state")
                        for k in ("vec", "scalar")),
                      "phalanx_bwd_state_aligned_vec",  # every sequence at a tile: no phase read
                      "phalanx_decode")  # one token per sequence, state in place in a pool of slots


def kernel_names(spec: Spec) -> tuple[str, ...]:
    """Entry points of ``spec``'s module."""
    return KERNEL_NAMES + (FUSED_KERNEL_NAMES if spec.recurrence.fused_gating else ())


def kernel_shared_bytes(spec: Spec) -> dict[str, int]:
    """Dynamic shared memory per entry point (the vector kernels' stage rings under shared staging)."""
    if spec.target.staging != "shared":
        return {}
    layouts = spec_layouts(spec.recurrence, spec.target)
    fwd, bwd = layouts["fwd"].cta_bytes, layouts["bwd"].cta_bytes
    return {"swr_fwd_vec": fwd, "swr_fwd_state_vec": fwd, "swr_bwd_vec": bwd, "swr_bwd_state_vec": bwd,
            "swr_bwd_state_aligned_vec": bwd}  # fmt: skip


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,  # a missing value is an error, not an empty string
        keep_trailing_newline=True,
        autoescape=False,
    )


def _constants_namespace() -> SimpleNamespace:
    return SimpleNamespace(**{k: v for k, v in vars(constants).items() if k.isupper()})


def render_source(spec: Spec) -> str:
    """The CUDA source for ``spec``: a pure function of the spec and the templates."""
    r, t = spec.recurrence, spec.target
    types = SimpleNamespace(
        input=constants.CUDA_TYPES[r.input_dtype],
        gate=constants.CUDA_TYPES[r.gate_dtype],
        output=constants.CUDA_TYPES[r.output_dtype],
    )
    template = _environment().get_template(MAIN_TEMPLATE)
    return template.render(
        spec=spec,
        r=r,
        t=t,
        c=_constants_namespace(),
        types=types,
        params=template_fields(),
        stage=spec_layouts(r, t),
    )
