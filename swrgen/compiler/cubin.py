"""Per-kernel resources read from the cubin itself, so the report never depends on ptxas' log.

A cubin is an ELF64 little-endian file with ``e_machine`` EM_CUDA (190). What this reads, per kernel (a
``STT_FUNC`` symbol with the ``STO_CUDA_ENTRY`` bit set in ``st_other``):

* **registers**: the ``EIATTR_REGCOUNT`` record of the module-wide ``.nv.info`` section. Cubins for older
  archs (sm_80, sm_86, sm_89) also keep the count in the high byte of ``sh_info`` of ``.text.<kernel>``;
  those for sm_90 and later leave that byte 0, so it is only a fallback.
* **static shared memory**: the size of the NOBITS section ``.nv.shared.<kernel>`` (absent: none). For
  sm_90 and later ptxas begins that section with 1 KB that ptxas' own report leaves out (the shared memory
  the system reserves per CTA; the section exists as soon as the kernel has static shared memory or the
  module declares ``extern __shared__``), so 1 KB less is reported: what ptxas reports. Dynamic shared
  memory is chosen at launch and is not in the cubin.
* **stack frame** (per-thread local memory): the ``EIATTR_FRAME_SIZE`` record of ``.nv.info``.

``.nv.info`` holds a list of records: u8 format, u8 attribute, u16, then a payload for the format
``EIFMT_SVAL`` only, whose size that u16 gives (for ``EIFMT_HVAL`` the u16 is the value; other formats
carry nothing more). ``EIATTR_REGCOUNT`` and ``EIATTR_FRAME_SIZE`` are SVAL records of two u32: the
function's symbol index and the value. ``tests/test_codegen.py`` checks every field against ptxas' own
``-v`` report for several specs and archs.

Spill bytes are not recorded in the cubin; only the log has them (``swrgen.compiler.nvrtc``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190
SHT_SYMTAB = 2
SHT_NOBITS = 8
STT_FUNC = 2
STO_CUDA_ENTRY = 0x10
EIFMT_SVAL = 4
EIATTR_FRAME_SIZE = 0x11
EIATTR_REGCOUNT = 0x2F
RESERVED_SHARED_BYTES = 1024  # at the start of .nv.shared.<kernel> from sm_90 on (see above)

# struct layouts (little-endian): the ELF header fields we use, a section header, a symbol.
_SHDR = struct.Struct("<IIQQQQIIQQ")  # name type flags addr offset size link info addralign entsize
_SYM = struct.Struct("<IBBHQQ")  # name info other shndx value size


class CubinError(ValueError):
    """The bytes are not a cubin this reader understands; the message says what is wrong."""


@dataclass(frozen=True)
class KernelInfo:
    registers: int
    shared_bytes: int  # static __shared__ memory per CTA
    frame_bytes: int  # stack frame per thread (local memory: arrays, spills)


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    offset: int
    size: int
    link: int
    info: int


def _string(data: bytes, table: _Section, offset: int) -> str:
    start = table.offset + offset
    end = data.find(b"\0", start, table.offset + table.size)
    if end < 0:
        raise CubinError(f"unterminated name at offset {offset} of its string table")
    return data[start:end].decode("utf-8", errors="replace")


def _sections(data: bytes) -> list[_Section]:
    if data[:4] != ELF_MAGIC:
        raise CubinError("no ELF magic (\\x7fELF)")
    if data[4] != 2 or data[5] != 1:  # EI_CLASS 64-bit, EI_DATA little-endian
        raise CubinError("not a little-endian ELF64 file")
    (machine,) = struct.unpack_from("<H", data, 18)
    if machine != EM_CUDA:
        raise CubinError(f"e_machine is {machine}, not EM_CUDA ({EM_CUDA})")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize != _SHDR.size or shnum == 0 or shstrndx >= shnum or shoff + shnum * shentsize > len(data):
        raise CubinError("section header table out of bounds")
    raw = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    for _, type_, _, _, offset, size, *_ in raw:
        if type_ != SHT_NOBITS and offset + size > len(data):
            raise CubinError("a section runs past the end of the file")
    names = _Section("", 0, raw[shstrndx][4], raw[shstrndx][5], 0, 0)
    return [_Section(_string(data, names, r[0]), r[1], r[4], r[5], r[6], r[7]) for r in raw]


def _info_records(data: bytes, section: _Section) -> dict[int, dict[int, int]]:
    """``{attribute: {symbol index: value}}`` of the two-u32 SVAL records of an ``.nv.info`` section."""
    out: dict[int, dict[int, int]] = {}
    pos, end = section.offset, section.offset + section.size
    while pos < end:
        if pos + 4 > end:
            raise CubinError(f"{section.name}: a record is cut off")
        fmt, attr, size = struct.unpack_from("<BBH", data, pos)
        pos += 4
        if fmt != EIFMT_SVAL:
            continue
        if pos + size > end:
            raise CubinError(f"{section.name}: attribute {attr:#x} runs past the section")
        if attr in (EIATTR_REGCOUNT, EIATTR_FRAME_SIZE):
            if size != 8:
                raise CubinError(f"{section.name}: attribute {attr:#x} has {size} bytes, not 8")
            symbol, value = struct.unpack_from("<II", data, pos)
            out.setdefault(attr, {})[symbol] = value
        pos += size
    return out


def read_kernels(cubin: bytes) -> dict[str, KernelInfo]:
    """Registers, static shared memory and stack frame of every kernel in ``cubin``, by name."""
    data = bytes(cubin)
    try:
        sections = _sections(data)
        reserved = RESERVED_SHARED_BYTES if cubin_sm(data) >= 90 else 0
        by_name = {s.name: s for s in sections}
        symtab = next((s for s in sections if s.type == SHT_SYMTAB), None)
        if symtab is None or symtab.link >= len(sections):
            raise CubinError("no symbol table")
        info = _info_records(data, by_name[".nv.info"]) if ".nv.info" in by_name else {}
        regcounts, frames = info.get(EIATTR_REGCOUNT, {}), info.get(EIATTR_FRAME_SIZE, {})
        kernels: dict[str, KernelInfo] = {}
        for index in range(symtab.size // _SYM.size):
            name_at, st_info, st_other, shndx, _, _ = _SYM.unpack_from(data, symtab.offset + index * _SYM.size)
            if st_info & 0xF != STT_FUNC or not st_other & STO_CUDA_ENTRY:
                continue
            name = _string(data, sections[symtab.link], name_at)
            text = sections[shndx] if shndx < len(sections) else None
            registers = regcounts.get(index) or (text.info >> 24 if text else 0)
            if not registers:
                raise CubinError(f"no register count for kernel {name}")
            if index not in frames:
                raise CubinError(f"no frame size for kernel {name}")
            shared = by_name.get(f".nv.shared.{name}")
            if shared is not None and shared.size < reserved:
                raise CubinError(f".nv.shared.{name} has {shared.size} bytes, less than the {reserved} reserved")
            kernels[name] = KernelInfo(
                registers=registers,
                shared_bytes=shared.size - reserved if shared is not None else 0,
                frame_bytes=frames[index],
            )
        if not kernels:
            raise CubinError("no kernel (no symbol marked STO_CUDA_ENTRY)")
        return kernels
    except struct.error as e:  # a field read past the end of a truncated file
        raise CubinError(f"truncated: {e}") from None


def cubin_sm(cubin: bytes) -> int:
    """The SM number (80, 90, 100, ...) the cubin was built for: bits 8-15 of ``e_flags`` in the ELF ABI
    version 8 that NVRTC 12.8+ writes ("a" and "f" variants share their base's number)."""
    data = bytes(cubin[:0x34])
    if len(data) < 0x34 or data[:4] != ELF_MAGIC:
        raise CubinError("not an ELF file")
    if data[8] != 8:
        raise CubinError(f"ELF ABI version {data[8]}; only version 8 is known")
    (flags,) = struct.unpack_from("<I", data, 0x30)
    return (flags >> 8) & 0xFF
