"""Build a generated folder of a spec with some target knobs and template constants changed (A/B inputs).

    python bench/tools/variant.py specs/hopper_k2.yaml -o .baseline/noout \
        --target staging=shared,tiles_per_warp=15 --const STAGE_OUTPUTS.bwd=false

The folder holds the source and a manifest (no cubins: the loader compiles, through the cache), so
``bench/tools/ab.py`` can time it against other folders or specs. ``--const`` overrides a value of
``swrgen.constants`` for this render only (integers, true/false; ``NAME.key`` for a dict's entry): a template
experiment without an edit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def parse_value(text: str) -> int | bool | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/tools/variant.py", description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="a spec YAML file")
    ap.add_argument("-o", "--out", required=True, help="folder to write <spec name>/ into")
    ap.add_argument("--target", default="", help="knob=value,... (tuning knobs, as swrgen tune --grid takes one value)")
    ap.add_argument("--const", action="append", default=[],
                    help="NAME=value or NAME.key=value of swrgen.constants (repeatable)")  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from swrgen import constants
    from swrgen.build import build
    from swrgen.spec import load_spec
    from swrgen.tune.space import parse_grid

    spec = load_spec(args.spec)
    knobs = {k: v[0] for k, v in parse_grid(args.target.replace(",", ";")).items()} if args.target else {}
    spec = spec.replace_target(**knobs)
    for item in args.const:
        name, _, value = item.partition("=")
        key = None
        if "." in name:  # NAME.key of a dict constant, e.g. STAGE_OUTPUTS.bwd=false
            name, key = name.split(".", 1)
        if not hasattr(constants, name):
            raise SystemExit(f"--const {item}: swrgen.constants has no {name}")
        if key is None:
            setattr(constants, name, parse_value(value))
        else:
            getattr(constants, name)[key] = parse_value(value)
    result = build(spec, args.out, compile=False)
    print(f"{result.folder}: {spec.target.to_dict()} {', '.join(args.const)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
