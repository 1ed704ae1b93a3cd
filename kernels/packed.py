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

Kernels read a stream only through ``_common.load_tile``, which takes ``args()``, ``strides()`` and
``meta()`` of this class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from xqcli.kernels._common import FLOATS
from xqcli.kernels.quant import QTensor, QuantSpec, dequantize_ref, packed_width

__all__ = ["PackedStream"]


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
        """(codes, scale, zero, tail, sealed) for a launch; absent codes become the tail (never read)."""
        tail = self.tail if self.tail.shape[1] else self.tail.new_zeros(self.tail.shape[0], 1, self.tail.shape[2])
        codes = self.codes if self.codes is not None else tail
        scale = self.scale if self.scale is not None else tail
        zero = self.zero if self.zero is not None else tail
        return codes, scale, zero, tail, self.sealed

    def strides(self) -> tuple[int, int, int, int, int, int]:
        """(codes b, codes t, scale b, scale t-or-block, tail b, tail t) element strides."""
        codes, scale, _, tail, _ = self.args()
        return codes.stride(0), codes.stride(1), scale.stride(0), scale.stride(1), tail.stride(0), tail.stride(1)

    def meta(self, tile_t: int, tile_c: int, prefix: str = "") -> dict:
        """Constexprs of ``_common.load_tile`` (BITS, GS, PER_CHANNEL, HAS_CODES, ALIGNED, RING), names prefixed.

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
        return {prefix + key: val for key, val in m.items()}
