"""The benchmark suite (GPU): generated SWR kernels against the copy-bandwidth floor and the alternatives.

    swrgen bench [--shape B,H,L ...] [--k 2 3] [--out fp32 bf16] [--json out.json] [--record]
    python bench/run.py [same options]
    python bench/run.py --record-from out.json     # no GPU: append that run's entry to bench/results/log.md

One run: the copy bandwidth (``bench.common.copy_bandwidth``: 1 GiB device copy, bytes read + written); the
generated forward and backward at the default shapes plus ``--shape`` extras, for each k and output dtype,
each direction with the knobs the ops launch (the stored tuned config where there is one, else the spec's),
after a float64 check (median time, bytes, % of floor, GB/s: ``bench.ops.swr.time_kernels``); the host cost
of a tiny call, plain and under CUDA-graph replay (``bench.ops.host.tiny_call_costs``); then the
alternatives of ``bench/alternatives.py``, each in try/except (the reason is printed when one is
unavailable), cheapest first, within ``--budget-s``. The JSON is rewritten after each section; a compact
table is printed last; ``--json`` also writes a markdown copy of the log entry beside the JSON, and
``--record`` appends that entry to bench/results/log.md.

About 80-95 s on an H100 (bench/results/log.md), mostly the alternatives (Triton autotuning of fla's HGRN,
the torch.compile and FlexAttention compiles): no new alternative measurement starts after ``--budget-s``
(180 s), and one slower than ``--max-call-ms`` (2 s) is dropped. Optional packages for the alternatives:
accelerated-scan, flash-linear-attention (fla-core), matplotlib for the plot (bench/README.md).

Bytes (each read or written once): forward x + a + y; backward x + a + dy + dx + da (``bench.common.swr_bytes``).
Ratios are generated / alternative time (below 1: the generated kernel is faster); "generated" there is
the first (k, out) measured, k=2 fp32 by default.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import common

DEFAULT_SHAPES = [(8, 64, 2048), (4, 64, 8192), (1, 64, 32768), (1, 128, 131072)]
HEAD_DIM = common.HEAD_DIM
RESULTS_MD = common.ROOT / "bench" / "results" / "log.md"


# ------------------------------------------------------------------ environment


def versions() -> dict[str, Any]:
    import swrgen

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "swrgen": swrgen.__version__}  # fmt: skip
    for name in ("triton", "cuda.bindings", "accelerated_scan", "fla", "matplotlib"):
        try:
            module = __import__(name, fromlist=["__version__"])
            out[name] = getattr(module, "__version__", "?")
        except Exception:  # missing or broken: recorded as absent
            out[name] = None
    try:
        from swrgen.tune.store import compiler_version

        out["nvrtc"] = compiler_version()
    except Exception:
        out["nvrtc"] = None
    try:
        out["driver"] = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except Exception:
        out["driver"] = None
    return out


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _reason(err: BaseException) -> str:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of GPU memory"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:240]


# ------------------------------------------------------------------ sections


def run_generated(shapes: list[tuple[int, int, int]], ks: list[int], outs: list[str], bw: float, args,
                  log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:  # fmt: skip
    import swrgen
    from bench.ops.swr import time_kernels
    from swrgen.spec import default_spec
    from swrgen.tune import lookup
    from swrgen.tune.search import check_program, device_arch
    from swrgen.tune.space import current as knobs
    from swrgen.tune.store import device_tag_of

    rows, checks = [], []
    device = torch.device("cuda", torch.cuda.current_device())
    card = device_tag_of(device.index)  # the ops prefer the card's own tuned entries to the arch's
    for k in ks:
        for out in outs:
            spec = default_spec(window_blocks=k, output_dtype=out)
            try:
                t0 = time.perf_counter()
                program = swrgen.load(spec).kernels
                program.on(device.index)  # compile/load now, so it is not in the first timing
                load_s = time.perf_counter() - t0
                err_f, err_b = check_program(program, spec, (2, 8, HEAD_DIM, 4096 + 24), seed=k, device=device)
                checks.append(dict(k=k, out=out, err_fwd=err_f, err_bwd=err_b, load_s=load_s))
                log(f"check k={k} out={out}: rel err vs float64 fwd {err_f:.2e} bwd {err_b:.2e} (load {load_s:.1f} s)")
            except Exception as err:
                log(f"generated k={k} out={out}: FAILED to build/check: {_reason(err)}")
                checks.append(dict(k=k, out=out, error=_reason(err)))
                continue
            arch = device_arch(spec, device)
            for b, h, length in shapes:
                row: dict[str, Any] = dict(k=k, out=out, B=b, H=h, DH=HEAD_DIM, L=length, target=knobs(spec))
                try:
                    shape4 = (b, h, HEAD_DIM, length)
                    row["tuned"] = lookup(spec, arch, shape4, device=card)
                    fwd_program, bwd_program = (program.for_shape(device.index, shape4, d) for d in ("fwd", "bwd"))
                    row["fwd_target"], row["bwd_target"] = knobs(fwd_program.spec), knobs(bwd_program.spec)
                    row.update(time_kernels(fwd_program, bwd_program, (b, h, length), bw, args.warmup_ms,
                                            args.rep_ms))  # fmt: skip
                    log(f"k={k} out={out} {b}x{h}x{length}: fwd {row['fwd_ms']:.4f} ms ({row['fwd_pct']:.0f}% of "
                        f"floor {row['fwd_floor_ms']:.4f}) bwd {row['bwd_ms']:.4f} ms ({row['bwd_pct']:.0f}% of floor "
                        f"{row['bwd_floor_ms']:.4f})" + (f" tuned={row['tuned']}" if row["tuned"] else ""))  # fmt: skip
                except Exception as err:
                    row["error"] = _reason(err)
                    log(f"k={k} out={out} {b}x{h}x{length}: FAILED {row['error']}")
                rows.append(row)
                _free_cuda()
    return rows, checks


def run_alternatives(shapes: list[tuple[int, int, int]], args, t_start: float, log: Callable[[str], None],
                     save: Callable[[], None]) -> tuple[list[dict], dict[str, str]]:  # fmt: skip
    from bench import alternatives as alt

    rows: list[dict] = []
    unavailable: dict[str, str] = {}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    for name, (maker, cheap_bwd) in alt.MAKERS.items():
        if name in skip:
            unavailable[name] = "skipped (--skip)"
            log(f"{name}: skipped (--skip)")
            continue
        want_bwd = cheap_bwd or name in args.alt_bwd.split(",")
        for b, h, length in shapes:
            row: dict[str, Any] = dict(method=name, B=b, H=h, L=length)
            elapsed = time.perf_counter() - t_start
            if elapsed > args.budget_s:
                row["skipped"] = f"suite time budget spent ({elapsed:.0f} s > --budget-s {args.budget_s:.0f})"
                log(f"{name} {b}x{h}x{length}: skipped: {row['skipped']}")
                rows.append(row)
                continue
            t0 = time.perf_counter()
            case = None
            try:
                case = maker(b, h, length, bwd=want_bwd)
                row.update(dtype=case.dtype, layout=case.layout, note=case.note)
                fwd, fnote = common.measure(case.fwd, args.warmup_ms, args.rep_ms, args.max_call_ms)
                row["fwd_ms"] = fwd
                if fnote:
                    row["fwd_note"] = fnote
                if case.bwd is None:
                    row["bwd_note"] = "not timed (forward only for this method)"
                elif fwd is None or fwd > args.bwd_max_fwd_ms:
                    row["bwd_note"] = "not timed: forward already too slow"
                else:
                    bwd, bnote = common.measure(case.bwd, args.warmup_ms, args.rep_ms, args.max_call_ms)
                    row["bwd_ms"] = bwd
                    if bnote:
                        row["bwd_note"] = bnote
            except alt.Unavailable as err:
                row["unavailable"] = str(err)
                if "import" in str(err) or "not in this torch" in str(err):
                    unavailable[name] = str(err)
            except Exception as err:
                row["error"] = _reason(err)
            finally:
                del case
                _free_cuda()
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            log(_alt_line(row))
            if name in unavailable:  # a missing package: the other shapes would say the same
                break
        save()
    return rows, unavailable


def _alt_line(row: dict) -> str:
    head = f"{row['method']} {row['B']}x{row['H']}x{row['L']}:"
    for key in ("unavailable", "error", "skipped"):
        if key in row:
            return f"{head} {key.upper()} {row[key]}"
    f = f"{row['fwd_ms']:.4f} ms" if row.get("fwd_ms") is not None else row.get("fwd_note", "-")
    b = f"{row['bwd_ms']:.4f} ms" if row.get("bwd_ms") is not None else row.get("bwd_note", "-")
    return f"{head} fwd {f}  bwd {b}  ({row.get('note', '')}; {row['wall_s']:.1f} s wall)"


# ------------------------------------------------------------------ report


def _ref_rows(res: dict) -> dict[tuple[int, int, int], dict]:
    """Generated rows the ratios use: the first (k, out) measured, per shape."""
    gen = [r for r in res.get("generated", []) if "fwd_ms" in r]
    if not gen:
        return {}
    k, out = gen[0]["k"], gen[0]["out"]
    return {(r["B"], r["H"], r["L"]): r for r in gen if r["k"] == k and r["out"] == out}


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def table(res: dict) -> str:
    """The compact text table (printed last, and the body of the log entry)."""
    torch_version = res.get("versions", {}).get("torch")
    lines = [f"{res.get('device', '?')}  copy {res.get('copy_Bps', 0) / 1e12:.3f} TB/s  torch {torch_version}  "
             "(times: median ms; %fl = share of the copy-bandwidth floor)"]  # fmt: skip
    lines.append(f"{'k':>2} {'out':>4} {'B,H,L':>14} | {'fwd ms':>8} {'%fl':>4} {'GB/s':>6} | "
                 f"{'bwd ms':>8} {'%fl':>4} {'GB/s':>6}")  # fmt: skip
    for r in res.get("generated", []):
        shape = f"{r['B']},{r['H']},{r['L']}"
        if "fwd_ms" not in r:
            lines.append(f"{r['k']:>2} {r['out']:>4} {shape:>14} | FAILED {r.get('error', '')}")
            continue
        lines.append(f"{r['k']:>2} {r['out']:>4} {shape:>14} | {r['fwd_ms']:8.4f} {r['fwd_pct']:4.0f} "
                     f"{r['fwd_GBps']:6.0f} | {r['bwd_ms']:8.4f} {r['bwd_pct']:4.0f} {r['bwd_GBps']:6.0f}")  # fmt: skip
    ref = _ref_rows(res)
    if res.get("alternatives"):
        gen0 = next(iter(ref.values()), None)
        label = f"k={gen0['k']} {gen0['out']}" if gen0 else "-"
        lines.append(f"alternatives (gen = swrgen {label}; gen/alt < 1: swrgen faster)")
        lines.append(f"{'method':>18} {'B,H,L':>14} | {'fwd ms':>9} {'gen/alt':>7} | {'bwd ms':>9} {'gen/alt':>7}")
        for r in res["alternatives"]:
            shape = f"{r['B']},{r['H']},{r['L']}"
            why = r.get("unavailable") or r.get("error") or r.get("skipped")
            if why:
                lines.append(f"{r['method']:>18} {shape:>14} | {why[:70]}")
                continue
            g = ref.get((r["B"], r["H"], r["L"]), {})
            rf = g["fwd_ms"] / r["fwd_ms"] if g.get("fwd_ms") and r.get("fwd_ms") else None
            rb = g["bwd_ms"] / r["bwd_ms"] if g.get("bwd_ms") and r.get("bwd_ms") else None
            lines.append(f"{r['method']:>18} {shape:>14} | {_fmt(r.get('fwd_ms')):>9} {_fmt(rf, '.3f'):>7} | "
                         f"{_fmt(r.get('bwd_ms')):>9} {_fmt(rb, '.3f'):>7}")  # fmt: skip
    lo = res.get("launch_overhead") or {}
    vals = [(k, v) for k, v in lo.items() if isinstance(v, float)]
    if vals:
        lines.append("launch path, B=1 H=1 L=16 (us per call, host timer over 1000 calls):")
        lines += [f"  {k:<42} {v:8.1f}" for k, v in vals]
    return "\n".join(lines)


def markdown_entry(res: dict) -> str:
    v = res.get("versions", {})
    date = res.get("date", "")[:10]
    head = (f"## Suite run — {date}, {res.get('device')}, driver {v.get('driver')}, torch {v.get('torch')}, "
            f"triton {v.get('triton')}, cuda-bindings {v.get('cuda.bindings')}, NVRTC {v.get('nvrtc')}")  # fmt: skip
    extra = ", ".join(f"{m} {v.get(m)}" for m in ("accelerated_scan", "fla") if v.get(m))
    body = [head, "", f"Command: `{res.get('command')}`. Copy bandwidth {res.get('copy_Bps', 0) / 1e12:.3f} TB/s. "
            f"Timer: {res.get('timer')}. Suite wall time {res.get('elapsed_s', 0):.0f} s."
            + (f" Alternatives' packages: {extra}." if extra else "")]  # fmt: skip
    if res.get("unavailable"):
        body.append("Not run: " + "; ".join(f"{k} ({v})" for k, v in res["unavailable"].items()) + ".")
    body += ["", "```", table(res), "```", ""]
    return "\n".join(body)


def append_record(res: dict, path: Path | None = None) -> None:
    with open(path or RESULTS_MD, "a") as f:
        f.write("\n" + markdown_entry(res))


# ------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="swrgen bench", usage="%(prog)s [OPTIONS]", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=common.shape_type("B,H,L"), action="append", default=[],
                    help="extra B,H,L (repeatable)")  # fmt: skip
    ap.add_argument("--only-shapes", action="store_true", help="run only the --shape shapes, not the defaults")
    ap.add_argument("--k", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--out", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--json", default=None, help="write all numbers here (a .md copy of the entry beside it)")
    ap.add_argument("--record", action="store_true", help="append a dated entry to bench/results/log.md")
    ap.add_argument("--record-from", default=None, metavar="JSON", help="(no GPU) append JSON's entry and exit")
    ap.add_argument("--skip", default="", help="comma list: " + ", ".join(
        ["generated", "launch", "alternatives", "sdpa_causal", "torch_fp32", "accelerated_scan", "hgrn",
         "flex_swa512", "torch_fp32_compile"]))  # fmt: skip
    ap.add_argument("--alt-bwd", default="", help="comma list of forward-only alternatives to also time backward")
    ap.add_argument("--budget-s", type=float, default=180.0, help="no new alternative measurement after this")
    ap.add_argument("--max-call-ms", type=float, default=2000.0, help="drop an alternative whose call is slower")
    ap.add_argument("--bwd-max-fwd-ms", type=float, default=30.0, help="skip an alternative's backward past this")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=40.0)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.record_from:
        res = json.loads(Path(args.record_from).read_text())
        append_record(res)
        print(f"appended the entry of {args.record_from} to {RESULTS_MD}")
        return 0
    if not torch.cuda.is_available():
        print("swrgen bench needs a CUDA device: torch.cuda.is_available() is False here (plot or record "
              "an existing JSON instead: bench/tools/plot.py, --record-from)", file=sys.stderr)  # fmt: skip
        return 2
    t_start = time.perf_counter()
    shapes = list(dict.fromkeys(([] if args.only_shapes else DEFAULT_SHAPES) + args.shape))
    skip = {s.strip() for s in args.skip.split(",")}
    res: dict[str, Any] = {
        "schema": 1, "command": " ".join(["python3", *sys.argv]) if argv is None
        else "swrgen bench " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
        "versions": versions(), "shapes": [list(s) for s in shapes], "head_dim": HEAD_DIM,
        "timer": "triton.testing.do_bench median", "generated": [], "checks": [], "alternatives": [],
        "unavailable": {}, "launch_overhead": {},
    }  # fmt: skip
    if res["versions"].get("triton") is None:
        res["timer"] = "CUDA events median"

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    def save() -> None:
        res["elapsed_s"] = time.perf_counter() - t_start
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=1, default=str))

    log(f"{res['device']}  {json.dumps(res['versions'])}")
    res["copy_Bps"] = common.copy_bandwidth()
    log(f"copy bandwidth {res['copy_Bps'] / 1e12:.3f} TB/s (bytes read + written)")
    save()
    if "generated" not in skip:
        res["generated"], res["checks"] = run_generated(shapes, args.k, args.out, res["copy_Bps"], args, log)
        save()
    if "launch" not in skip:
        from bench.ops.host import tiny_call_costs

        try:
            res["launch_overhead"] = tiny_call_costs(log)
        except Exception as err:
            log(f"launch overhead: FAILED {_reason(err)}")
        save()
    if "alternatives" not in skip:
        res["alternatives"], res["unavailable"] = run_alternatives(shapes, args, t_start, log, save)
    save()
    if args.json:
        Path(args.json).with_suffix(".md").write_text(markdown_entry(res))
        log(f"wrote {args.json} and {Path(args.json).with_suffix('.md')}")
    if args.record:
        append_record(res)
        log(f"appended an entry to {RESULTS_MD}")
    print(table(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
