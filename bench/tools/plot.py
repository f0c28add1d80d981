"""Plot a benchmark-suite JSON (``swrgen bench --json``): runs anywhere matplotlib is, no GPU needed.

    python bench/tools/plot.py results.json out.png

Left: time vs L per method (log-log; the generated kernels solid, alternatives thin; forward circles,
backward dashed squares). Right: % of the copy-bandwidth floor per generated kernel, grouped by shape,
with the issue's targets (85% forward, 70% backward) as dashed lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def _series(res: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Label -> [(L, ms)] sorted by L."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in res.get("generated", []):
        for d in ("fwd", "bwd"):
            if r.get(f"{d}_ms") is not None:
                out[f"swrgen k={r['k']} {r['out']} {d}"].append((r["L"], r[f"{d}_ms"]))
    for r in res.get("alternatives", []):
        for d in ("fwd", "bwd"):
            if r.get(f"{d}_ms") is not None:
                out[f"{r['method']} {d}"].append((r["L"], r[f"{d}_ms"]))
    return {k: sorted(v) for k, v in out.items()}


def plot(res: dict[str, Any], out_png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the machines this runs on
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    # One colour per kernel family (fwd solid circles, bwd dashed squares): swrgen from tab10, the
    # alternatives from Dark2, so the two groups never share a colour.
    families = list(dict.fromkeys(label.rsplit(" ", 1)[0] for label in _series(res)))
    ours = [f for f in families if f.startswith("swrgen")]
    theirs = [f for f in families if not f.startswith("swrgen")]
    colour = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(ours)}
    colour |= {f: plt.get_cmap("Dark2")(i % 8) for i, f in enumerate(theirs)}
    for label, pts in _series(res).items():
        xs, ys = zip(*pts, strict=True)
        family = label.rsplit(" ", 1)[0]
        bwd = label.endswith("bwd")
        ax1.plot(xs, ys, marker="s" if bwd else "o", linestyle="--" if bwd else "-", color=colour[family],
                 linewidth=2.0 if family in ours else 1.2, markersize=4, label=label)  # fmt: skip
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("L (tokens; B, H differ per shape: see the table)")
    ax1.set_ylabel("median time (ms)")
    ax1.set_title("time vs L")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=6, ncol=2)

    gen = [r for r in res.get("generated", []) if r.get("fwd_pct") is not None]
    shapes = list(dict.fromkeys((r["B"], r["H"], r["L"]) for r in gen))
    kernels = list(dict.fromkeys((r["k"], r["out"], d) for r in gen for d in ("fwd", "bwd")))
    width = 0.8 / max(1, len(kernels))
    for j, (k, out, d) in enumerate(kernels):
        vals = []
        for s in shapes:
            row = next((r for r in gen if (r["B"], r["H"], r["L"]) == s and r["k"] == k and r["out"] == out), None)
            vals.append((row.get(f"{d}_pct") or 0.0) if row else 0.0)
        pos = [i + (j - (len(kernels) - 1) / 2) * width for i in range(len(shapes))]
        ax2.bar(pos, vals, width, label=f"k={k} {out} {d}", hatch="//" if d == "bwd" else None)
    ax2.axhline(85, color="k", linestyle="--", linewidth=0.8, label="target fwd 85%")
    ax2.axhline(70, color="gray", linestyle=":", linewidth=0.8, label="target bwd 70%")
    ax2.set_xticks(range(len(shapes)), [f"{b},{h},{length}" for b, h, length in shapes])
    ax2.set_xlabel("B,H,L (head_dim 16)")
    ax2.set_ylabel("% of copy-bandwidth floor")
    ax2.set_ylim(0, 105)
    ax2.set_title("% of roofline per kernel")
    ax2.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{res.get('device', '?')}  copy {res.get('copy_Bps', 0) / 1e12:.2f} TB/s  {res.get('date', '')[:10]}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/tools/plot.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a suite JSON (swrgen bench --json)")
    ap.add_argument("png", help="the plot to write")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench/tools/plot.py needs matplotlib: pip install 'swrgen[bench]' (or matplotlib)", file=sys.stderr)
        return 2
    plot(json.loads(Path(args.results).read_text()), args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
