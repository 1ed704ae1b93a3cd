"""How one layer's X cache lives in a vLLM page: a byte row per token, pure torch (docs/vllm.md).

vLLM hands an attention layer pages of `block_size` token rows, each `row_bytes` wide (uint8). A row holds,
for every stream of the layer (xquant MHA: X; xquant GQA: the latents X·U_k and X·U_v, docs/design.md §3;
kivi: pre-RoPE K and V):

- `token` stream (X, X·U_v, V): the token's packed codes, then its fp16 scales, then its fp16 zeros
  (`kernels/quant.py` layout, docs/design.md §2), written when the token is.
- `channel` stream (X·U_k, K): the token's packed codes, then a `blob_bytes` slice of the page's per-channel
  fp16 scales and zeros (one group per channel per page: the page is the group of g = block_size tokens).
  Both are written when the page fills (it is *sealed*); until then the tokens wait in full precision
  outside the page, as xq's window-0 cache keeps an unsealed block (docs/design.md §6).
- `fp` stream (`xquant-fp`, `kivi-fp`): the raw values in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xqcli.cache.spec import CacheSpec
from xqcli.kernels.quant import QTensor, QuantSpec, dequantize_ref, packed_width, quantize_ref

_FP16 = 2  # bytes of an fp16 scale or zero


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A copy with row-major strides and offset 0, so its bytes can be reinterpreted as fp16 or fp32."""
    return t.clone(memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class StreamLayout:
    """One stream's place in a token row."""

    width: int  # values per token (C)
    axis: str  # "token", "channel" or "fp"
    quant: QuantSpec | None  # None for "fp"
    offset: int  # first byte in the row
    dtype: torch.dtype  # what decode returns (the model dtype)

    @property
    def code_bytes(self) -> int:
        return packed_width(self.width, self.quant.bits) if self.quant else self.width * self.dtype.itemsize

    @property
    def groups(self) -> int:
        """fp16 (scale, zero) pairs per token row (token axis) or per page (channel axis)."""
        if self.axis == "token":
            return -(-self.width // self.quant.group_size)
        return self.width if self.axis == "channel" else 0

    def blob_bytes(self, block_size: int) -> int:
        """Bytes of the page's channel scales+zeros each row carries (the blob spread over the page's rows)."""
        return -(-2 * _FP16 * self.groups // block_size)

    def row_bytes(self, block_size: int) -> int:
        if self.axis == "token":
            return self.code_bytes + 2 * _FP16 * self.groups
        if self.axis == "channel":
            return self.code_bytes + self.blob_bytes(block_size)
        return self.code_bytes


class PageLayout:
    """The token-row layout of one layer's streams in pages of `block_size` tokens."""

    def __init__(self, streams: list[tuple[int, str, QuantSpec | None]], block_size: int, dtype: torch.dtype) -> None:
        self.block_size = block_size
        self.streams: list[StreamLayout] = []
        offset = 0
        for width, axis, quant in streams:
            if axis == "channel" and quant.group_size != block_size:
                raise ValueError(f"a per-channel stream needs pages of its group size {quant.group_size} tokens, "
                                 f"got block size {block_size}")
            s = StreamLayout(width, axis, quant, offset, dtype)
            self.streams.append(s)
            offset += s.row_bytes(block_size)
        self.row_bytes = offset

    @classmethod
    def of_kind(cls, spec: CacheSpec, axes: list[str], width: int, layer: int, dtype: torch.dtype) -> PageLayout:
        """The pages of one layer's `width`-wide streams, quantized along `axes` exactly as xq's cache of kind `spec`
        quantizes them (raw for `-fp`), so a page is one per-channel group of `spec.group_size` tokens."""
        quants = [spec.quant(axis, layer=layer) for axis in axes]
        return cls([(width, "fp" if q is None else axis, q) for axis, q in zip(axes, quants)], spec.group_size, dtype)

    @property
    def has_channel(self) -> bool:
        return any(s.axis == "channel" for s in self.streams)

    def token_spans(self) -> list[tuple[int, int]]:
        """Byte ranges of a row that `encode` fills (all but channel streams, which `seal` writes)."""
        return [(s.offset, s.offset + s.row_bytes(self.block_size)) for s in self.streams if s.axis != "channel"]

    def encode(self, values: list[torch.Tensor]) -> torch.Tensor:
        """(T, row_bytes) uint8 rows for T new tokens; channel streams' bytes stay zero until `seal`."""
        rows = torch.zeros(values[0].shape[0], self.row_bytes, dtype=torch.uint8, device=values[0].device)
        for s, x in zip(self.streams, values):
            if s.axis == "channel":
                continue
            if s.axis == "fp":
                raw = x.to(s.dtype).contiguous().view(torch.uint8)
            else:
                q = quantize_ref(x, s.quant)
                raw = torch.cat([q.packed, q.scale.view(torch.uint8), q.zero.view(torch.uint8)], dim=-1)
            rows[:, s.offset:s.offset + raw.shape[-1]] = raw
        return rows

    def seal(self, page: torch.Tensor, values: list[torch.Tensor | None]) -> None:
        """Quantize a full page's channel streams (values: (block_size, C) per channel stream, None elsewhere)
        and write their codes and scale blobs into `page` ((block_size, row_bytes) uint8, in place)."""
        for s, x in zip(self.streams, values):
            if s.axis != "channel":
                continue
            q = quantize_ref(x, s.quant)  # scale, zero: (1, C)
            page[:, s.offset:s.offset + s.code_bytes] = q.packed
            blob = torch.cat([q.scale.view(torch.uint8), q.zero.view(torch.uint8)], dim=-1).reshape(-1)
            spread = torch.zeros(self.block_size * s.blob_bytes(self.block_size), dtype=torch.uint8,
                                 device=page.device)
            spread[:blob.numel()] = blob
            page[:, s.offset + s.code_bytes:s.offset + s.row_bytes(self.block_size)] = spread.view(self.block_size, -1)

    def stored(self, rows: torch.Tensor) -> list[QTensor | torch.Tensor]:
        """What (n, row_bytes) rows hold per stream: codes with their fp16 scales and zeros (`QTensor`; channel
        streams: the whole sealed pages among them), or raw values (`fp`)."""
        n = rows.shape[0]
        out: list[QTensor | torch.Tensor] = []
        for s in self.streams:
            codes = rows[:, s.offset:s.offset + s.code_bytes]
            if s.axis == "fp":
                out.append(_fresh(codes).view(s.dtype))
                continue
            if s.axis == "token":
                tail = _fresh(rows[:, s.offset + s.code_bytes:s.offset + s.row_bytes(self.block_size)])
                scale, zero = tail.view(torch.float16).split(s.groups, dim=-1)
            else:
                pages = n // self.block_size
                blob = rows[:pages * self.block_size, s.offset + s.code_bytes:s.offset + s.row_bytes(self.block_size)]
                blob = _fresh(blob.reshape(pages, self.block_size * s.blob_bytes(self.block_size))[:, :2 * _FP16 * s.groups])
                blob = blob.view(torch.float16)
                scale, zero = blob.split(s.groups, dim=-1)  # (pages, C): one group per channel per page
                codes = codes[:pages * self.block_size]
            out.append(QTensor(packed=codes.contiguous(), scale=scale.contiguous(), zero=zero.contiguous(),
                               spec=s.quant, shape=torch.Size((codes.shape[0], s.width)), dtype=s.dtype))
        return out

    def decode(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Values of every stream for (n, row_bytes) rows; channel streams need whole sealed pages (n % block_size
        == 0), the caller supplies the unsealed tail from its staging buffer."""
        return [x if isinstance(x, torch.Tensor) else dequantize_ref(x, s.dtype)
                for s, x in zip(self.streams, self.stored(rows))]
