"""Rendering (Jinja2 templates -> CUDA) and compiling (NVRTC -> cubin) every shipped spec and a sweep of
variants, without a GPU: NVRTC and ptxas run on the CPU.

Each compile of these kernels takes about 0.5-1.5 s on a 2-core machine; the file compiles ~45 times.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import SPEC_PATHS

from swrgen import constants
from swrgen.codegen import FUSED_KERNEL_NAMES, KERNEL_NAMES, kernel_names, render_source
from swrgen.compiler import CompileError, CubinError, ResourceUsage, compile_cubin, read_kernels
from swrgen.compiler import cubin as cubin_module
from swrgen.compiler.cubin import cubin_sm
from swrgen.compiler.nvrtc import parse_resources, parse_spills, resources
from swrgen.spec import Spec, load_spec, spec_from_dict

ELF_MAGIC = b"\x7fELF"
SPEC_IDS = [p.stem for p in SPEC_PATHS]
SPEC_ARCHS = [(p, arch) for p in SPEC_PATHS for arch in load_spec(p).target.archs]


def constexpr(source: str, name: str) -> str:
    """The value of ``constexpr <type> name = <value>;`` in the rendered source."""
    m = re.search(rf"constexpr\s+\w+\s+{name}\s*=\s*([^;]+);", source)
    assert m, f"no constexpr {name} in the rendered source"
    return m.group(1).strip()


def alias(source: str, name: str) -> str:
    m = re.search(rf"using\s+{name}\s*=\s*([^;]+);", source)
    assert m, f"no `using {name} = ...;` in the rendered source"
    return m.group(1).strip()


def assert_kernels_defined(source: str, spec: Spec) -> None:
    for kernel in FUSED_KERNEL_NAMES:  # only where the spec asks for them
        if kernel not in kernel_names(spec):
            assert kernel not in source, f"{kernel} emitted without fused_gating"
    for kernel in kernel_names(spec):
        # extern "C" so the loader finds the kernel by its plain name; exactly one definition each.
        pattern = rf'extern\s+"C"\s+__global__\b[^;{{]*\b{kernel}\s*\('
        assert len(re.findall(pattern, source)) == 1, f'{kernel} is not defined exactly once as extern "C"'


def assert_source_matches_spec(source: str, spec: Spec) -> None:
    r, t = spec.recurrence, spec.target
    # Jinja tags left over ("{{ x", "{% if", "{#-"); inline PTX operands such as "{%0, %1}" are fine.
    leftover = re.search(r"\{\{\s|\{[%#][\s+\-]", source)
    assert leftover is None, f"unrendered Jinja in the source: {source[leftover.start() : leftover.start() + 40]!r}"
    assert spec.name in source
    assert constexpr(source, "kHeadDim") == str(r.head_dim)
    assert constexpr(source, "kBlockLen") == str(r.block_len)
    assert constexpr(source, "kWindow") == str(r.window_blocks)
    assert constexpr(source, "kWarpsPerCta") == str(t.warps_per_cta)
    assert constexpr(source, "kTilesInFlight") == str(t.tiles_in_flight)
    assert constexpr(source, "kPerChannelGate") == ("true" if r.gate_layout == "per_channel" else "false")
    assert constexpr(source, "kWarpSize") == str(constants.WARP_SIZE)
    assert alias(source, "in_t") == constants.CUDA_TYPES[r.input_dtype]
    assert alias(source, "gate_t") == constants.CUDA_TYPES[r.gate_dtype]
    assert alias(source, "out_t") == constants.CUDA_TYPES[r.output_dtype]
    assert_kernels_defined(source, spec)


def arch_number(arch: str) -> int:
    return int(arch.removeprefix("sm_").rstrip("af"))


def assert_report_matches_log(result) -> int:
    """The cubin-derived report agrees with ptxas' own -v report on every kernel the log reports on;
    returns how many it reports on (some NVRTC builds print none)."""
    logged = parse_resources(result.log)
    for kernel, want in logged.items():
        assert result.resources[kernel] == want, (result.arch, kernel, result.resources[kernel], want)
    return len(logged)


def assert_valid_cubin(result, arch: str, names: tuple[str, ...] = KERNEL_NAMES) -> None:
    assert result.arch == arch
    assert len(result.cubin) > 1024
    assert result.cubin[:4] == ELF_MAGIC
    assert cubin_sm(result.cubin) == arch_number(arch), "the cubin is for another arch"
    # The report comes from the cubin, so it is complete however little NVRTC's log says.
    assert set(result.resources) == set(names), "the cubin lacks kernels (or has others)"
    for kernel, usage in result.resources.items():
        assert isinstance(usage, ResourceUsage)
        assert 0 < usage.registers <= 255, (kernel, usage)
        assert usage.shared_bytes >= 0 and usage.stack_bytes >= 0, (kernel, usage)
        for spill in (usage.spill_store_bytes, usage.spill_load_bytes):
            assert spill is None or spill >= 0, (kernel, usage)
        assert kernel.encode() in result.cubin, f"symbol {kernel} missing from the cubin"
    assert_report_matches_log(result)


# --- rendering ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SPEC_PATHS, ids=SPEC_IDS)
def test_render_is_deterministic_and_matches_spec(path) -> None:
    spec = load_spec(path)
    source = render_source(spec)
    assert source == render_source(load_spec(path))
    assert_source_matches_spec(source, spec)
    assert "#include <cuda_bf16.h>" in source


def test_expected_constexprs_of_shipped_specs() -> None:
    # Spelled out per file, independent of the spec objects: the YAML values reach the CUDA constants.
    # (Only what the files compute; their tuning knobs are retuned and are checked against the spec above.)
    expected = {
        "hopper_k1": {"kWindow": "1", "kHeadDim": "16", "kBlockLen": "16"},
        "hopper_k2": {"kWindow": "2", "kHeadDim": "16", "kBlockLen": "16"},
        "hopper_k3": {"kWindow": "3", "kHeadDim": "16", "kBlockLen": "16"},
        "ampere_k2": {"kWindow": "2", "kHeadDim": "16"},
        "hopper_k2_cluster": {"kWindow": "2"},
    }
    for stem, values in expected.items():
        source = render_source(load_spec(next(p for p in SPEC_PATHS if p.stem == stem)))
        for name, value in values.items():
            assert constexpr(source, name) == value, (stem, name)
    bf16out = render_source(load_spec(next(p for p in SPEC_PATHS if p.stem == "hopper_k2_bf16out")))
    assert alias(bf16out, "out_t") == "__nv_bfloat16"
    assert "kWindow = 3;" in render_source(load_spec(next(p for p in SPEC_PATHS if p.stem == "hopper_k3")))


def test_distinct_specs_render_distinct_sources() -> None:
    # The spec name is in the source (a comment); compare what is left without it.
    sources = {p.stem: render_source(spec := load_spec(p)).replace(spec.name, "NAME") for p in SPEC_PATHS}
    # hopper_k2 and hopper_k2_cluster differ only in the cluster size, which only the launch uses; every
    # other pair of shipped specs computes something different and must differ in its source.
    compute_keys = {}
    for p in SPEC_PATHS:
        s = load_spec(p)
        compute_keys[p.stem] = (json.dumps(s.recurrence.to_dict(), sort_keys=True), s.target.warps_per_cta,
                                s.target.tiles_in_flight)  # fmt: skip
    stems = sorted(sources)
    for i, a in enumerate(stems):
        for b in stems[i + 1 :]:
            if compute_keys[a] != compute_keys[b]:
                assert sources[a] != sources[b], (a, b)


def test_render_is_independent_of_hash_seed() -> None:
    # Sets or dicts iterated in a template would make the source (and so the cache key) vary per process.
    code = (
        "import json, sys\n"
        "from swrgen.codegen import render_source\n"
        "from swrgen.spec import load_spec\n"
        "print(json.dumps({p: render_source(load_spec(p)) for p in sys.argv[1:]}))\n"
    )
    here = {str(p): render_source(load_spec(p)) for p in SPEC_PATHS}
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, *here], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here


# --- compiling the shipped specs ------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "arch"), SPEC_ARCHS, ids=[f"{p.stem}-{a}" for p, a in SPEC_ARCHS])
def test_compile_shipped_spec_for_each_target_arch(path, arch: str) -> None:
    spec = load_spec(path)
    result = compile_cubin(render_source(spec), arch)
    assert_valid_cubin(result, arch, kernel_names(spec))


def _nvrtc_archs() -> set[str]:
    from cuda.bindings import nvrtc

    err, archs = nvrtc.nvrtcGetSupportedArchs()
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    return {f"sm_{a}" for a in archs}


@pytest.mark.parametrize("arch", constants.ARCHS)
def test_compile_for_every_known_arch(arch: str) -> None:
    if arch.rstrip("a") not in _nvrtc_archs():
        pytest.skip(f"this NVRTC does not support {arch}")
    spec = _base().replace_target(archs=(arch,))
    assert_valid_cubin(compile_cubin(render_source(spec), arch), arch)


def test_every_shipped_arch_is_supported_by_nvrtc() -> None:
    # The pinned NVRTC (13.0) must be able to build every arch swrgen allows; a skip above would hide that.
    missing = {a for a in constants.ARCHS if a.rstrip("a") not in _nvrtc_archs()}
    assert not missing, f"NVRTC cannot target {sorted(missing)}"


# --- compiling variants ---------------------------------------------------------------------------------


# Fixed here, not read from specs/ or the schema defaults (both get retuned): every variant below differs
# from this base in exactly the fields it names.
BASE = {
    "name": "variant_base",
    "recurrence": {
        "head_dim": 16,
        "block_len": 16,
        "window_blocks": 2,
        "gate_layout": "per_head",
        "dtypes": {"input": "bf16", "gate": "bf16", "output": "fp32", "accum": "fp32"},
    },
    "target": {"archs": ["sm_90a"], "warps_per_cta": 4, "tiles_per_warp": 32, "tiles_in_flight": 2, "cluster_size": 1},
}


def _base() -> Spec:
    return spec_from_dict(BASE)


def _variant(rec: dict | None = None, tgt: dict | None = None) -> Spec:
    spec = _base()
    if tgt:
        spec = spec.replace_target(**tgt)
    if rec:
        spec = spec.replace_recurrence(**rec)
    return spec


# (id, recurrence changes, target changes); each is compiled for one arch, cycling through three.
VARIANTS: list[tuple[str, dict, dict]] = [
    ("block_len32", {"block_len": 32}, {"tiles_in_flight": 4}),  # 16 tokens per lane x 4 tiles in flight
    ("block_len64", {"block_len": 64}, {"tiles_in_flight": 2}),  # 32 tokens per lane x 2 tiles in flight
    ("head_dim32", {"head_dim": 32}, {}),
    ("head_dim64", {"head_dim": 64}, {}),
    ("fp16", {"input_dtype": "fp16", "gate_dtype": "fp16", "output_dtype": "fp16"}, {}),
    ("fp16_in_fp32_out", {"input_dtype": "fp16", "gate_dtype": "fp16"}, {}),
    ("fp32", {"input_dtype": "fp32", "gate_dtype": "fp32"}, {}),
    ("fp16_in_fp32_gates", {"input_dtype": "fp16", "gate_dtype": "fp32"}, {}),
    ("per_channel", {"gate_layout": "per_channel"}, {}),
    *[(f"window{k}", {"window_blocks": k}, {}) for k in range(1, constants.MAX_WINDOW_BLOCKS + 1) if k != 2],
    *[(f"warps{w}", {}, {"warps_per_cta": w}) for w in constants.WARPS_PER_CTA if w != 4],
    *[(f"in_flight{n}", {}, {"tiles_in_flight": n, **({"staging": "shared"} if n > 8 else {})})
      for n in constants.TILES_IN_FLIGHT if n != 2],
    ("shared", {}, {"staging": "shared"}),
    ("shared_min_warps16", {}, {"staging": "shared", "tiles_in_flight": 2, "min_warps_per_sm": 16}),
    ("shared_stages3_w2", {}, {"staging": "shared", "stages": 3, "warps_per_cta": 2}),
    ("shared_fp32_per_channel_k3", {"input_dtype": "fp32", "gate_dtype": "fp32", "gate_layout": "per_channel",
                                    "window_blocks": 3}, {"staging": "shared", "warps_per_cta": 2}),
    ("shared_bl64_fp16", {"block_len": 64, "input_dtype": "fp16", "gate_dtype": "fp16", "output_dtype": "fp16"},
     {"staging": "shared", "tiles_in_flight": 4, "stages": 4, "warps_per_cta": 2}),
    ("bl32_fp16_per_channel_k3", {"block_len": 32, "input_dtype": "fp16", "gate_dtype": "fp16",
                                  "gate_layout": "per_channel", "window_blocks": 3}, {"tiles_in_flight": 2}),
    ("largest", {"block_len": 64, "head_dim": 64, "window_blocks": 8, "gate_layout": "per_channel",
                 "input_dtype": "fp32", "gate_dtype": "fp32"}, {"tiles_in_flight": 1, "warps_per_cta": 32}),
    ("fused", {"fused_gating": True, "output_dtype": "bf16"}, {}),
    ("fused_fp16_k3_bl64", {"fused_gating": True, "input_dtype": "fp16", "gate_dtype": "fp16", "output_dtype": "fp16",
                            "window_blocks": 3, "block_len": 64}, {"tiles_in_flight": 2}),
    ("fused_fp32_k1_warps8", {"fused_gating": True, "input_dtype": "fp32", "gate_dtype": "fp32",
                              "window_blocks": 1}, {"warps_per_cta": 8}),
]  # fmt: skip
VARIANT_ARCHS = ("sm_90a", "sm_80", "sm_100a")


@pytest.mark.parametrize(
    ("rec", "tgt", "arch"),
    [(rec, tgt, VARIANT_ARCHS[i % len(VARIANT_ARCHS)]) for i, (_, rec, tgt) in enumerate(VARIANTS)],
    ids=[f"{name}-{VARIANT_ARCHS[i % len(VARIANT_ARCHS)]}" for i, (name, _, _) in enumerate(VARIANTS)],
)
def test_compile_variant(rec: dict, tgt: dict, arch: str) -> None:
    spec = _variant(rec, tgt)
    source = render_source(spec)
    assert_source_matches_spec(source, spec)
    assert source != render_source(_base()), "the changed knob did not reach the template"
    assert_valid_cubin(compile_cubin(source, arch), arch, kernel_names(spec))


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_min_warps_per_sm_caps_every_vector_kernel(fused: bool) -> None:
    """target.min_warps_per_sm reaches the __launch_bounds__ of every vector kernel, the fused ones too
    (they once ignored it): 12 warps of 4-warp CTAs = 3 CTAs an SM, so at most 65536 / (3 * 128) registers,
    where without the cap the backwards take more."""
    rec = {"fused_gating": True, "output_dtype": "bf16"} if fused else {}
    capped = _variant(rec, {"tiles_in_flight": 8, "min_warps_per_sm": 12})
    free = _variant(rec, {"tiles_in_flight": 8})
    bound = 65536 // (3 * 4 * 32)
    got = {n: u.registers for n, u in compile_cubin(render_source(capped), "sm_90a").resources.items()}
    vec = {n: r for n, r in got.items() if n.endswith("_vec")}
    assert vec and all(r <= bound for r in vec.values()), vec
    uncapped = compile_cubin(render_source(free), "sm_90a").resources
    assert any(uncapped[n].registers > bound for n in vec), "no kernel needed the cap: the test shows nothing"


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_kept_lookahead_scans_render_and_compile_either_way(fused: bool, monkeypatch) -> None:
    """constants.KEEP_LOOKAHEAD_SCANS switches the backward's kept reverse scans per kernel family (the
    values are the same bits either way; the GPU tests check the shipped setting). Both settings must
    render into their constexpr and compile at k = 2, so the path not shipped does not rot: the shipped
    one's training kernel without spills; the other within a few words of spills (ptxas may trade them
    for 128 registers: the plain backward with kept scans spills 28 bytes at 128 since token indices are
    32-bit, where it took 145 registers before)."""
    family, flag = ("phalanx", "kKeepFusedScans") if fused else ("swr", "kKeepScans")
    rec = {"fused_gating": True, "output_dtype": "bf16"} if fused else {}
    spec = _variant(rec, {"staging": "shared", "tiles_in_flight": 4} if not fused else None)
    shipped = constants.KEEP_LOOKAHEAD_SCANS[family] >= spec.recurrence.window_blocks
    for keep in (1, 2):
        monkeypatch.setitem(constants.KEEP_LOOKAHEAD_SCANS, family, keep)
        source = render_source(spec)
        assert f"constexpr bool {flag} = kWindow > 1 && kWindow <= {keep};" in source
        hot = compile_cubin(source, "sm_90a").resources[f"{family}_bwd_vec"]  # the one training runs
        keeps = keep >= spec.recurrence.window_blocks
        assert hot.spill_store_bytes <= (0 if keeps == shipped else 64), (keep, hot)


@pytest.mark.parametrize("hint", [0, 256])
def test_fused_l2_prefetch_hint_renders_and_compiles_either_way(hint: int, monkeypatch) -> None:
    """constants.FUSED_L2_PREFETCH_BYTES puts an L2 prefetch-size hint on the fused kernels' 16-byte block
    loads (0: plain __ldg). Both ways must render and compile without spills, the source carrying the hint
    exactly when asked (the shipped 128 is compiled by every other fused test)."""
    monkeypatch.setattr(constants, "FUSED_L2_PREFETCH_BYTES", hint)
    source = render_source(_variant({"fused_gating": True, "output_dtype": "bf16"}, None))
    body = source.split("uint4 load_row_chunk(", 1)[1].split("\n}\n", 1)[0]  # the fused block load alone
    if hint:
        assert f"ld.global.nc.L2::{hint}B.v4.u32" in body and "__ldg" not in body, body
    else:
        assert "return __ldg(p);" in body and "L2::" not in body, body
    result = compile_cubin(source, "sm_90a")
    for name in ("phalanx_fwd_vec", "phalanx_bwd_vec"):
        assert result.resources[name].spill_store_bytes == 0, (hint, name, result.resources[name])


@pytest.mark.parametrize("cta", [False, True])
def test_fused_cta_loads_render_and_compile_either_way(cta: bool, monkeypatch) -> None:
    """constants.FUSED_CTA_LOADS lets the fused forward's CTA move its heads' token rows together (the same
    bits; the GPU tests check them across warps_per_cta). Both ways must render their constexpr and compile
    without spills; with them on, the forward's shared tiles are eight a warp (B, V, C and Z by tile parity),
    two gate tiles and a bank skew, else one."""
    monkeypatch.setattr(constants, "FUSED_CTA_LOADS", cta)
    spec = _variant({"fused_gating": True, "output_dtype": "bf16"}, {"tiles_in_flight": 1, "tiles_per_warp": 32})
    source = render_source(spec)
    assert f"constexpr bool kFusedCtaLoads = {'true' if cta else 'false'} && kWarpsPerCta > 1" in source
    result = compile_cubin(source, "sm_90a")
    bl = spec.recurrence.block_len
    tile = (bl + 1) * 32  # kSmemTile: BL + 1 rows of 32 bytes
    cta_bytes = 8 * tile + 2 * 2 * bl  # two sets of B, V, C, Z tiles and of BL 16-bit gate logits
    cta_bytes += (32 - cta_bytes % 128) % 128  # the bank skew (W >= 4)
    for name in ("phalanx_fwd_vec", "phalanx_fwd_state_vec"):
        used = result.resources[name]
        assert used.spill_store_bytes == 0, (cta, name, used)
        assert used.shared_bytes == spec.target.warps_per_cta * (cta_bytes if cta else tile), (cta, name, used)
    assert result.resources["phalanx_bwd_vec"].shared_bytes == spec.target.warps_per_cta * tile


# --- errors and ptxas reports ---------------------------------------------------------------------------


def test_compile_error_has_log_and_marked_source_line() -> None:
    lines = render_source(_base()).splitlines()
    bad = "this_is_not_cuda <<< broken;"
    # Into the body of the translation unit (after the includes), so the error is in swr.cu itself.
    at = next(i for i, line in enumerate(lines) if line.startswith("namespace swr")) + 1
    lines.insert(at, bad)
    source = "\n".join(lines) + "\n"
    line_no = at + 1  # 1-based
    with pytest.raises(CompileError) as info:
        compile_cubin(source, "sm_90a")
    message = str(info.value)
    assert "sm_90a" in message and "NVRTC_ERROR_COMPILATION" in message
    assert f"swr.cu({line_no}): error" in message  # NVRTC's own log
    assert f">{line_no:5d} | {bad}" in message  # the offending line, marked
    assert f" {line_no - 1:5d} | {lines[at - 1]}" in message  # and unmarked context around it
    assert f" {line_no + 1:5d} | {lines[at + 1]}" in message


def test_compile_error_for_unknown_arch() -> None:
    with pytest.raises(CompileError, match=r"sm_1\b.*NVRTC_ERROR_INVALID_OPTION"):
        compile_cubin(render_source(_base()), "sm_1")


SAMPLE_PTXAS_LOG = """\
ptxas info    : 57 bytes gmem
ptxas info    : Function properties for _ZN3swr6helperEPfi
ptxas         .     24 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'swr_fwd_vec' for 'sm_90a'
ptxas info    : Function properties for swr_fwd_vec
ptxas         .     216 bytes stack frame, 228 bytes spill stores, 216 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 216 bytes cumulative stack size, 4096 bytes smem
ptxas info    : Compile time = 36.302 ms
ptxas info    : Compiling entry function 'swr_bwd_vec' for 'sm_90a'
ptxas info    : Function properties for swr_bwd_vec
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 0 barriers
ptxas info    : Compile time = 35.988 ms
ptxas info    : Compiling entry function 'old_style' for 'sm_80'
ptxas info    : Function properties for old_style
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 20 registers, 1024 bytes smem, 360 bytes cmem[0]
"""


def test_parse_resources_sample_log() -> None:
    usage = parse_resources(SAMPLE_PTXAS_LOG)
    assert usage == {
        "swr_fwd_vec": ResourceUsage(registers=64, shared_bytes=4096, stack_bytes=216, spill_store_bytes=228,
                                     spill_load_bytes=216),
        "swr_bwd_vec": ResourceUsage(registers=96, shared_bytes=0, stack_bytes=0, spill_store_bytes=0,
                                     spill_load_bytes=0),
        "old_style": ResourceUsage(registers=20, shared_bytes=1024, stack_bytes=8, spill_store_bytes=4,
                                   spill_load_bytes=12),
    }  # fmt: skip
    assert parse_resources("") == {}
    assert parse_resources("ptxas info    : 0 bytes gmem\n") == {}


def test_parse_spills_sample_log() -> None:
    assert parse_spills(SAMPLE_PTXAS_LOG) == {
        "_ZN3swr6helperEPfi": (0, 0),
        "swr_fwd_vec": (228, 216),
        "swr_bwd_vec": (0, 0),
        "old_style": (4, 12),
    }
    assert parse_spills("") == {}
    # Only the line right after "Function properties for": a stray stack line belongs to no function.
    stray = (
        "ptxas info    : Function properties for k\nptxas info    : Used 8 registers\n"
        "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
    )
    assert parse_spills(stray) == {}


# --- the resource report, read from the cubin -----------------------------------------------------------


# Checked against ptxas' -v report on four archs: a spec that spills (and so has a stack frame) on each of
# them, and one with shared staging (on sm_90+ ptxas starts each kernel's shared section with 1 KB it does
# not report; swrgen.compiler.cubin takes it off).
REPORT_CASES = {
    "spills": ({"block_len": 64, "head_dim": 64, "window_blocks": 8, "gate_layout": "per_channel",
                "input_dtype": "fp32", "gate_dtype": "fp32"}, {"tiles_in_flight": 1, "warps_per_cta": 32}),
    "shared_staging": ({}, {"staging": "shared"}),
}  # fmt: skip
REPORT_ARCHS = ("sm_80", "sm_90a", "sm_100a", "sm_120")


@pytest.mark.parametrize("arch", REPORT_ARCHS)
@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_report_from_cubin_matches_ptxas_log(case: str, arch: str) -> None:
    spec = _variant(*REPORT_CASES[case])
    result = compile_cubin(render_source(spec), arch)
    assert_valid_cubin(result, arch, kernel_names(spec))
    if assert_report_matches_log(result) == 0:
        pytest.skip("this NVRTC prints no ptxas report to check against")
    assert assert_report_matches_log(result) == len(kernel_names(spec))
    if case == "spills":  # the case exercises what it is meant to
        assert all(u.spill_store_bytes and u.stack_bytes for u in result.resources.values()), result.resources


HANDWRITTEN = r"""
extern "C" __global__ void static_smem(float* out, const float* in) {
  __shared__ float buf[100];
  buf[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = buf[99 - threadIdx.x];
}
__device__ __noinline__ float helper(const float* p, int n) {
  float local[32];
  for (int j = 0; j < 32; ++j) local[j] = p[j + n];
  return local[n & 31];
}
extern "C" __global__ void with_frame(float* out, int n) { out[threadIdx.x] = helper(out, n + threadIdx.x); }
extern "C" __global__ void plain(float* out) { out[threadIdx.x] = 1.0f; }
"""


@pytest.mark.parametrize("arch", REPORT_ARCHS)
def test_report_of_handwritten_kernels(arch: str) -> None:
    result = compile_cubin(HANDWRITTEN, arch, name="probe.cu")
    assert_valid_cubin(result, arch, ("static_smem", "with_frame", "plain"))
    usage = result.resources
    assert usage["static_smem"].shared_bytes == 400  # exactly the kernel's own, on every arch
    assert usage["plain"].shared_bytes == usage["with_frame"].shared_bytes == 0
    assert usage["with_frame"].stack_bytes > 0 and usage["plain"].stack_bytes == 0
    # Spills come from the log alone: 0 where this NVRTC's log reports the kernel, None (unknown) where it is
    # silent (NVRTC 13.0 on the GPU machine prints no ptxas lines for some kernels), never a made-up number.
    has_line = "Compiling entry function 'plain'" in result.log
    assert usage["plain"].spill_store_bytes == (0 if has_line else None)


def test_report_does_not_need_the_log() -> None:
    result = compile_cubin(HANDWRITTEN, "sm_90a", name="probe.cu")
    # An NVRTC that prints nothing: the same report, spills unknown (None), never a made-up 0.
    silent = resources(result.cubin, "")
    assert set(silent) == set(result.resources)
    for kernel, usage in silent.items():
        full = result.resources[kernel]
        assert (usage.registers, usage.shared_bytes, usage.stack_bytes) == (full.registers, full.shared_bytes,
                                                                              full.stack_bytes)  # fmt: skip
        assert usage.spill_store_bytes is None and usage.spill_load_bytes is None
    # A log with the per-function properties but no "Used N registers" lines (seen on a GPU machine's NVRTC).
    no_used = "\n".join(line for line in result.log.splitlines() if "Used " not in line)
    assert parse_resources(no_used) == {}
    assert resources(result.cubin, no_used) == result.resources


def _elf_with(cubin: bytes, offset: int, data: bytes) -> bytes:
    return cubin[:offset] + data + cubin[offset + len(data) :]


def test_cubin_reader_rejects_what_it_cannot_read() -> None:
    cubin = compile_cubin(HANDWRITTEN, "sm_80", name="probe.cu").cubin
    assert set(read_kernels(cubin)) == {"static_smem", "with_frame", "plain"}
    bad = {  # damaged bytes -> what the error says
        b"\0" + cubin[1:]: "no ELF magic",
        _elf_with(cubin, 4, b"\x01"): "not a little-endian ELF64 file",
        _elf_with(cubin, 18, (62).to_bytes(2, "little")): "e_machine is 62, not EM_CUDA",  # x86-64
        cubin[: len(cubin) // 2]: "section header table out of bounds",
        cubin[:40]: "truncated",
        _elf_with(cubin, 8, b"\x07"): "ELF ABI version 7; only version 8",
    }
    for data, message in bad.items():
        with pytest.raises(CubinError, match=message):
            read_kernels(data)
    with pytest.raises(CubinError):
        read_kernels(b"")


def _without_regcount_records(cubin: bytes) -> bytes:
    """The cubin with its EIATTR_REGCOUNT records renamed to an attribute nobody reads."""
    (info,) = [s for s in cubin_module._sections(cubin) if s.name == ".nv.info"]
    head = bytes([cubin_module.EIFMT_SVAL, cubin_module.EIATTR_REGCOUNT, 8, 0])
    body = cubin[info.offset : info.offset + info.size]
    assert body.count(head) == 3  # one per kernel
    return (
        cubin[: info.offset]
        + body.replace(head, bytes([cubin_module.EIFMT_SVAL, 0x7F, 8, 0]))
        + cubin[info.offset + info.size :]
    )


def test_register_count_fallback_of_older_archs() -> None:
    # sm_80 cubins also keep the count in the high byte of .text.<kernel>'s sh_info; sm_90 and later do not.
    for arch in ("sm_80", "sm_90a"):
        cubin = compile_cubin(HANDWRITTEN, arch, name="probe.cu").cubin
        stripped = _without_regcount_records(cubin)
        if arch == "sm_80":
            assert read_kernels(stripped) == read_kernels(cubin)
        else:
            with pytest.raises(CubinError, match="no register count for kernel"):
                read_kernels(stripped)


def test_parse_resources_of_real_compile_with_shared_memory() -> None:
    source = r"""
extern "C" __global__ void smem_kernel(float* out) {
  __shared__ float buf[256];
  buf[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = buf[255 - threadIdx.x];
}
extern "C" __global__ void plain_kernel(float* out) { out[threadIdx.x] = 1.0f; }
"""
    result = compile_cubin(source, "sm_80", name="probe.cu")
    assert set(result.resources) == {"smem_kernel", "plain_kernel"}
    assert result.resources["smem_kernel"].shared_bytes == 256 * 4
    assert result.resources["plain_kernel"].shared_bytes == 0
    assert all(u.registers > 0 for u in result.resources.values())
    assert result.resources_json()["smem_kernel"]["shared_bytes"] == 1024
