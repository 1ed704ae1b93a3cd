"""The GGUF header: a bounds-checked cursor over the mapped file, the metadata, the tensor records.

Parsed here rather than with `gguf.GGUFReader`: that reader trusts every declared length (a corrupt
count can make it allocate or loop for a very long time) and builds one numpy array per vocabulary
entry (2 s for SmolLM2's header). This parser checks each count and length against the bytes left in
the file, so a corrupt or truncated file fails in milliseconds with a one-line `GGUFError`.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xqcli.errors import GGUFError

HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
NOT_GGUF_HINT = "pass a .gguf model file (download it again if it was cut short)"
DAMAGED_HINT = "the file is cut short or damaged: download it again"
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# GGUF metadata value types: scalar id -> (struct format, numpy dtype for arrays)
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
    6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4  # arrays of arrays; real files never nest


@dataclass
class TensorInfo:
    """One tensor record of the header; its data is read later, by `tensors.read_tensors`."""

    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the contiguous (input) axis
    type_id: int
    offset: int  # from the start of the data section

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


def corrupt_header(path: Path, detail: str, truncated: bool = False) -> GGUFError:
    """A header that cannot be what a GGUF writer wrote: a download cut short, or a damaged file."""
    return GGUFError(f"{path}: {'truncated or ' if truncated else ''}corrupt GGUF header: {detail}", hint=DAMAGED_HINT)


class _Cursor:
    """Bounds-checked reads from the mapped file: no declared length is trusted past the file's end."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path) -> None:
        self.buf, self.end, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> GGUFError:
        return corrupt_header(self.path, f"{what} at byte {self.pos} runs past the end of the {self.end}-byte file",
                              truncated=True)

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise self.fail(what)

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        try:
            s = str(self.buf[self.pos:self.pos + n], "utf-8")
        except UnicodeDecodeError:
            raise corrupt_header(self.path, f"{what} at byte {self.pos} is not UTF-8") from None
        self.pos += n
        return s

    def strings(self, count: int, what: str) -> list[str]:
        # The hot loop of the header (two ~50k-entry vocab arrays), hence the locals.
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        out = []
        append = out.append
        try:
            for _ in range(count):
                if pos + 8 > end:
                    break
                (n,) = unpack(buf, pos)
                pos += 8
                if n > end - pos:
                    break
                append(str(buf[pos:pos + n], "utf-8"))
                pos += n
        except UnicodeDecodeError:
            self.pos = pos
            raise corrupt_header(self.path, f"entry {len(out)} of {what} at byte {pos} is not UTF-8") from None
        self.pos = pos
        if len(out) < count:
            raise self.fail(f"entry {len(out)} of {what}")
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype][0]
            n = struct.calcsize(fmt)
            self.need(n, what)
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
            self.pos += n
            # float32 values read back as their shortest decimal (1e-05, not 9.999999747378752e-06)
            return short_float32(v) if vtype == _FLOAT32 else v
        if vtype == _ARRAY and depth < _MAX_NESTING:
            itype, count = self.u32(what), self.u64(what)
            if itype in _SCALARS:
                import numpy as np

                dtype = np.dtype(_SCALARS[itype][1])
                self.need(count * dtype.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return arr.tolist()
            if itype == _STRING:
                self.need(count * 8, what)
                return self.strings(count, what)
            if itype == _ARRAY:
                self.need(count * 12, what)
                return [self.value(_ARRAY, what, depth + 1) for _ in range(count)]
            raise corrupt_header(self.path, f"{what} has unknown array item type {itype}")
        raise corrupt_header(self.path, f"{what} has unknown value type {vtype}")


def short_float32(v: float) -> float:
    import numpy as np

    return float(str(np.float32(v)))  # numpy prints the shortest decimal that round-trips


def read_header(buf: mmap.mmap, size: int, path: Path) -> tuple[dict[str, Any], list[TensorInfo], int]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    magic, version, n_tensors, n_kv = HEADER.unpack_from(buf, 0)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')", hint=NOT_GGUF_HINT)
    if version not in (2, 3):
        if struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
            raise GGUFError(f"{path}: big-endian GGUF files are not supported")
        raise GGUFError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    # Every metadata entry takes at least 13 bytes, every tensor record at least 32.
    if n_kv > (size - HEADER.size) // 13:
        raise corrupt_header(path, f"{n_kv} metadata entries cannot fit in {size} bytes")
    if n_tensors > (size - HEADER.size) // 32:
        raise corrupt_header(path, f"{n_tensors} tensors cannot fit in {size} bytes")
    cur = _Cursor(buf, size, path)
    cur.pos = HEADER.size
    kv: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in kv:
            raise corrupt_header(path, f"metadata key {key!r} appears twice")
        kv[key] = cur.value(cur.u32(f"type of metadata {key!r}"), f"metadata {key!r}")
    infos: list[TensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise corrupt_header(path, f"tensor {name!r} has {n_dims} dimensions")
        dims = tuple(cur.u64(f"tensor {name!r}") for _ in range(n_dims))
        type_id, offset = cur.u32(f"tensor {name!r}"), cur.u64(f"tensor {name!r}")
        if name in names:
            raise corrupt_header(path, f"tensor {name!r} appears twice")
        names.add(name)
        infos.append(TensorInfo(name, dims, type_id, offset))
    alignment = kv.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise corrupt_header(path, f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    for t in infos:
        try:
            qtype = GGMLQuantizationType(t.type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(f"{path}: tensor {t.name!r} has unknown tensor type {t.type_id}") from None
        if 0 in t.dims or t.dims[0] % block:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {list(t.dims)}, impossible for {qtype.name} "
                            f"(rows must be a positive multiple of {block})")
        if t.offset % alignment:
            raise GGUFError(f"{path}: tensor {t.name!r} data offset {t.offset} is not {alignment}-byte aligned")
        nbytes = math.prod(t.dims) // block * type_size
        if data_start + t.offset + nbytes > size:
            raise GGUFError(f"{path}: tensor {t.name!r} data ({nbytes} bytes at {data_start + t.offset}) runs past "
                            f"the end of the {size}-byte file (truncated download?)", hint=DAMAGED_HINT)
    return kv, infos, data_start


def one_line(e: BaseException) -> str:
    """An exception's message on one line, for a one-line GGUFError."""
    return " ".join(str(e).split())

