"""The device view of one cached token stream, shared by the fused attention and XQuant-CL kernels.

A stream holds, for each row b of a batch, the tokens 0, 1, ... of one cached tensor of width C
(X, a latent X·U, pre-RoPE K or V):

- tokens ``t < sealed[b]`` as packed codes with fp16 scale/zero (``xqcli.kernels.quant`` layout);
- tokens ``sealed[b] <= t`` in full precision (the residual window, plus the not yet sealed part of a
  per-channel block), in one of two tail layouts:
  shifted (``ring=False``): ``tail[b, t - sealed[b]]``, how ``xqcli.cache.stream.Stream`` stores a row
  today (``codes``/``scale``/``zero`` of shape ``(B, max_len, ...)``, ``tail`` (B, tail_cap, C));
  ring (``ring=True``): ``tail[b, t % cap]`` with cap = the tail's rows, how ``stream_append`` stores
  it on the device (docs/design.md §6), so appending never moves the tail.

A cache passes its buffers as they are, with no copy. A dense stream (``PackedStream.dense``) has no
codes: every token is in ``tail``.

``PagedStream`` is the same stream with its sealed tokens in pages of ``page`` token rows shared by a
batch and found through each row's block table (vLLM's paged cache, ``xqcli.vllm_plugin.pages``): token
t of row b is row ``t % page`` of page ``block_table[b, t // page]``. A page row holds the bytes of every
stream of a layer; one stream's part of a row (``PageFormat``) is its packed codes, then its fp16 scales,
then its fp16 zeros. Per-token streams keep their own scales and zeros in the row. Per-channel streams
have one group per channel per page, so a page is their group; its C scales are 2·C bytes spread over the
page's rows, ``half_bytes`` of them per row in row order, and likewise its zeros.

Kernels read a stream only through ``_common.load_tile``, which takes ``args()``, ``strides()`` and
``meta()`` of these classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from xqcli.kernels._common import FLOATS
from xqcli.kernels.quant import QTensor, QuantSpec, dequantize_ref, packed_width

__all__ = ["PackedStream", "PageFormat", "PagedStream"]

_FP16 = 2  # bytes of an fp16 scale or zero


@dataclass(frozen=True)
class PackedStream:
    """One cached stream per row: ``sealed[b]`` quantized tokens, then full-precision ``tail`` tokens.

    tail:   (B, TL, C) fp16/bf16/fp32; row b's token ``t >= sealed[b]`` is ``tail[b, t - sealed[b]]``,
            or ``tail[b, t % TL]`` with ``ring``.
    sealed: (B,) int32/int64, on the tensors' device.
    codes:  uint8 (B, S, packed_width(C, bits)), or None for a dense stream (sealed must be 0).
    scale, zero: fp16, token axis (B, S, ceil(C / g)); channel axis (B, ceil(S / g), C), where a
            channel group is the tokens ``[j·g, (j+1)·g)`` of the row.
    spec:   the QuantSpec of the codes (bits, group_size, axis; clip does not matter to decode).
    The stream's width C is the tail's last dimension (the tail may hold 0 tokens). Values are not
    checked on the device (that would sync): a row's tail must hold seq_lens[b] − sealed[b] tokens,
    and codes/scales must cover its sealed tokens (the references raise when they do not).
    ring:   the tail is a ring buffer (``stream_append``), not shifted to the first unsealed token.
    """

    tail: Tensor
    sealed: Tensor
    codes: Tensor | None = None
    scale: Tensor | None = None
    zero: Tensor | None = None
    spec: QuantSpec | None = None
    ring: bool = False

    @classmethod
    def dense(cls, x: Tensor, sealed: Tensor | None = None) -> PackedStream:
        """A stream whose every token is full precision: x (B, S, C). `sealed`: zeros of shape (B,),
        int32, when the caller already has them (decode steps reuse one for every layer)."""
        if sealed is None:
            sealed = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
        return cls(tail=x, sealed=sealed)

    @property
    def c(self) -> int:
        return self.tail.shape[-1]

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    def check(self, op: str, name: str, batch: int, device: torch.device) -> None:
        """Raise ValueError naming ``op`` and ``name`` unless shapes, dtypes and devices fit."""
        where = f"{op}: stream {name}"
        t = self.tail
        if t.dim() != 3 or t.shape[0] != batch or t.dtype not in FLOATS:
            raise ValueError(f"{where}: tail must be a (B={batch}, TL, C) float tensor, "
                             f"got {t.dtype} {tuple(t.shape)}")
        s = self.sealed
        if s.shape != (batch,) or s.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where}: sealed must be int32/int64 of shape ({batch},), "
                             f"got {s.dtype} {tuple(s.shape)}")
        tensors = {"tail": t, "sealed": s}
        if self.codes is not None:
            spec = self.spec
            if spec is None or self.scale is None or self.zero is None:
                raise ValueError(f"{where}: codes need scale, zero and spec")
            cd, c = self.codes, self.c
            pw = packed_width(c, spec.bits)
            if cd.dtype != torch.uint8 or cd.dim() != 3 or cd.shape[0] != batch or cd.shape[2] != pw:
                raise ValueError(
                    f"{where}: codes must be uint8 (B={batch}, S, packed_width({c}, {spec.bits})="
                    f"{packed_width(c, spec.bits)}), got {cd.dtype} {tuple(cd.shape)}"
                )
            n = cd.shape[1]
            g = spec.group_size
            want = (batch, n, math.ceil(c / g)) if spec.axis == "token" else (batch, math.ceil(n / g), c)
            for nm, z in (("scale", self.scale), ("zero", self.zero)):
                if z.dtype != torch.float16 or tuple(z.shape) != want:
                    raise ValueError(f"{where}: {nm} must be fp16 {want} ({spec.axis} axis), "
                                     f"got {z.dtype} {tuple(z.shape)}")
            tensors |= {"codes": cd, "scale": self.scale, "zero": self.zero}
        for nm, z in tensors.items():
            if z.device != device:
                raise ValueError(f"{where}: {nm} is on {z.device}, expected {device}")
            if z.dim() > 1 and z.stride(-1) != 1:
                raise ValueError(f"{where}: {nm} must have a unit stride on its last axis")

    def values_ref(self, b: int, n: int) -> Tensor:
        """Row b's first n tokens as float32 (n, C): dequantized codes (quant refs), then the tail."""
        ns = min(int(self.sealed[b]), n) if self.codes is not None else 0
        parts = []
        if ns:
            spec = self.spec
            rows = ns if spec.axis == "token" else math.ceil(ns / spec.group_size)
            q = QTensor(self.codes[b, :ns], self.scale[b, :rows], self.zero[b, :rows], spec,
                        torch.Size((ns, self.c)), torch.float32)
            parts.append(dequantize_ref(q, torch.float32))
        if n - ns > self.tail.shape[1]:
            raise ValueError(f"row {b}: {n - ns} tail tokens needed but the tail holds {self.tail.shape[1]}")
        if self.ring:
            slots = torch.arange(ns, n, device=self.tail.device) % self.tail.shape[1]
            parts.append(self.tail[b, slots].float())
        else:
            parts.append(self.tail[b, : n - ns].float())
        return torch.cat(parts)

    def args(self) -> tuple:
        """(codes, scale, zero, tail, sealed, block table) for a launch; absent codes become the tail and the
        block table `sealed` (never read)."""
        tail = _launch_tail(self.tail)
        codes = self.codes if self.codes is not None else tail
        scale = self.scale if self.scale is not None else tail
        zero = self.zero if self.zero is not None else tail
        return codes, scale, zero, tail, self.sealed, self.sealed

    def strides(self) -> tuple[int, int, int, int, int, int, int]:
        """(codes b, codes t, scale b, scale t-or-block, tail b, tail t, block table b) element strides."""
        codes, scale, _, tail, _, _ = self.args()
        return (codes.stride(0), codes.stride(1), scale.stride(0), scale.stride(1), tail.stride(0), tail.stride(1),
                0)

    def meta(self, tile_t: int, tile_c: int, prefix: str = "") -> dict:
        """Constexprs of ``_common.load_tile`` (BITS, GS, PER_CHANNEL, HAS_CODES, ALIGNED, RING, PAGE), names
        prefixed.

        ``tile_t`` / ``tile_c``: the tokens / channels of the kernel's tiles, whose first token and
        channel are multiples of them. A tile sits in one group when its size divides the group.
        RING: the ring's capacity (the tail's rows, static per stream), 0 for the shifted layout.
        """
        spec = self.spec
        if self.codes is None:
            m = {"BITS": 8, "GS": 1, "PER_CHANNEL": False, "HAS_CODES": False, "ALIGNED": False}
        else:
            g, per_channel = spec.group_size, spec.axis == "channel"
            m = {"BITS": spec.bits, "GS": g, "PER_CHANNEL": per_channel, "HAS_CODES": True,
                 "ALIGNED": g % (tile_t if per_channel else tile_c) == 0}
        m["RING"] = self.args()[3].shape[1] if self.ring else 0
        m["PAGE"] = 0
        return {prefix + key: val for key, val in m.items()}


def _launch_tail(tail: Tensor) -> Tensor:
    """The tail a launch gets: an empty one becomes one zero row (a pointer the kernels never read)."""
    return tail if tail.shape[1] else tail.new_zeros(tail.shape[0], 1, tail.shape[2])


@dataclass(frozen=True)
class PageFormat:
    """One quantized stream's bytes in a page row (module docstring): codes, scales, zeros."""

    width: int  # values per token (C)
    spec: QuantSpec
    page: int  # token rows per page (the group size of a per-channel stream)

    def __post_init__(self) -> None:
        if self.spec.axis == "channel" and self.spec.group_size != self.page:
            raise ValueError(f"a per-channel stream needs pages of its group size {self.spec.group_size} tokens, "
                             f"got {self.page}")

    @property
    def code_bytes(self) -> int:
        return packed_width(self.width, self.spec.bits)

    @property
    def groups(self) -> int:
        """fp16 (scale, zero) pairs per token (token axis) or per page (channel axis)."""
        return math.ceil(self.width / self.spec.group_size) if self.spec.axis == "token" else self.width

    @property
    def half_bytes(self) -> int:
        """Bytes of scales in each row, and as many of zeros: a token's own (token axis), or a row's share of
        the page's (channel axis)."""
        if self.spec.axis == "token":
            return _FP16 * self.groups
        return math.ceil(_FP16 * self.groups / self.page)

    @property
    def row_bytes(self) -> int:
        return self.code_bytes + 2 * self.half_bytes

    def encode_tokens(self, q: QTensor) -> Tensor:
        """(T, row_bytes) uint8 of T tokens quantized per token."""
        return torch.cat([q.packed, q.scale.view(torch.uint8), q.zero.view(torch.uint8)], dim=-1)

    def encode_page(self, q: QTensor) -> Tensor:
        """(page, row_bytes) uint8 of one page quantized per channel (scale and zero of shape (1, C))."""
        halves = [self._spread(t.reshape(-1).view(torch.uint8)) for t in (q.scale, q.zero)]
        return torch.cat([q.packed, *halves], dim=-1)

    def _spread(self, blob: Tensor) -> Tensor:
        """A page's 2·C bytes of scales (or zeros) over its rows, half_bytes per row, zero-padded."""
        flat = blob.new_zeros(self.page * self.half_bytes)
        flat[:blob.numel()] = blob
        return flat.view(self.page, self.half_bytes)

    def decode(self, rows: Tensor, dtype: torch.dtype = torch.float32) -> QTensor:
        """The QTensor of (n, row_bytes) rows of this stream; per channel n is whole pages."""
        n = rows.shape[0]
        codes = rows[:, :self.code_bytes]
        halves = rows[:, self.code_bytes:]
        if self.spec.axis == "token":
            scale, zero = _fresh(halves).view(torch.float16).split(self.groups, dim=-1)
        else:
            if n % self.page:
                raise ValueError(f"per-channel rows must be whole pages of {self.page}, got {n}")
            pages = halves.reshape(n // self.page, self.page, 2, self.half_bytes).transpose(1, 2)
            blobs = pages.reshape(n // self.page, 2, self.page * self.half_bytes)[..., :_FP16 * self.groups]
            blobs = _fresh(blobs).view(torch.float16)
            scale, zero = blobs[:, 0], blobs[:, 1]  # (pages, C)
        return QTensor(packed=codes.contiguous(), scale=scale.contiguous(), zero=zero.contiguous(), spec=self.spec,
                       shape=torch.Size((n, self.width)), dtype=dtype)


def _fresh(t: Tensor) -> Tensor:
    """A copy with row-major strides and offset 0, so its bytes can be reinterpreted as fp16."""
    return t.clone(memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class PagedStream:
    """One cached stream per row, its sealed tokens in shared pages found through block tables (module docstring).

    pages:       uint8 (num_pages, page, row_bytes): every stream of a layer; this one starts at byte ``offset``
                 of a row, in ``fmt``'s layout.
    block_table: (B, max_pages) int32/int64: row b's token t is in page ``block_table[b, t // page]``.
    tail, sealed: as in ``PackedStream`` (shifted layout): ``tail[b, t - sealed[b]]`` for ``t >= sealed[b]``;
                 a per-channel stream's sealed count is a multiple of the page (its unsealed page waits in
                 full precision), a per-token stream's is usually the row's length (an empty tail).
    """

    pages: Tensor
    block_table: Tensor
    offset: int
    fmt: PageFormat
    tail: Tensor
    sealed: Tensor

    @property
    def c(self) -> int:
        return self.fmt.width

    @property
    def spec(self) -> QuantSpec:
        return self.fmt.spec

    @property
    def quantized(self) -> bool:
        return True

    def check(self, op: str, name: str, batch: int, device: torch.device) -> None:
        """Raise ValueError naming ``op`` and ``name`` unless shapes, dtypes and devices fit."""
        where = f"{op}: paged stream {name}"
        p, bt, t, s = self.pages, self.block_table, self.tail, self.sealed
        if p.dtype != torch.uint8 or p.dim() != 3 or p.shape[1] != self.fmt.page or not p.is_contiguous():
            raise ValueError(f"{where}: pages must be contiguous uint8 (pages, {self.fmt.page}, row bytes), "
                             f"got {p.dtype} {tuple(p.shape)}")
        if self.offset < 0 or self.offset + self.fmt.row_bytes > p.shape[2]:
            raise ValueError(f"{where}: bytes [{self.offset}, {self.offset + self.fmt.row_bytes}) do not fit a "
                             f"{p.shape[2]}-byte page row")
        if bt.dim() != 2 or bt.shape[0] != batch or bt.dtype not in (torch.int32, torch.int64) or bt.stride(-1) != 1:
            raise ValueError(f"{where}: block_table must be int32/int64 (B={batch}, pages) with unit last stride, "
                             f"got {bt.dtype} {tuple(bt.shape)}")
        if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != self.c or t.dtype not in FLOATS or t.stride(-1) != 1:
            raise ValueError(f"{where}: tail must be a float (B={batch}, TL, C={self.c}) tensor with unit last "
                             f"stride, got {t.dtype} {tuple(t.shape)}")
        if s.shape != (batch,) or s.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where}: sealed must be int32/int64 of shape ({batch},), got {s.dtype} {tuple(s.shape)}")
        for nm, z in {"pages": p, "block_table": bt, "tail": t, "sealed": s}.items():
            if z.device != device:
                raise ValueError(f"{where}: {nm} is on {z.device}, expected {device}")

    def values_ref(self, b: int, n: int) -> Tensor:
        """Row b's first n tokens as float32 (n, C): its pages' sealed tokens dequantized, then the tail."""
        ns = min(int(self.sealed[b]), n)
        page = self.fmt.page
        blocks = self.block_table[b, :math.ceil(ns / page)]
        rows = self.pages[blocks.long()].reshape(-1, self.pages.shape[2])[:, self.offset:self.offset + self.fmt.row_bytes]
        if self.spec.axis == "token":
            rows = rows[:ns]
        parts = [dequantize_ref(self.fmt.decode(rows), torch.float32)[:ns]] if ns else []
        if n - ns > self.tail.shape[1]:
            raise ValueError(f"row {b}: {n - ns} tail tokens needed but the tail holds {self.tail.shape[1]}")
        parts.append(self.tail[b, :n - ns].float())
        return torch.cat(parts)

    def args(self) -> tuple:
        """(codes, scale, zero, tail, sealed, block table): the first three are byte views of the pages at this
        stream's codes, scales and zeros (a page row apart from token to token)."""
        flat = self.pages.view(-1)
        codes = self.offset
        scale = codes + self.fmt.code_bytes
        return (flat[codes:], flat[scale:], flat[scale + self.fmt.half_bytes:], _launch_tail(self.tail), self.sealed,
                self.block_table)

    def strides(self) -> tuple[int, int, int, int, int, int, int]:
        """(codes b, codes t, scale b, scale t-or-row, tail b, tail t, block table b): codes and scales are
        reached through the block table (batch stride 0, a page row per token); a per-channel stream's scale
        stride is its half_bytes (the bytes of a page's scales each row holds)."""
        row = self.pages.shape[2]
        tail = _launch_tail(self.tail)
        return (0, row, 0, self.fmt.half_bytes if self.spec.axis == "channel" else row, tail.stride(0),
                tail.stride(1), self.block_table.stride(0))

    def meta(self, tile_t: int, tile_c: int, prefix: str = "") -> dict:
        """As ``PackedStream.meta``, with PAGE = tokens per page."""
        per_channel = self.spec.axis == "channel"
        g = self.spec.group_size
        m = {"BITS": self.spec.bits, "GS": g, "PER_CHANNEL": per_channel, "HAS_CODES": True,
             "ALIGNED": g % (tile_t if per_channel else tile_c) == 0, "RING": 0, "PAGE": self.fmt.page}
        return {prefix + key: val for key, val in m.items()}
