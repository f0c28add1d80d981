"""The fused Phalanx kernels (``phalanx_fwd_*`` / ``phalanx_bwd_*``: gating + SWR on the layer's input
projection P [B, L, N]) against the copy-bandwidth floor and the unfused path they replace (GPU).

    python bench/ops/phalanx_gating.py [--shapes B,L,D ...] [--sweep] [--json F]
    python bench/ops/phalanx_gating.py --tuned [--shapes B,L,D ...] [--json F]
    python bench/ops/phalanx_gating.py --vs-attention [--shapes B,L,D ...] [--json F]

Shapes are (B, L, D): heads = D / 16, kv_heads = heads, bf16, decay_max 0.8. Default shapes (8,2048,1024)
(2,8192,1024) (1,32768,1024) (1,131072,2048). Bytes as ``bench.common.gating_bytes``: forward P + Z,
backward P + dZ + dP. "unfused" is the forward of ``Phalanx(fused=False)``'s gating: the sigmoids, B*V,
the transposes to [B, H, DH, L], ``swrgen.swr`` (fp32 out), the transpose back and Y*C + V.
``--sweep`` also times the knobs around the fused spec's default (:func:`fused_sweep_specs`).
``--tuned``: ``swrgen.phalanx_gating`` and its backward op with the stored tuned configs and with
``SWRGEN_TUNED=0`` (default shapes (2,8192,1024) (1,32768,1024) (1,131072,2048)), outputs bitwise equal.
``--vs-attention``: the Phalanx core (``swrgen.phalanx_gating`` forward + its backward op, tuned) against
what it replaces in a model at the same width, in the same run: FlexAttention sliding-window (512) and
SDPA causal attention, forward + backward, head dim 64 (``bench.alternatives``; default shapes
(8,8192,1024) (2,32768,1024)).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench import common

DEFAULT_SHAPES = [(8, 2048, 1024), (2, 8192, 1024), (1, 32768, 1024), (1, 131072, 2048)]
TUNED_SHAPES = [(2, 8192, 1024), (1, 32768, 1024), (1, 131072, 2048)]
DECAY_MAX = 0.8


def fused_sweep_specs() -> list:
    """The fused Phalanx kernels' default spec (bf16, first) and the knobs swept around it."""
    from swrgen.spec import default_spec

    base = default_spec(fused_gating=True, output_dtype="bf16")
    knobs = [dict(), dict(tiles_in_flight=1), dict(warps_per_cta=8), dict(tiles_per_warp=16),
             dict(tiles_per_warp=16, warps_per_cta=8), dict(tiles_per_warp=32), dict(persistent=True)]  # fmt: skip
    return [base.replace_target(**kw) if kw else base for kw in knobs]


def unfused(P: torch.Tensor, layout, decay_max: float) -> torch.Tensor:
    """Z by torch gating around ``swrgen.swr``: what the fused forward replaces."""
    import swrgen
    from swrgen.ops.phalanx.reference import split_projections

    pa, pb, pc, pv = split_projections(P, layout)
    a = (decay_max * torch.sigmoid(pa)).transpose(1, 2).contiguous()
    x = (torch.sigmoid(pb) * pv).permute(0, 2, 3, 1).contiguous()
    y = swrgen.swr(a, x, window_blocks=2).permute(0, 3, 1, 2).to(P.dtype)
    return (y * pc + pv).flatten(2)


def time_shape(batch: int, length: int, dim: int, specs: list, bw: float) -> list[dict]:
    import swrgen
    from swrgen.ops.phalanx import GatingLayout, launch

    layout = GatingLayout(dim // 16, dim // 16, 16)
    P = torch.randn(batch, length, layout.width, device="cuda", dtype=torch.bfloat16)
    dZ = torch.randn(batch, length, layout.inner, device="cuda", dtype=torch.bfloat16)
    fwd_bytes, bwd_bytes = common.gating_bytes(P, dZ.numel())
    with torch.no_grad():
        t_unfused = common.bench_ms(lambda: unfused(P, layout, DECAY_MAX))
    rows = []
    for spec in specs:
        program = swrgen.load(spec).kernels
        t_f = common.bench_ms(lambda program=program: launch.forward(program, P, layout, DECAY_MAX))
        t_b = common.bench_ms(lambda program=program: launch.backward(program, P, dZ, layout, DECAY_MAX))
        row = {"B": batch, "L": length, "D": dim, "spec": spec.target.to_dict(), "fwd_ms": t_f, "bwd_ms": t_b,
               "fwd_floor_pct": common.pct_of_floor(fwd_bytes, bw, t_f),
               "bwd_floor_pct": common.pct_of_floor(bwd_bytes, bw, t_b), "unfused_fwd_ms": t_unfused}  # fmt: skip
        rows.append(row)
        t = spec.target
        print(f"B={batch} L={length:6d} D={dim}  w={t.warps_per_cta} T={t.tiles_per_warp} P={t.persistent}: "
              f"fwd {t_f:.3f} ms ({row['fwd_floor_pct']:.0f}% of floor)  bwd {t_b:.3f} ms "
              f"({row['bwd_floor_pct']:.0f}%)  unfused fwd {t_unfused:.3f} ms", flush=True)  # fmt: skip
    return rows


def gating_inputs(batch: int, length: int, heads: int, seed: int = 0):
    """(layout, P, dZ): random bf16 P [B, L, N] and dZ [B, L, H * 16] for ``heads`` heads (kv_heads = heads)."""
    from swrgen.ops.phalanx import GatingLayout

    layout = GatingLayout(heads, heads, 16)
    g = torch.Generator(device="cuda").manual_seed(seed)
    P = torch.randn(batch, length, layout.width, device="cuda", generator=g).bfloat16()
    dZ = torch.randn(batch, length, layout.inner, device="cuda", generator=g).bfloat16()
    return layout, P, dZ


def op_calls(batch: int, length: int, dim: int):
    """(P, dZ, forward, backward): the path a model takes, ``swrgen.phalanx_gating`` and its registered
    backward op (tuned configs, no state, no packing), on the random inputs of :func:`gating_inputs`."""
    import swrgen
    from swrgen.ops.swr.op import default_key

    heads = dim // 16
    _, P, dZ = gating_inputs(batch, length, heads)
    key = default_key(16, False, torch.bfloat16, torch.bfloat16, 2, 16, torch.bfloat16, True)
    op_args = (None, None, None, None, heads, heads, 16, 2, 16, DECAY_MAX, key, False)
    return (P, dZ, lambda: swrgen.phalanx_gating(P, heads=heads),
            lambda: torch.ops.swrgen.phalanx_bwd(P, dZ, *op_args))  # fmt: skip


def tuned_rows(shapes: list[tuple[int, int, int]], bw: float) -> list[dict]:
    from bench.ops.swr import print_tuned

    rows = []
    for b, length, dim in shapes:
        P, dZ, fwd, bwd = op_calls(b, length, dim)

        def run(fwd=fwd, bwd=bwd):
            return fwd, bwd, (fwd(), bwd()[0])

        (tf, tb), (uf, ub), same = common.tuned_and_untuned(run)
        fb, bb = common.gating_bytes(P, dZ.numel())
        rows.append(dict(op="phalanx_gating", out="bf16", shape=[b, length, dim // 16], tuned=[tf, tb],
                         untuned=[uf, ub], identical=same, floor=[fb / bw * 1e3, bb / bw * 1e3]))  # fmt: skip
        print_tuned(rows[-1])
    return rows


VS_SHAPES = [(8, 8192, 1024), (2, 32768, 1024)]


def attention_rows(shapes: list[tuple[int, int, int]]) -> list[dict]:
    """Phalanx core fwd+bwd against FlexAttention SWA-512 and SDPA causal fwd+bwd at the same (B, L, D)."""
    from bench import alternatives

    rows = []
    for b, length, dim in shapes:
        heads = dim // 16
        _, _, fwd, bwd = op_calls(b, length, dim)
        t_f, t_b = common.bench_ms(fwd), common.bench_ms(bwd)
        row = {"B": b, "L": length, "D": dim, "phalanx_ms": [t_f, t_b]}
        for name, make in (("flex_swa512", alternatives.make_flex_swa), ("sdpa_causal", alternatives.make_sdpa)):
            try:
                case = make(b, heads, length, bwd=True)
                row[f"{name}_ms"] = [common.bench_ms(case.fwd), common.bench_ms(case.bwd)]
            except (alternatives.Unavailable, torch.OutOfMemoryError) as err:
                row[f"{name}_ms"] = None
                print(f"  {name}: not run ({err})")
            torch.cuda.empty_cache()
        core = sum(row["phalanx_ms"])
        text = f"B={b} L={length} D={dim}: Phalanx core fwd {t_f:.3f} + bwd {t_b:.3f} = {core:.3f} ms"
        for name in ("flex_swa512", "sdpa_causal"):
            if row[f"{name}_ms"]:
                other = sum(row[f"{name}_ms"])
                row[f"{name}_over_phalanx"] = other / core
                text += f"  {name} {other:.3f} ms ({other / core:.2f}x)"
        print(text, flush=True)
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/ops/phalanx_gating.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", type=common.shape_type("B,L,D"), default=[], help="B,L,D shapes")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="also time the knobs around the fused spec's default")
    mode.add_argument("--tuned", action="store_true", help="the op with and without the stored tuned configs")
    mode.add_argument("--vs-attention", action="store_true", help="the Phalanx core against FlexAttention and SDPA")
    ap.add_argument("--json", default=None, help="write every number here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.require_cuda("bench/ops/phalanx_gating.py")
    bw = common.copy_bandwidth()
    print(
        f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.3f} TB/s  torch {torch.__version__}"
        + ("  (median ms; % of the copy floor; untuned = SWRGEN_TUNED=0; shapes B,L,heads)" if args.tuned else "")
    )
    if args.tuned:
        rows = tuned_rows(args.shapes or TUNED_SHAPES, bw)
    elif args.vs_attention:
        rows = attention_rows(args.shapes or VS_SHAPES)
    else:
        specs = fused_sweep_specs() if args.sweep else fused_sweep_specs()[:1]
        rows = [row for shape in args.shapes or DEFAULT_SHAPES for row in time_shape(*shape, specs, bw)]
    common.write_json(args.json, {"device": torch.cuda.get_device_name(), "copy_Bps": bw, "torch": torch.__version__,
                                  "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
