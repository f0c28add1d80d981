"""Tests for the YAML spec language (swrgen.spec): CPU only, no GPU, fast."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest
import yaml

from swrgen import constants as C
from swrgen.spec import (
    SPECS_DIR,
    Carriers,
    Recurrence,
    Spec,
    SpecError,
    Target,
    default_spec,
    load_spec,
    spec_from_dict,
)

REPO = Path(__file__).resolve().parents[1]

SHIPPED = {
    # file stem: (window_blocks, archs, cluster_size, output dtype)
    "hopper_k2": (2, ("sm_90a", "sm_100a"), 1, "fp32"),
    "ampere_k2": (2, ("sm_80", "sm_86", "sm_89"), 1, "fp32"),
    "hopper_k1": (1, ("sm_90a", "sm_100a"), 1, "fp32"),
    "hopper_k3": (3, ("sm_90a", "sm_100a"), 1, "fp32"),
    "hopper_k2_bf16out": (2, ("sm_90a", "sm_100a"), 1, "bf16"),
    "hopper_k3_bf16out": (3, ("sm_90a", "sm_100a"), 1, "bf16"),
    "hopper_k2_cluster": (2, ("sm_90a",), 2, "fp32"),
    "hopper_k2_fused": (2, ("sm_90a", "sm_100a"), 1, "bf16"),
}


# --- shipped specs --------------------------------------------------------------------------------------


def test_specs_dir_holds_exactly_the_shipped_specs() -> None:
    assert SPECS_DIR == REPO / "specs"
    assert sorted(p.stem for p in SPECS_DIR.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("stem", sorted(SHIPPED))
def test_shipped_spec_loads(stem: str) -> None:
    path = SPECS_DIR / f"{stem}.yaml"
    spec = load_spec(path)
    k, archs, cluster, out = SHIPPED[stem]
    assert spec.name == stem
    assert spec.source == str(path)
    assert spec.description  # every shipped spec explains itself
    assert path.read_text().startswith("#"), "shipped specs start with a comment header"
    assert spec.recurrence.window_blocks == k
    assert spec.target.archs == archs
    assert spec.target.cluster_size == cluster
    assert spec.recurrence.output_dtype == out
    assert (spec.recurrence.head_dim, spec.recurrence.block_len) == (16, 16)
    assert (spec.recurrence.input_dtype, spec.recurrence.gate_dtype) == ("bf16", "bf16")
    assert (spec.target.warps_per_cta, spec.target.tiles_per_warp, spec.target.tiles_in_flight) == (4, 64, 8)


def test_default_file_spells_out_every_key() -> None:
    """hopper_k2.yaml doubles as documentation, so it must show every key with its value."""
    path = SPECS_DIR / "hopper_k2.yaml"
    assert yaml.safe_load(path.read_text()) == load_spec(path).to_dict()
    key_lines = [ln for ln in path.read_text().splitlines() if ":" in ln and not ln.lstrip().startswith("#")]
    uncommented = [ln.split(":")[0] for ln in key_lines if "#" not in ln]
    # The two sections are introduced by a comment line above them; the description explains itself.
    assert uncommented == ["description", "recurrence", "target"], uncommented


# --- defaults -------------------------------------------------------------------------------------------


def test_defaults() -> None:
    spec = spec_from_dict({"name": "x"})
    r, t = spec.recurrence, spec.target
    assert spec.description == "" and spec.source == "<dict>"
    assert (r.head_dim, r.block_len, r.window_blocks, r.gate_layout, r.fused_gating) == (
        16,
        16,
        2,
        "per_head",
        False,
    )
    assert (r.input_dtype, r.gate_dtype, r.output_dtype, r.accum_dtype) == ("bf16", "bf16", "fp32", "fp32")
    assert t.archs == ("sm_90a",)
    assert (t.warps_per_cta, t.tiles_per_warp, t.tiles_in_flight, t.cluster_size, t.persistent) == (
        4,
        64,
        8,
        1,
        False,
    )
    assert t.carriers == Carriers("registers", "halo", "halo")
    assert spec == Spec(name="x")


def test_gate_dtype_defaults_to_input_dtype() -> None:
    spec = spec_from_dict({"name": "x", "recurrence": {"dtypes": {"input": "fp16"}}})
    assert spec.recurrence.gate_dtype == "fp16"
    assert spec.to_dict()["recurrence"]["dtypes"] == {
        "input": "fp16",
        "gate": "fp16",
        "output": "fp32",
        "accum": "fp32",
    }
    assert Recurrence(input_dtype="fp32").gate_dtype == "fp32"


def test_unspecified_tiles_in_flight_is_capped_to_what_fits() -> None:
    spec = spec_from_dict({"name": "x", "recurrence": {"block_len": 64}})
    assert spec.target.tiles_in_flight == 2  # 32 tokens per lane x 2 = 64, the limit
    assert spec_from_dict({"name": "x", "recurrence": {"block_len": 32}}).target.tiles_in_flight == 4  # 16 x 4 = 64


# --- to_dict / digest -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", sorted(SHIPPED))
def test_to_dict_round_trips(stem: str) -> None:
    spec = load_spec(SPECS_DIR / f"{stem}.yaml")
    d = spec.to_dict()
    assert isinstance(d["target"]["archs"], list)
    assert "source" not in d
    again = spec_from_dict(d)
    assert again == spec and again.digest() == spec.digest()
    assert again.source == "<dict>"
    json.dumps(d)  # plain data only


def test_digest_is_sha256_of_canonical_json_and_ignores_source(tmp_path: Path) -> None:
    spec = load_spec(SPECS_DIR / "hopper_k2.yaml")
    expected = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()
    assert spec.digest() == expected and len(expected) == 64
    copy = tmp_path / "elsewhere.yaml"
    copy.write_text((SPECS_DIR / "hopper_k2.yaml").read_text())
    assert load_spec(copy).digest() == spec.digest()
    assert load_spec(copy) == spec  # source is provenance, not identity


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.replace_recurrence(window_blocks=3),
        lambda s: s.replace_recurrence(head_dim=32),
        lambda s: s.replace_recurrence(gate_dtype="fp32"),
        lambda s: s.replace_target(warps_per_cta=8),
        lambda s: s.replace_target(archs=("sm_90a",)),
        lambda s: s.replace_target(persistent=True),
        lambda s: dataclasses.replace(s, name="other"),
        lambda s: dataclasses.replace(s, description="other"),
    ],
)
def test_digest_changes_with_any_field(change) -> None:
    spec = load_spec(SPECS_DIR / "hopper_k2.yaml")
    assert change(spec).digest() != spec.digest()


# --- invalid files: every error names the file, the line, the field and what is allowed -----------------

VALID_BODY = """\
name: good
recurrence:
  head_dim: 16
  block_len: 16
  dtypes: {input: bf16, output: fp32}
target:
  archs: [sm_90a]
  cluster_size: 1
"""

# (id, YAML text, line, field, fragments that must appear in str(err))
BAD_FILES = [
    (
        "choice",
        VALID_BODY.replace("head_dim: 16", "head_dim: 24"),
        3,
        "recurrence.head_dim",
        ["got 24 (int); allowed: 16, 32, 64"],
    ),
    (
        "bool_not_int",
        VALID_BODY.replace("head_dim: 16", "head_dim: true"),
        3,
        "recurrence.head_dim",
        ["expected an integer", "got True (bool)", "allowed: 16, 32, 64"],
    ),
    (
        "str_not_int",
        VALID_BODY.replace("head_dim: 16", 'head_dim: "16"'),
        3,
        "recurrence.head_dim",
        ["got '16' (str)", "allowed: 16, 32, 64"],
    ),
    (
        "float_not_int",
        VALID_BODY.replace("block_len: 16", "block_len: 16.0"),
        4,
        "recurrence.block_len",
        ["got 16.0 (float)", "allowed: 16, 32, 64"],
    ),
    (
        "out_of_range",
        "name: x\nrecurrence:\n  window_blocks: 9\n",
        3,
        "recurrence.window_blocks",
        ["got 9", f"allowed: 1..{C.MAX_WINDOW_BLOCKS}"],
    ),
    (
        "zero_window",
        "name: x\nrecurrence:\n  window_blocks: 0\n",
        3,
        "recurrence.window_blocks",
        ["got 0", "allowed: 1..8"],
    ),
    (
        "tiles_per_warp_range",
        "name: x\ntarget:\n  tiles_per_warp: 0\n",
        3,
        "target.tiles_per_warp",
        [f"allowed: 1..{C.MAX_TILES_PER_WARP}"],
    ),
    (
        "unknown_key",
        VALID_BODY.replace("block_len", "blok_len"),
        4,
        "recurrence.blok_len",
        [
            "unknown key 'blok_len'",
            "did you mean 'block_len'?",
            "allowed: head_dim, block_len, window_blocks",
        ],
    ),
    (
        "unknown_top_key",
        VALID_BODY.replace("target:", "taget:"),
        6,
        "taget",
        ["did you mean 'target'?", "allowed: name, description, recurrence, target"],
    ),
    (
        "unknown_dtype_key",
        VALID_BODY.replace("output: fp32", "out: fp32"),
        5,
        "recurrence.dtypes.out",
        ["did you mean 'output'?", "allowed: input, gate, output, accum"],
    ),
    (
        "duplicate_key",
        VALID_BODY + "  cluster_size: 2\n",
        9,
        "target.cluster_size",
        ["duplicate key 'cluster_size'", "first given at line 8"],
    ),
    (
        "duplicate_top_key",
        "name: a\ndescription: d\nname: b\n",
        3,
        "name",
        ["duplicate key 'name'", "line 1"],
    ),
    (
        "bad_dtype",
        VALID_BODY.replace("input: bf16", "input: bf61"),
        5,
        "recurrence.dtypes.input",
        ["got 'bf61' (str)", "allowed: bf16, fp16, fp32"],
    ),
    (
        "output_dtype_rule",
        VALID_BODY.replace("output: fp32", "output: fp16"),
        5,
        "recurrence.dtypes.output",
        ["must be fp32 or the input dtype (bf16)", "allowed: fp32, bf16"],
    ),
    (
        "fused_gating",
        "name: x\nrecurrence:\n  fused_gating: true\n  dtypes: {input: bf16, output: fp32}\n",
        4,
        "recurrence.dtypes.output",
        ["writes Z for the output projection", "allowed: bf16 (the input dtype) with fused_gating"],
    ),
    (
        "fused_gating_head_dim",
        "name: x\nrecurrence:\n  head_dim: 32\n  fused_gating: true\n  dtypes: {output: bf16}\n",
        3,
        "recurrence.head_dim",
        ["one warp per head; got head_dim 32", "allowed: 16 with fused_gating"],
    ),
    (
        "fused_gating_layout",
        "name: x\nrecurrence:\n  gate_layout: per_channel\n  fused_gating: true\n  dtypes: {output: bf16}\n",
        3,
        "recurrence.gate_layout",
        ["per-head gates; got 'per_channel'", "allowed: per_head with fused_gating"],
    ),
    (
        "gate_layout",
        "name: x\nrecurrence:\n  gate_layout: per_token\n",
        3,
        "recurrence.gate_layout",
        ["got 'per_token'", "allowed: per_head, per_channel"],
    ),
    (
        "bad_arch_in_block_list",
        "name: x\ntarget:\n  archs:\n    - sm_90a\n    - sm_91\n",
        5,
        "target.archs[1]",
        ["got 'sm_91'", "allowed: " + ", ".join(C.ARCHS)],
    ),
    (
        "duplicate_arch",
        "name: x\ntarget:\n  archs: [sm_90a, sm_90a]\n",
        3,
        "target.archs[1]",
        ["duplicate architecture 'sm_90a'", "allowed: sm_80"],
    ),
    ("empty_archs", "name: x\ntarget:\n  archs: []\n", 3, "target.archs", ["empty", "allowed: sm_80"]),
    (
        "archs_not_list",
        "name: x\ntarget:\n  archs: sm_90a\n",
        3,
        "target.archs",
        ["expected a list", "allowed: sm_80"],
    ),
    (
        "cluster_needs_arch",
        "name: x\ntarget:\n  archs: [sm_90a, sm_80]\n  cluster_size: 2\n",
        4,
        "target.cluster_size",
        ["clusters need sm_90 or newer; sm_80 has none", "allowed: 1 unless"],
    ),
    (
        "cluster_size_choice",
        "name: x\ntarget:\n  cluster_size: 3\n",
        3,
        "target.cluster_size",
        ["got 3 (int)", "allowed: 1, 2, 4, 8"],
    ),
    (
        "tile_does_not_fit",
        "name: x\nrecurrence:\n  block_len: 64\ntarget:\n  tiles_in_flight: 4\n",
        5,
        "target.tiles_in_flight",
        ["a tile that does not fit", "= 128 > limit 64", "allowed: 1, 2 for block_len 64"],
    ),
    (
        "staging_choice",
        "name: x\ntarget:\n  staging: smem\n",
        3,
        "target.staging",
        ["got 'smem'", "allowed: registers, shared"],
    ),
    (
        "stages_need_shared",
        "name: x\ntarget:\n  stages: 3\n",
        3,
        "target.stages",
        ["staging 'registers' double-buffers", "allowed: 2 with staging 'registers'; 2, 3, 4 with staging 'shared'"],
    ),
    (
        "shared_ring_too_large",
        "name: x\ntarget:\n  archs: [sm_86]\n  staging: shared\n  warps_per_cta: 8\n",
        4,
        "target.staging",
        ["bytes of shared memory per CTA, over the 101376 bytes of sm_86", "fewer warps_per_cta, tiles_in_flight"],
    ),
    (
        "tile_fits_shared_only",
        "name: x\ntarget:\n  tiles_in_flight: 16\n",
        3,
        "target.tiles_in_flight",
        ["= 128 > limit 64", "staging 'shared' takes more"],
    ),
    (
        "min_warps_choice",
        "name: x\ntarget:\n  min_warps_per_sm: 10\n",
        3,
        "target.min_warps_per_sm",
        ["got 10 (int)", "allowed: 0, 8, 12, 16, 24, 32"],
    ),
    (
        "warps_choice",
        "name: x\ntarget:\n  warps_per_cta: 3\n",
        3,
        "target.warps_per_cta",
        ["got 3 (int)", "allowed: 1, 2, 4, 8, 16, 32"],
    ),
    (
        "persistent_not_bool",
        "name: x\ntarget:\n  persistent: 1\n",
        3,
        "target.persistent",
        ["expected true or false", "got 1 (int)", "allowed: true, false"],
    ),
    (
        "carrier_value",
        "name: x\ntarget:\n  carriers: {warp: shared}\n",
        3,
        "target.carriers.warp",
        ["got 'shared'", "allowed: registers"],
    ),
    (
        "carrier_key",
        "name: x\ntarget:\n  carriers:\n    grid: halo\n",
        4,
        "target.carriers.grid",
        ["unknown key 'grid'", "allowed: warp, cta, cluster"],
    ),
    (
        "section_not_mapping",
        "name: x\ntarget: [sm_90a]\n",
        2,
        "target",
        ["expected a mapping", "allowed: archs, warps_per_cta"],
    ),
    (
        "null_value",
        "name: x\nrecurrence:\n  head_dim:\n",
        3,
        "recurrence.head_dim",
        ["got None (NoneType)", "allowed: 16, 32, 64"],
    ),
    (
        "non_string_key",
        "name: x\nrecurrence:\n  16: 16\n",
        3,
        "recurrence.16",
        ["key 16 is not a string", "allowed: head_dim"],
    ),
    (
        "missing_name",
        "# no name\n\nrecurrence:\n  head_dim: 16\n",
        3,
        "name",
        ["missing required key", "allowed: an identifier"],
    ),
    (
        "name_not_identifier",
        "description: d\nname: my-spec\n",
        2,
        "name",
        ["got 'my-spec' (str), not an identifier", "[A-Za-z_][A-Za-z0-9_]*"],
    ),
    ("name_starts_with_digit", "name: 2k\n", 1, "name", ["not an identifier"]),
    ("name_not_string", "name: 123\n", 1, "name", ["expected a string", "got 123 (int)"]),
    ("description_not_string", "name: x\ndescription: [a]\n", 2, "description", ["expected a string"]),
    ("top_level_list", "\n- name: x\n- name: y\n", 2, None, ["top level must be a mapping", "got a list"]),
    (
        "top_level_scalar",
        "hopper_k2\n",
        1,
        None,
        ["top level must be a mapping", "allowed: name, description"],
    ),
    ("empty_file", "", 1, "name", ["empty spec file"]),
    ("comments_only", "# nothing here\n# at all\n", 1, "name", ["empty spec file"]),
    ("syntax_unclosed_flow", "name: x\ntarget:\n  archs: [sm_90a,\n", 4, None, ["YAML syntax error"]),
    (
        "syntax_bad_indent",
        "name: x\nrecurrence:\n  head_dim: 16\n block_len: 16\n",
        4,
        None,
        ["YAML syntax error"],
    ),
    ("two_documents", "name: x\n---\nname: y\n", 2, None, ["YAML syntax error", "single document"]),
    (
        "unsafe_tag",
        "name: x\ndescription: !!python/object/apply:os.system ['echo pwned']\n",
        2,
        "description",
        ["unsupported YAML"],
    ),
    (
        "unsafe_tag_on_mapping",
        "name: x\ntarget: !!python/object:os.environ {}\n",
        2,
        "target",
        ["unsupported YAML tag"],
    ),
    (
        "recursive_alias",
        "name: x\ntarget:\n  archs: &a [sm_90a, *a]\n",
        3,
        "target.archs[1]",
        ["recursive YAML alias"],
    ),
    (
        "name_too_long",  # passed validation once, then failed `swrgen build` (file name too long)
        f"name: {'n' * 300}\n",
        1,
        "name",
        ["a name of 300 characters", "longer than 64", "allowed: an identifier", "at most 64 characters"],
    ),
    (
        "nested_too_deeply",
        "name: x\ntarget:\n  archs: " + "[" * 40 + "]" * 40 + "\n",
        3,
        "target.archs" + "[0]" * 30,  # the 33rd level: root, target, archs, 30 lists
        ["nested more than 32 levels deep", "allowed: lists and mappings nested at most 32 levels deep"],
    ),
]


@pytest.mark.parametrize(
    "text, line, field, fragments", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES]
)
def test_invalid_file(tmp_path: Path, text: str, line: int, field: str | None, fragments: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    err = info.value
    msg = str(err)
    assert (err.source, err.line, err.field) == (str(path), line, field), msg
    assert msg.startswith(f"{path}:{line}: " + (f"{field}: " if field else "")), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    assert isinstance(err, ValueError)


def test_error_str_matches_documented_format(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(VALID_BODY.replace("head_dim: 16", "head_dim: 24"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}:3: recurrence.head_dim: got 24 (int); allowed: 16, 32, 64"
    assert info.value.allowed == "16, 32, 64" and info.value.message == "got 24 (int)"


def test_defaulted_field_error_points_at_enclosing_key(tmp_path: Path) -> None:
    """tiles_in_flight 8 fits block_len 16; with block_len 32 the explicit value is the culprit."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nrecurrence:\n  block_len: 32\ntarget:\n  archs: [sm_90a]\n  tiles_in_flight: 8\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert (info.value.line, info.value.field) == (6, "target.tiles_in_flight")
    assert "16 tokens per lane x 8 tiles in flight = 128 > limit 64" in str(info.value)


# "Billion laughs": 9 levels of 9 aliases each, ~300 bytes that stand for 9**9 (387 million) values. Walked
# naively it took 17-20 s and 1.8 GB before failing; the walk now stops after MAX_SPEC_VALUES.
BILLION_LAUGHS = "name: lol\na: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_alias_expansion_is_bounded(tmp_path: Path) -> None:
    from swrgen.spec.loader import MAX_SPEC_VALUES

    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS)
    assert path.stat().st_size < 320
    with pytest.raises(SpecError) as info:
        load_spec(path)
    err = info.value
    assert err.source == str(path) and err.line is not None and 2 <= err.line <= 10, str(err)
    msg = str(err)
    assert msg.startswith(f"{path}:{err.line}: "), msg
    assert f"expands to more than {MAX_SPEC_VALUES} values" in msg and "aliases" in msg, msg
    assert f"allowed: at most {MAX_SPEC_VALUES} values after expanding aliases" in msg, msg


def test_aliases_within_the_bound_still_work(tmp_path: Path) -> None:
    path = tmp_path / "alias.yaml"
    path.write_text("name: x\nrecurrence:\n  dtypes: {input: &t fp16, gate: *t, output: *t}\n")
    r = load_spec(path).recurrence
    assert (r.input_dtype, r.gate_dtype, r.output_dtype) == ("fp16", "fp16", "fp16")
    # Many plain values below the bound reach validation (and its own error); above it, the bound's.
    body = "name: x\ntarget:\n  archs: [" + ", ".join(["sm_90a"] * 2000) + "]\n"
    with pytest.raises(SpecError, match="duplicate architecture"):
        spec_from_yaml_text(body)
    with pytest.raises(SpecError, match="expands to more than"):
        spec_from_yaml_text(body.replace(", ".join(["sm_90a"] * 2000), ", ".join(["sm_90a"] * 20000)))


def spec_from_yaml_text(text: str) -> Spec:
    from swrgen.spec import spec_from_yaml

    return spec_from_yaml(text, "<text>")


def test_nesting_deeper_than_the_yaml_parser_goes(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("name: x\ndescription: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == (f"{path}: the YAML is nested too deeply to read; "
                               "allowed: lists and mappings nested at most 32 levels deep")  # fmt: skip


def test_file_size_is_capped(tmp_path: Path) -> None:
    from swrgen.spec.loader import MAX_SPEC_BYTES

    body = "name: big\n"
    ok = tmp_path / "ok.yaml"
    ok.write_text(body + "#" * (MAX_SPEC_BYTES - len(body) - 1) + "\n")
    assert ok.stat().st_size == MAX_SPEC_BYTES
    assert load_spec(ok).name == "big"
    big = tmp_path / "big.yaml"
    big.write_text(body + "#" * (MAX_SPEC_BYTES - len(body)) + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(big)
    assert str(info.value) == (f"{big}: the spec file is larger than {MAX_SPEC_BYTES} bytes; "
                               f"allowed: spec files of at most {MAX_SPEC_BYTES} bytes (1 MiB)")  # fmt: skip
    with pytest.raises(SpecError, match="larger than"):
        spec_from_yaml_text(big.read_text())


def test_name_length_limit() -> None:
    from swrgen.spec.schema import MAX_NAME_LEN

    assert Spec(name="n" * MAX_NAME_LEN).name == "n" * MAX_NAME_LEN
    with pytest.raises(SpecError, match=f"longer than {MAX_NAME_LEN}; allowed: .*at most {MAX_NAME_LEN} char"):
        Spec(name="n" * (MAX_NAME_LEN + 1))
    # every default name fits (the longest recurrence there is)
    longest = default_spec(head_dim=64, block_len=64, window_blocks=8, gate_layout="per_channel", input_dtype="fp16",
                           gate_dtype="bf16", output_dtype="fp16")  # fmt: skip
    assert len(longest.name) <= MAX_NAME_LEN


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec file") as info:
        load_spec(tmp_path / "nope.yaml")
    assert info.value.source == str(tmp_path / "nope.yaml")


def test_unsafe_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: x\ndescription: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpecError):
        load_spec(path)
    assert not marker.exists()


# --- spec_from_dict -------------------------------------------------------------------------------------


def test_spec_from_dict_errors_have_no_line() -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict({"name": "x", "recurrence": {"head_dim": 24}})
    assert info.value.line is None
    assert str(info.value) == "<dict>: recurrence.head_dim: got 24 (int); allowed: 16, 32, 64"
    with pytest.raises(SpecError) as info:
        spec_from_dict({"name": "x", "target": {"archs": ["sm_90a", "sm_80"], "cluster_size": 2}}, source="cfg")
    assert str(info.value).startswith("cfg: target.cluster_size: ")
    assert "sm_80 has none" in str(info.value)


@pytest.mark.parametrize(
    "d, field",
    [
        ([], None),
        ({}, "name"),
        ({"name": "x", "extra": 1}, "extra"),
        ({"name": "x", "recurrence": {"dtypes": {"input": "int8"}}}, "recurrence.dtypes.input"),
        ({"name": "x", "target": {"archs": ("sm_90a", 90)}}, "target.archs[1]"),
        ({"name": "x", "target": {"carriers": "halo"}}, "target.carriers"),
    ],
)
def test_spec_from_dict_rejects(d, field) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict(d)
    assert (info.value.field, info.value.line, info.value.source) == (field, None, "<dict>")


def test_spec_from_dict_accepts_tuple_archs() -> None:
    spec = spec_from_dict({"name": "x", "target": {"archs": ("sm_80", "sm_90a")}})
    assert spec.target.archs == ("sm_80", "sm_90a")


# --- the dataclasses directly ---------------------------------------------------------------------------


def test_dataclasses_are_frozen_validated_and_hashable() -> None:
    spec = Spec(name="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "y"  # type: ignore[misc]
    assert hash(spec) == hash(Spec(name="x"))
    assert Target(archs=["sm_80"]).archs == ("sm_80",)  # normalised to a tuple
    with pytest.raises(SpecError, match=re.escape("target.archs: expected a list")):
        Target(archs="sm_90a")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=re.escape("recurrence.head_dim")):
        Recurrence(head_dim=24)
    with pytest.raises(SpecError, match="tiles in flight"):
        Spec(name="x", recurrence=Recurrence(block_len=64), target=Target(tiles_in_flight=4))  # 32 x 4 > 64


def test_spec_error_pickles() -> None:
    err = SpecError("got 24 (int)", field="recurrence.head_dim", source="a.yaml", line=3, allowed="16, 32, 64")
    again = pickle.loads(pickle.dumps(err))
    assert (again.field, again.source, again.line, again.allowed) == (err.field, err.source, 3, err.allowed)
    assert str(again) == str(err) == "a.yaml:3: recurrence.head_dim: got 24 (int); allowed: 16, 32, 64"


# --- replace_target / replace_recurrence ----------------------------------------------------------------


def test_replace_target() -> None:
    spec = load_spec(SPECS_DIR / "hopper_k2.yaml")
    tuned = spec.replace_target(warps_per_cta=8, cluster_size=2)
    assert (tuned.target.warps_per_cta, tuned.target.cluster_size) == (8, 2)
    assert tuned.recurrence == spec.recurrence and tuned.name == spec.name
    assert (spec.target.warps_per_cta, spec.target.cluster_size) == (4, 1)  # original untouched
    assert spec.replace_target(carriers={"warp": "registers"}).target.carriers == Carriers()
    assert spec.replace_target(archs=["sm_80"]).target.archs == ("sm_80",)


@pytest.mark.parametrize(
    "kw, field, fragment",
    [
        ({"warps_per_cta": 3}, "target.warps_per_cta", "allowed: 1, 2, 4, 8, 16, 32"),
        ({"warps_per_cta": 8.0}, "target.warps_per_cta", "expected an integer"),
        ({"tiles_per_warp": 0}, "target.tiles_per_warp", "allowed: 1..65536"),
        ({"tiles_in_flght": 2}, "target.tiles_in_flght", "did you mean 'tiles_in_flight'?"),
        ({"archs": ["sm_80"], "cluster_size": 2}, "target.cluster_size", "sm_80 has none"),
        ({"archs": []}, "target.archs", "empty"),
        ({"carriers": {"cta": "dsmem"}}, "target.carriers.cta", "allowed: halo"),
    ],
)
def test_replace_target_validates(kw, field, fragment) -> None:
    spec = load_spec(SPECS_DIR / "hopper_k2.yaml")
    with pytest.raises(SpecError) as info:
        spec.replace_target(**kw)
    assert info.value.field == field and fragment in str(info.value)
    assert info.value.source == spec.source


def test_replace_recurrence() -> None:
    spec = load_spec(SPECS_DIR / "hopper_k2.yaml")
    assert spec.replace_recurrence(window_blocks=4).recurrence.window_blocks == 4
    with pytest.raises(SpecError, match=re.escape("recurrence.dtypes.output")):
        spec.replace_recurrence(input_dtype="fp16", output_dtype="bf16")
    with pytest.raises(SpecError, match="a tile that does not fit"):
        spec.replace_target(tiles_in_flight=4).replace_recurrence(block_len=64)  # 32 tokens x 4 > 64
    fits = spec.replace_target(tiles_in_flight=2).replace_recurrence(block_len=64)
    assert fits.recurrence.block_len == 64
    with pytest.raises(SpecError, match="did you mean 'head_dim'"):
        spec.replace_recurrence(headdim=32)


# --- default_spec ---------------------------------------------------------------------------------------


def test_default_spec() -> None:
    spec = default_spec()
    assert spec.name == "swr_dh16_bl16_k2_bf16_fp32_ph"
    assert spec.recurrence == Recurrence()
    assert spec.target == Target()
    assert default_spec() == spec and default_spec().digest() == spec.digest()


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"window_blocks": 3}, "swr_dh16_bl16_k3_bf16_fp32_ph"),
        ({"head_dim": 64, "block_len": 32}, "swr_dh64_bl32_k2_bf16_fp32_ph"),
        ({"input_dtype": "fp16", "output_dtype": "fp16"}, "swr_dh16_bl16_k2_fp16_fp16_ph"),
        ({"gate_layout": "per_channel"}, "swr_dh16_bl16_k2_bf16_fp32_pc"),
        ({"gate_dtype": "fp32"}, "swr_dh16_bl16_k2_bf16_fp32_ph_gfp32"),
        ({"block_len": 64, "window_blocks": 1}, "swr_dh16_bl64_k1_bf16_fp32_ph"),
    ],
)
def test_default_spec_naming(kw, name) -> None:
    spec = default_spec(**kw)
    assert spec.name == name
    assert spec.target.tiles_in_flight <= C.MAX_TOKENS_IN_FLIGHT_PER_LANE // C.tokens_per_lane(
        spec.recurrence.block_len
    )


def test_default_spec_names_are_distinct_per_recurrence() -> None:
    combos = [
        {
            "head_dim": dh,
            "block_len": bl,
            "window_blocks": k,
            "input_dtype": i,
            "gate_dtype": g,
            "gate_layout": lay,
        }
        for dh in C.HEAD_DIMS
        for bl in C.BLOCK_LENS
        for k in (1, 2, C.MAX_WINDOW_BLOCKS)
        for i in C.DTYPES
        for g in C.DTYPES
        for lay in C.GATE_LAYOUTS
    ]
    names = {default_spec(**kw).name for kw in combos}
    assert len(names) == len(combos)


def test_default_spec_validates_and_cache_does_not_conflate_types() -> None:
    assert default_spec(window_blocks=1).recurrence.window_blocks == 1
    with pytest.raises(SpecError, match="got True"):
        default_spec(window_blocks=True)  # equal to 1 as a dict key, still rejected
    with pytest.raises(SpecError, match=re.escape("got 16.0")):
        default_spec(head_dim=16.0)
    with pytest.raises(SpecError, match="did you mean 'window_blocks'"):
        default_spec(window_block=2)
    with pytest.raises(SpecError, match="writes Z for the output projection"):
        default_spec(fused_gating=True)  # fp32 output: Z must be in the input dtype
    assert default_spec(fused_gating=True, output_dtype="bf16").name.endswith("_fused")
