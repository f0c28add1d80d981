"""``swrgen`` command line: validate, show, list, build, demo, tune, bench."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from swrgen import resources
from swrgen.spec import SpecError, load_spec

DEBUG_ENV = "SWRGEN_DEBUG"  # =1: an unexpected error shows its traceback instead of one line


def _load(path: str):
    try:
        return load_spec(path)
    except SpecError as e:
        raise click.ClickException(str(e)) from None


class SpecFile(click.ParamType):
    """A spec file, or the name of a shipped spec (``hopper_k2``, ``hopper_k2.yaml``); converts to a path."""

    name = "SPEC"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = os.fspath(value)
        path = Path(text)
        if path.is_dir():
            self.fail(f"{text!r} is a folder; give a spec file (.yaml) or the name of a shipped spec", param, ctx)
        if path.exists():
            return text
        try:
            return str(resources.shipped_spec(text))
        except LookupError:
            names = ", ".join(resources.shipped_specs()) or "(none found: the installation is broken)"
            self.fail(f"{text!r} does not exist as a file and is not the name of a shipped spec; shipped specs: "
                      f"{names} (`swrgen list` describes them)", param, ctx)  # fmt: skip


SPEC = SpecFile()

# errno -> what to do about it, for errors writing the build output
_WRITE_ADVICE: dict[int, str] = {
    errno.EROFS: "that disk is read-only: choose a folder on a writable disk with -o",
    errno.EACCES: "no permission to write there: fix the folder's permissions or choose another folder with -o",
    errno.EPERM: "no permission to write there: fix the folder's permissions or choose another folder with -o",
    errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk with -o",
    errno.EDQUOT: "the disk quota is used up: free some space or choose a folder on another disk with -o",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another folder with -o",
    errno.EEXIST: "a file is in the way: remove it or choose another folder with -o",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter folder with -o",
}


def _os_error_text(err: OSError) -> str:
    """``[Errno 28] No space left on device: 'x'`` -> ``x: No space left on device``."""
    what = err.strerror or str(err) or type(err).__name__
    where = err.filename if err.filename is not None else None
    return f"{where}: {what}" if where is not None else what


_WRITE_GENERIC_ADVICE = "check that the folder can be written and its disk has space, or choose another with -o"


def _build_failure(folder: Path, err: Exception, build_error: type[Exception]) -> str:
    """What went wrong writing ``folder``, where, and what to do (an OSError, or a BuildError naming the path)."""
    cause = err if isinstance(err, OSError) else err.__cause__
    text = _os_error_text(err) if isinstance(err, OSError) else str(err)
    if isinstance(cause, OSError):
        advice = _WRITE_ADVICE.get(cause.errno or -1, _WRITE_GENERIC_ADVICE)
    elif isinstance(err, build_error) and build_error is not RuntimeError:
        advice = _WRITE_GENERIC_ADVICE
    else:  # a RuntimeError of a tree without BuildError: not necessarily about writing
        return f"the build into {folder}/ failed: {text}"
    return f"cannot write the build output to {folder}/ ({text}); {advice}"


def _build_error() -> type[Exception]:
    """What a failed ``swrgen.build.build`` raises besides OSError: BuildError (a RuntimeError naming the
    path), or RuntimeError where swrgen.build has none yet."""
    import swrgen.build

    return getattr(swrgen.build, "BuildError", RuntimeError)


def _known_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is made for users: printed as they are. A class is only looked up if its module
    was imported (whoever raised it imported it), so this never imports cuda-python or torch."""
    known: list[type[Exception]] = [SpecError]
    for module, name in (("swrgen.compiler.nvrtc", "CompileError"), ("swrgen.build", "BuildError")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            known.append(cls)
    return tuple(known)


def _describe(err: Exception) -> str:
    """The one-line text for an error that reached the top of a command."""
    if isinstance(err, _known_errors()):
        return str(err)
    if isinstance(err, OSError):
        return _os_error_text(err)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = "; ".join(lines)
    return (f"{type(err).__name__}{': ' + message if message else ''} (unexpected; {DEBUG_ENV}=1 shows the "
            "traceback)")  # fmt: skip


class _Main(click.Group):
    """The command group; turns an exception that escapes a command into ``Error: ...`` and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click reports these itself (usage errors exit 2)
        except BrokenPipeError:  # `swrgen list | head`: the reader has gone, nobody is left to tell
            try:  # so the interpreter's final flush of stdout does not fail again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):  # stdout is no file (captured, e.g. by click's CliRunner)
                pass
            raise click.exceptions.Exit(1) from None
        except Exception as err:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            raise click.ClickException(_describe(err)) from err


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    import swrgen

    click.echo(f"swrgen, version {swrgen.__version__}")
    ctx.exit()


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")  # fmt: skip
def main() -> None:
    """swrgen: generate, compile and run Sliding Window Recurrence kernels from YAML specs.

    A SPEC argument is a spec file or the name of a shipped spec (`swrgen list`), e.g. `swrgen build
    hopper_k2`. Errors print as one line; set SWRGEN_DEBUG=1 to see the traceback of an unexpected one.
    """


@main.command()
@click.argument("specs", nargs=-1, required=True, type=SPEC)
def validate(specs: tuple[str, ...]) -> None:
    """Check SPECS (files or shipped spec names); print each error with file, line and field."""
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
@click.argument("folder", required=False, type=click.Path(exists=True, file_okay=False))
def list_specs(folder: str | None) -> None:
    """List the specs in FOLDER (default: the shipped specs, whose names SPEC arguments take)."""
    root = Path(folder) if folder is not None else resources.specs_dir()
    for path in sorted(root.glob("*.y*ml")):
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
@click.argument("spec", type=SPEC)
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
@click.argument("spec", type=SPEC)
@click.option("-o", "--out", "out_root", default="generated", show_default=True,
              help="Root folder for the output (relative: under the current folder); created if missing.")  # fmt: skip
@click.option("--arch", "archs", multiple=True, help="Target arch (repeatable); default: the spec's target.archs.")
@click.option("--no-compile", is_flag=True, help="Only render the source and manifest.")
def build(spec: str, out_root: str, archs: tuple[str, ...], no_compile: bool) -> None:
    """Validate SPEC, render its CUDA source into OUT/<name>/ and compile a cubin per arch with NVRTC."""
    from swrgen import constants
    from swrgen.build import build as do_build
    from swrgen.compiler import CompileError

    s = _load(spec)
    folder = Path(out_root) / s.name
    for path in (Path(out_root), folder):
        if path.exists() and not path.is_dir():
            raise click.BadParameter(f"{str(path)!r} is a file, but the build writes a folder {folder}/ with "
                                     "swr.cu, manifest.json and cubins; remove the file or choose another -o",
                                     param_hint="-o/--out")  # fmt: skip
    for arch in archs:
        if arch not in constants.ARCHS:
            raise click.BadParameter(f"{arch!r}; allowed: {', '.join(constants.ARCHS)}", param_hint="--arch")
    if archs and s.target.cluster_size > 1:
        bad = [a for a in archs if a not in constants.CLUSTER_ARCHS]
        if bad:
            raise click.BadParameter(f"{bad[0]} has no clusters but the spec's cluster_size is {s.target.cluster_size}",
                                     param_hint="--arch")  # fmt: skip
    build_error = _build_error()
    try:
        result = do_build(s, out_root, archs or None, compile=not no_compile)
    except CompileError as e:  # a RuntimeError too: before the build's own errors
        raise click.ClickException(str(e)) from None
    except (build_error, OSError) as e:
        raise click.ClickException(_build_failure(folder, e, build_error)) from None
    click.echo(f"{s.name}: wrote {result.folder}/swr.cu and manifest.json")
    for arch, res in result.compiled.items():
        usage = ", ".join(
            f"{k}: {u.registers} regs, {_spill(u.spill_store_bytes)}, {u.stack_bytes}B stack"
            for k, u in sorted(res.resources.items())
        )
        click.echo(f"  {arch}: {len(res.cubin)} bytes cubin  [{usage}]")


def _spill(nbytes: int | None) -> str:
    """Spill stores as NVRTC's log reports them; some NVRTC builds log nothing (the cubin does not record it)."""
    return "spill not reported" if nbytes is None else f"{nbytes}B spill"


@main.command()
@click.argument("spec", required=False, type=SPEC)
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True, help="Batch size (>= 1).")
@click.option("--heads", type=click.IntRange(min=1), default=4, show_default=True, help="Heads (>= 1).")
@click.option("--length", type=click.IntRange(min=1), default=1000, show_default=True, help="Tokens (>= 1).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Random seed.")
def demo(spec: str | None, batch: int, heads: int, length: int, seed: int) -> None:
    """Run SPEC's op once (GPU if there is one, else the CPU reference) and check it against float64.

    SPEC defaults to the shipped hopper_k2.
    """
    s = _load(spec if spec is not None else str(resources.default_spec_file()))
    import torch

    import swrgen
    from swrgen import constants
    from swrgen.ops.swr.reference import swr_reference

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
@click.argument("spec", type=SPEC)
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
@click.option("--rep-ms", type=click.FloatRange(min=0, min_open=True), default=40.0, show_default=True,
              help="Timing window per kernel in ms (do_bench rep; > 0).")  # fmt: skip
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
        space.check_grid_values(grid_dict)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--grid") from None
    from swrgen.tune.search import family_for

    family = family_for(s)
    dims = _parse_shapes(shapes, s) or [family.default_shape]

    def check_grid(arch: str) -> None:  # some combination of the knobs given must be valid for the spec
        if grid_dict:
            try:
                space.check_grid(s, arch, family.grid(s, grid_dict))
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--grid") from None

    if compile_only:
        from swrgen.codegen import render_source
        from swrgen.compiler import CompileCache, CompileError

        arch = arch or s.target.archs[0]
        if arch not in constants.ARCHS:
            raise click.BadParameter(f"{arch!r}; allowed: {', '.join(constants.ARCHS)}", param_hint="--arch")
        check_grid(arch)
        cands = space.candidates(s, arch, family.grid(s, grid_dict))
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
    from swrgen.tune.search import device_arch
    from swrgen.tune.search import tune as run_tune

    check_grid(device_arch(s, torch.device("cuda", torch.cuda.current_device())))

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
