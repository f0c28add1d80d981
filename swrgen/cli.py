"""``swrgen`` command line: validate, show, list, build, demo, tune, bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from swrgen.spec import SpecError, load_spec

DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "specs" / "hopper_k2.yaml"


def _load(path: str):
    try:
        return load_spec(path)
    except SpecError as e:
        raise click.ClickException(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="swrgen")
def main() -> None:
    """swrgen: generate, compile and run Sliding Window Recurrence kernels from YAML specs."""


@main.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def validate(specs: tuple[str, ...]) -> None:
    """Check SPECS; print each error with file, line and field."""
    failed = 0
    for path in specs:
        try:
            spec = load_spec(path)
            click.echo(f"ok    {path}  ({spec.name}, digest {spec.digest()[:12]})")
        except SpecError as e:
            failed += 1
            click.echo(f"error {e}", err=True)
    if failed:
        sys.exit(1)


@main.command(name="list")
@click.argument("folder", default=str(DEFAULT_SPEC.parent), type=click.Path(exists=True, file_okay=False))
def list_specs(folder: str) -> None:
    """List the specs in FOLDER (default: the shipped specs/)."""
    for path in sorted(Path(folder).glob("*.y*ml")):
        try:
            s = load_spec(path)
        except SpecError as e:
            click.echo(f"{path.name:28s} INVALID: {e.message}")
            continue
        r, t = s.recurrence, s.target
        click.echo(
            f"{path.name:28s} k={r.window_blocks} bl={r.block_len} dh={r.head_dim} "
            f"{r.input_dtype}->{r.output_dtype} gates={r.gate_layout} archs={','.join(t.archs)} "
            f"warps={t.warps_per_cta} tiles/warp={t.tiles_per_warp} cluster={t.cluster_size}"
        )


@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option("--source", is_flag=True, help="Print the rendered CUDA source instead of the resolved spec.")
def show(spec: str, source: bool) -> None:
    """Print SPEC with every default filled in (or its rendered CUDA source)."""
    s = _load(spec)
    if source:
        from swrgen.codegen import render_source

        click.echo(render_source(s), nl=False)
    else:
        import yaml

        click.echo(f"# {spec}  digest {s.digest()}")
        click.echo(yaml.safe_dump(s.to_dict(), sort_keys=False), nl=False)


@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_root", default="generated", show_default=True, help="Root folder for the output.")
@click.option("--arch", "archs", multiple=True, help="Target arch (repeatable); default: the spec's target.archs.")
@click.option("--no-compile", is_flag=True, help="Only render the source and manifest.")
def build(spec: str, out_root: str, archs: tuple[str, ...], no_compile: bool) -> None:
    """Validate SPEC, render its CUDA source into OUT/<name>/ and compile a cubin per arch with NVRTC."""
    from swrgen import constants
    from swrgen.build import build as do_build
    from swrgen.compiler import CompileError

    s = _load(spec)
    for arch in archs:
        if arch not in constants.ARCHS:
            raise click.BadParameter(f"{arch!r}; allowed: {', '.join(constants.ARCHS)}", param_hint="--arch")
    if archs and s.target.cluster_size > 1:
        bad = [a for a in archs if a not in constants.CLUSTER_ARCHS]
        if bad:
            raise click.BadParameter(f"{bad[0]} has no clusters but the spec's cluster_size is {s.target.cluster_size}",
                                     param_hint="--arch")  # fmt: skip
    try:
        result = do_build(s, out_root, archs or None, compile=not no_compile)
    except CompileError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{s.name}: wrote {result.folder}/swr.cu and manifest.json")
    for arch, res in result.compiled.items():
        usage = ", ".join(
            f"{k}: {u.registers} regs, {u.spill_store_bytes}B spill, {u.stack_bytes}B stack"
            for k, u in sorted(res.resources.items())
        )
        click.echo(f"  {arch}: {len(res.cubin)} bytes cubin  [{usage}]")


@main.command()
@click.argument("spec", default=str(DEFAULT_SPEC), type=click.Path(exists=True, dir_okay=False))
@click.option("--batch", default=2, show_default=True)
@click.option("--heads", default=4, show_default=True)
@click.option("--length", default=1000, show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo(spec: str, batch: int, heads: int, length: int, seed: int) -> None:
    """Run SPEC's op once (GPU if there is one, else the CPU reference) and check it against float64."""
    import torch

    import swrgen
    from swrgen import constants
    from swrgen.ops.swr.reference import swr_reference

    s = _load(spec)
    r = s.recurrence
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, r.head_dim, length, generator=g).to(constants.torch_dtype(r.input_dtype))
    gate_shape = (batch, heads, length) if r.gate_layout == "per_head" else x.shape
    a = (0.5 + 0.5 * torch.rand(gate_shape, generator=g)).to(constants.torch_dtype(r.gate_dtype))
    op = swrgen.load(s)
    y = op(a.to(device), x.to(device)).cpu()
    ref = swr_reference(a, x, r.window_blocks, r.block_len)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    report = {"spec": s.name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (reference path)",
              "shape": list(x.shape), "out_dtype": str(y.dtype), "rel_err_vs_float64": err}  # fmt: skip
    click.echo(json.dumps(report, indent=2))
    if not err < 2e-3:
        raise click.ClickException(f"relative error {err:.3g} exceeds 2e-3")


def _parse_shapes(shapes: tuple[str, ...], spec) -> list[tuple[int, ...]]:
    """--shape texts -> int tuples in the form ``spec``'s kernel family takes (checked here, before any GPU work):
    B,H,L or B,H,DH,L for plain specs, B,L,H for fused_gating specs."""
    from swrgen.tune.search import family_for

    family = family_for(spec)
    out = []
    for text in shapes:
        try:
            dims = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise click.BadParameter(
                f"{text!r}: expected {family.shape_format} of positive integers"
                + (" (fused_gating spec: batch, tokens, heads)" if family.name == "phalanx" else ""),
                param_hint="--shape",
            ) from None
        try:
            family.normalize(spec, dims)
        except ValueError as e:
            raise click.BadParameter(f"{text!r}: {e}", param_hint="--shape") from None
        out.append(dims)
    return out


@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    help="Shape to tune for (repeatable; one run per shape bucket): B,H,L (or B,H,DH,L)  [default: 4,64,8192]. "
    "For a spec with recurrence.fused_gating: true, whose fused Phalanx kernels (phalanx_fwd/bwd) are what "
    "gets tuned: B,L,H = batch, tokens, heads (head_dim is the spec's, 16; kv_heads = heads)  "
    "[default: 4,8192,64].",
)
@click.option(
    "--grid",
    default="",
    help="Knob values to try instead of the defaults, e.g. "
    '"warps_per_cta=4,8;tiles_per_warp=64,128" (knobs: warps_per_cta, tiles_per_warp, tiles_in_flight, '
    "cluster_size, persistent).",
)
@click.option(
    "--objective",
    type=click.Choice(["train", "fwd"]),
    default="train",
    show_default=True,
    help="Score: forward + backward time (train) or forward alone (inference).",
)
@click.option("--rep-ms", default=40.0, show_default=True, help="Timing window per kernel (do_bench rep).")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Also write every result.")
@click.option("--no-save", is_flag=True, help="Do not store the winners in the tuned cache.")
@click.option(
    "--compile-only",
    is_flag=True,
    help="No GPU needed: only compile every candidate's cubin into the cubin cache (to carry to a GPU machine).",
)
@click.option("--arch", default=None, help="With --compile-only: the arch to compile for [default: the spec's first].")
def tune(
    spec: str,
    shapes: tuple[str, ...],
    grid: str,
    objective: str,
    rep_ms: float,
    json_out: str | None,
    no_save: bool,
    compile_only: bool,
    arch: str | None,
) -> None:
    """Search SPEC's tuning knobs on the GPU per shape bucket; check each candidate against float64, time it,
    and cache the winner (in $SWRGEN_CACHE_DIR/tuned/), which the op then uses for shapes of that bucket.

    Plain specs: the SWR kernels (swr_fwd/swr_bwd) are tuned, shapes B,H,L. Specs with
    recurrence.fused_gating: true: the fused Phalanx kernels (phalanx_fwd/phalanx_bwd), shapes B,L,H
    (batch, tokens, heads).

    \b
    swrgen tune specs/hopper_k2.yaml --shape 4,64,8192
    swrgen tune specs/hopper_k2_fused.yaml --shape 1,32768,64    # fused: B,L,H
    """
    from swrgen import constants
    from swrgen.tune import space

    s = _load(spec)
    try:
        grid_dict = space.parse_grid(grid)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--grid") from None
    from swrgen.tune.search import family_for

    dims = _parse_shapes(shapes, s) or [family_for(s).default_shape]
    if compile_only:
        from swrgen.codegen import render_source
        from swrgen.compiler import CompileCache, CompileError

        arch = arch or s.target.archs[0]
        if arch not in constants.ARCHS:
            raise click.BadParameter(f"{arch!r}; allowed: {', '.join(constants.ARCHS)}", param_hint="--arch")
        cands = space.candidates(s, arch, family_for(s).grid(s, grid_dict))
        sources = sorted({render_source(s.replace_target(**c)) for c in cands})
        click.echo(f"{len(cands)} candidates, {len(sources)} distinct sources for {arch}")
        cache = CompileCache()
        for i, source in enumerate(sources, 1):
            try:
                cache.compile(source, arch)
            except CompileError as e:
                raise click.ClickException(str(e)) from None
            click.echo(f"  compiled {i}/{len(sources)}")
        click.echo(f"cubin cache: {cache.directory} ({cache.hits} hits, {cache.misses} compiled)")
        return
    import torch

    if not torch.cuda.is_available():
        raise click.ClickException("swrgen tune needs a CUDA device, and torch sees none here "
                                   "(torch.cuda.is_available() is False). Run it on the GPU machine; here, "
                                   "--compile-only pre-builds the candidates' cubins.")  # fmt: skip
    from swrgen.tune.search import tune as run_tune

    try:
        result = run_tune(s, dims, device="cuda", grid=grid_dict, objective=objective, rep_ms=rep_ms,
                          save=not no_save, progress=lambda m: click.echo(m))  # fmt: skip
    except (ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1, default=str))
        click.echo(f"wrote {json_out}")
    if not any(b["winner"] for b in result["buckets"].values()):
        raise click.ClickException("no candidate passed the correctness check")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})  # fmt: skip
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run the benchmark suite on the GPU (bench/run.py; `swrgen bench -h` lists its options)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "run.py").is_file():
        raise click.ClickException(f"bench/run.py not found under {root}: the suite runs from a source checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench import run as suite

    code = suite.main(list(args))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
