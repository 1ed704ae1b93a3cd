"""How one layer's X cache lives in a vLLM page: a byte row per token, pure torch (docs/vllm.md).

vLLM hands an attention layer pages of `block_size` token rows, each `row_bytes` wide (uint8). A row holds,
for every stream of the layer (xquant MHA: X; xquant GQA: the latents X·U_k and X·U_v, docs/design.md §3;
kivi: pre-RoPE K and V), its part in the layout the fused kernels read (`xqcli.kernels.packed.PageFormat`):

- `token` stream (X, X·U_v, V): the token's packed codes, then its fp16 scales, then its fp16 zeros
  (`kernels/quant.py` layout, docs/design.md §2), written when the token is.
- `channel` stream (X·U_k, K): the token's packed codes, then the row's share of the page's per-channel fp16
  scales, then of its zeros (one group per channel per page: the page is the group of g = block_size tokens).
  Both are written when the page fills (it is *sealed*); until then the tokens wait in full precision
  outside the page, as xq's window-0 cache keeps an unsealed block (docs/design.md §6).
- `fp` stream (`xquant-fp`, `kivi-fp`): the raw values in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xqcli.cache.spec import CacheSpec
from xqcli.kernels.packed import PagedStream, PageFormat
from xqcli.kernels.quant import QTensor, QuantSpec, dequantize_ref, quantize_ref


@dataclass(frozen=True)
class StreamLayout:
    """One stream's place in a token row: its bytes from `offset`, in `fmt`'s layout (None: raw `dtype` values)."""

    width: int  # values per token (C)
    axis: str  # "token", "channel" or "fp"
    fmt: PageFormat | None  # None for "fp"
    offset: int  # first byte in the row
    dtype: torch.dtype  # what decode returns (the model dtype)

    @property
    def quant(self) -> QuantSpec | None:
        return self.fmt.spec if self.fmt else None

    @property
    def row_bytes(self) -> int:
        return self.fmt.row_bytes if self.fmt else self.width * self.dtype.itemsize

    @property
    def span(self) -> slice:
        return slice(self.offset, self.offset + self.row_bytes)


class PageLayout:
    """The token-row layout of one layer's streams in pages of `block_size` tokens."""

    def __init__(self, streams: list[tuple[int, str, QuantSpec | None]], block_size: int, dtype: torch.dtype) -> None:
        self.block_size = block_size
        self.streams: list[StreamLayout] = []
        offset = 0
        for width, axis, quant in streams:
            s = StreamLayout(width, axis, None if quant is None else PageFormat(width, quant, block_size), offset,
                             dtype)
            self.streams.append(s)
            offset += s.row_bytes
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

    @property
    def quantized(self) -> bool:
        return all(s.fmt is not None for s in self.streams)

    def token_spans(self) -> list[tuple[int, int]]:
        """Byte ranges of a row that `encode` fills (all but channel streams, which `seal` writes)."""
        return [(s.span.start, s.span.stop) for s in self.streams if s.axis != "channel"]

    def encode(self, values: list[torch.Tensor]) -> torch.Tensor:
        """(T, row_bytes) uint8 rows for T new tokens; channel streams' bytes stay zero until `seal`."""
        rows = torch.zeros(values[0].shape[0], self.row_bytes, dtype=torch.uint8, device=values[0].device)
        for s, x in zip(self.streams, values):
            if s.axis == "channel":
                continue
            if s.axis == "fp":
                rows[:, s.span] = x.to(s.dtype).contiguous().view(torch.uint8)
            else:
                rows[:, s.span] = s.fmt.encode_tokens(quantize_ref(x, s.quant))
        return rows

    def seal(self, page: torch.Tensor, values: list[torch.Tensor | None]) -> None:
        """Quantize a full page's channel streams (values: (block_size, C) per channel stream, None elsewhere)
        and write their codes and scales into `page` ((block_size, row_bytes) uint8, in place)."""
        for s, x in zip(self.streams, values):
            if s.axis == "channel":
                page[:, s.span] = s.fmt.encode_page(quantize_ref(x, s.quant))

    def stored(self, rows: torch.Tensor) -> list[QTensor | torch.Tensor]:
        """What (n, row_bytes) rows hold per stream: codes with their fp16 scales and zeros (`QTensor`; channel
        streams: the whole sealed pages among them), or raw values (`fp`)."""
        whole = rows.shape[0] // self.block_size * self.block_size
        out: list[QTensor | torch.Tensor] = []
        for s in self.streams:
            if s.axis == "fp":
                out.append(rows[:, s.span].clone(memory_format=torch.contiguous_format).view(s.dtype))
            else:
                out.append(s.fmt.decode(rows[:whole if s.axis == "channel" else None, s.span], s.dtype))
        return out

    def decode(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Values of every stream for (n, row_bytes) rows; channel streams need whole sealed pages (n % block_size
        == 0), the caller supplies the unsealed tail from its staging buffer."""
        return [x if isinstance(x, torch.Tensor) else dequantize_ref(x, s.dtype)
                for s, x in zip(self.streams, self.stored(rows))]

    def paged_stream(self, index: int, pages: torch.Tensor, block_table: torch.Tensor, tail: torch.Tensor,
                     sealed: torch.Tensor) -> PagedStream:
        """Stream `index` of a batch's pages ((num_blocks, block_size, row_bytes) uint8) as the fused kernels read
        it: sealed tokens through `block_table`, the rest in `tail` (`xqcli.kernels.packed.PagedStream`)."""
        s = self.streams[index]
        if s.fmt is None:
            raise ValueError("a raw (-fp) stream has no packed form for the fused kernels")
        return PagedStream(pages=pages, block_table=block_table, offset=s.offset, fmt=s.fmt, tail=tail, sealed=sealed)
