"""YAML / dict -> Spec, keeping the line of every value so errors point into the file.

The YAML is composed (not constructed) with the safe loader and the node tree is walked by hand: that is
how each value keeps its line, how duplicate keys are caught (PyYAML silently keeps the last one), and
why no arbitrary Python object can ever be built from a spec file.

A spec is a few dozen values, so what a file may cost is bounded: its size (``MAX_SPEC_BYTES``), the values
its aliases expand to (``MAX_SPEC_VALUES``: nested ``*alias`` lists grow exponentially, a few hundred bytes
can stand for a billion values) and its nesting (``MAX_SPEC_DEPTH``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from swrgen.spec.schema import (
    DTYPE_KEYS,
    NAME_ALLOWED,
    Carriers,
    Recurrence,
    Spec,
    SpecError,
    Target,
    check_keys,
    check_name,
    default_tiles_in_flight,
    field_names,
)

TOP_KEYS: tuple[str, ...] = ("name", "description", "recurrence", "target")
RECURRENCE_KEYS: tuple[str, ...] = (
    *(k for k in field_names(Recurrence) if k not in DTYPE_KEYS.values()),
    "dtypes",
)
TARGET_KEYS: tuple[str, ...] = field_names(Target)
CARRIER_KEYS: tuple[str, ...] = field_names(Carriers)

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_LAST_PART = re.compile(r"(\.[^.\[\]]*|\[\d+\])$")

MAX_SPEC_BYTES = 1 << 20  # 1 MiB; the shipped specs are ~2 KB
MAX_SPEC_VALUES = 10_000  # keys, scalars, lists and mappings after alias expansion; a spec has ~40
MAX_SPEC_DEPTH = 32  # nesting of lists and mappings; a spec needs 4 (target.carriers.warp)


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read and validate a spec file; every error names the file and, where it can, the line."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)  # never more, whatever the file is (/dev/zero too)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"cannot read spec file: {err}", source=source) from err
    return spec_from_yaml(text, source)


def _too_large(source: str) -> SpecError:
    return SpecError(
        f"the spec file is larger than {MAX_SPEC_BYTES} bytes",
        source=source,
        allowed=f"spec files of at most {MAX_SPEC_BYTES} bytes (1 MiB)",
    )


def spec_from_yaml(text: str, source: str = "<string>") -> Spec:
    """Parse YAML text (what ``load_spec`` does after reading the file)."""
    if len(text) > MAX_SPEC_BYTES or len(text.encode("utf-8", "replace")) > MAX_SPEC_BYTES:
        raise _too_large(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise SpecError(
            "the YAML is nested too deeply to read",
            source=source,
            allowed=f"lists and mappings nested at most {MAX_SPEC_DEPTH} levels deep",
        ) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        what = "; ".join(part for part in (err.context, err.problem) if part)
        raise SpecError(f"YAML syntax error: {what}", source=source, line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as err:
        raise SpecError(f"YAML error: {err}", source=source) from None
    if root is None:
        raise SpecError(
            "empty spec file: at least `name:` is required",
            field="name",
            source=source,
            line=1,
            allowed=NAME_ALLOWED,
        )
    if not isinstance(root, yaml.MappingNode) or root.tag != _MAP_TAG:
        kind = "a list" if isinstance(root, yaml.SequenceNode) else f"the scalar {root.value!r}"
        raise SpecError(
            f"the top level must be a mapping of keys, got {kind}",
            source=source,
            line=root.start_mark.line + 1,
            allowed=", ".join(TOP_KEYS),
        )
    walk = _Walk(source=source, lines={"": root.start_mark.line + 1})
    data = _to_python(root, "", walk, 1)
    return _build(data, source, walk.lines)


def spec_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> Spec:
    """Validate a nested dict in the YAML shape (e.g. ``Spec.to_dict()`` output) exactly as a file is."""
    return _build(d, source, None)


@dataclass
class _Walk:
    """State of one walk over a composed node graph."""

    source: str
    lines: dict[str, int]  # field path -> line, for every key and list item
    ctor: yaml.SafeLoader = field(default_factory=lambda: yaml.SafeLoader(""))
    active: set[int] = field(default_factory=set)  # ids of the collection nodes being walked (cycles)
    values: int = 0  # nodes produced so far, aliases counted at every use


def _to_python(node: yaml.Node, path: str, walk: _Walk, depth: int) -> Any:
    """Plain Python value of a node; records ``walk.lines[path]`` for every key and list item below it."""

    def fail(message: str, at: yaml.Node, field: str | None, allowed: str | None = None) -> SpecError:
        return SpecError(message, field=field or None, source=walk.source, line=at.start_mark.line + 1,
                         allowed=allowed)  # fmt: skip

    if id(node) in walk.active:  # `&a [*a]` composes to a cyclic node graph
        raise fail("recursive YAML alias", node, path)
    walk.values += 1
    if walk.values > MAX_SPEC_VALUES:  # e.g. "billion laughs": lists of aliases of lists of aliases ...
        raise fail(
            f"the spec expands to more than {MAX_SPEC_VALUES} values (YAML aliases repeat what their anchor "
            "holds at every use, and aliases of aliases multiply)",
            node,
            path,
            f"at most {MAX_SPEC_VALUES} values after expanding aliases (a spec needs a few dozen)",
        )
    if depth > MAX_SPEC_DEPTH:
        raise fail(f"nested more than {MAX_SPEC_DEPTH} levels deep", node, path,
                   f"lists and mappings nested at most {MAX_SPEC_DEPTH} levels deep")  # fmt: skip
    if isinstance(node, yaml.ScalarNode):
        try:
            return walk.ctor.construct_object(node, deep=True)
        except yaml.YAMLError as err:  # e.g. !!python/object tags: the safe constructor refuses them
            problem = getattr(err, "problem", None) or str(err)
            raise fail(f"unsupported YAML value: {problem}", node, path) from None
    walk.active.add(id(node))
    try:
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                raise fail(f"unsupported YAML tag {node.tag!r}", node, path)
            out_list = []
            for i, item in enumerate(node.value):
                sub = f"{path}[{i}]"
                walk.lines[sub] = item.start_mark.line + 1
                out_list.append(_to_python(item, sub, walk, depth + 1))
            return out_list
        if node.tag != _MAP_TAG:
            raise fail(f"unsupported YAML tag {node.tag!r}", node, path)
        out: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise fail("a key must be a plain string, not a list or mapping", key_node, path)
            key = _to_python(key_node, path, walk, depth + 1)
            sub = f"{path}.{key}" if path else str(key)
            key_line = key_node.start_mark.line + 1
            if key in first_line:  # PyYAML would silently keep the last value
                raise SpecError(
                    f"duplicate key {key!r} (first given at line {first_line[key]})",
                    field=sub,
                    source=walk.source,
                    line=key_line,
                )
            first_line[key] = key_line
            walk.lines[sub] = key_line
            out[key] = _to_python(value_node, sub, walk, depth + 1)
        return out
    finally:
        walk.active.discard(id(node))


def _line_for(field: str | None, lines: Mapping[str, int] | None) -> int | None:
    """Line of a field, else of its nearest enclosing key (a defaulted field has no line of its own)."""
    if lines is None:
        return None
    path = field or ""
    while True:
        if path in lines:
            return lines[path]
        if not path:
            return None
        shorter = _LAST_PART.sub("", path)
        path = shorter if shorter != path else ""


def _build(d: Any, source: str, lines: Mapping[str, int] | None) -> Spec:
    try:
        return _parse(d, source)
    except SpecError as err:
        raise err.located(source, _line_for(err.field, lines)) from None


def _section(d: Mapping[str, Any], key: str, path: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    value = d.get(key, {})
    if not isinstance(value, Mapping):
        raise SpecError(
            f"expected a mapping, got {value!r} ({type(value).__name__})",
            field=path,
            allowed=", ".join(allowed),
        )
    check_keys(value, allowed, path)
    return value


def _parse(d: Any, source: str) -> Spec:
    if not isinstance(d, Mapping):
        raise SpecError(f"the top level must be a mapping, got {type(d).__name__}", allowed=", ".join(TOP_KEYS))
    check_keys(d, TOP_KEYS, "")
    if "name" not in d:
        raise SpecError("missing required key", field="name", allowed=NAME_ALLOWED)
    name = check_name(d["name"])

    rec = _section(d, "recurrence", "recurrence", RECURRENCE_KEYS)
    dtypes = _section(rec, "dtypes", "recurrence.dtypes", tuple(DTYPE_KEYS))
    rec_kwargs = {k: v for k, v in rec.items() if k != "dtypes"}
    rec_kwargs.update({DTYPE_KEYS[k]: v for k, v in dtypes.items()})
    recurrence = Recurrence(**rec_kwargs)

    target_kwargs = dict(_section(d, "target", "target", TARGET_KEYS))
    target_kwargs.setdefault("tiles_in_flight", default_tiles_in_flight(recurrence.block_len))
    if isinstance(target_kwargs.get("archs"), list):
        target_kwargs["archs"] = tuple(target_kwargs["archs"])
    target = Target(**target_kwargs)

    return Spec(
        name=name,
        description=d.get("description", ""),
        recurrence=recurrence,
        target=target,
        source=source,
    )
