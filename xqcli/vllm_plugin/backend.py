"""The vLLM attention backend of X-cache layers: pages hold packed X (latents, KIVI's K and V), attention
rebuilds K and V.

vLLM's own allocator, scheduler and block tables run unchanged: a layer declares a page of `block_size` token
rows `row_bytes` wide (`XQuantAttention.get_kv_cache_spec`), writes each new token's row at its slot, and on
every forward attends over its requests' pages (docs/vllm.md):

- decode rows (one new token) on CUDA: xq's fused Triton kernels read the codes and scales from the pages
  through the block table (`xqcli.kernels.packed.PagedStream`) and rebuild K and V in registers, one launch
  sequence for all of them (`XQ_VLLM_FUSED`: `auto`, the default, on CUDA; `on` also on the CPU through the
  Triton interpreter, for tests; `check` as `on`, and the torch path runs too, gives the output and must agree
  within `CHECK_TOLERANCE` or the forward fails; `off` never);
- other rows (prompts, chunked prefill), on the CPU and with `off`: pure torch gathers the rows by block table,
  dequantizes them, rebuilds K and V and runs SDPA.

The backend and its metadata are thin: the work is in `XQuantAttention`, the layer.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from xqcli.kernels.packed import PagedStream
from xqcli.vllm_plugin.pages import PageLayout

BACKEND_NAME = "XQUANT"
FUSED_ENV = "XQ_VLLM_FUSED"
FUSED_MODES = ("auto", "on", "check", "off")
XQ_CHECK_FAILED = "fused check failed"
# (atol, rtol) of `check`, by the output's dtype: the kernel tests' table (tests/test_kernels_attention.py)
CHECK_TOLERANCE = {torch.float32: (2e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}


def fused_mode() -> str:
    """`XQ_VLLM_FUSED`: `auto` (fused kernels for decode rows on CUDA), `on` (on the CPU too: the Triton interpreter,
    TRITON_INTERPRET=1, slow, for tests), `check` (`on`, and each fused output compared with the torch path's,
    which is kept) or `off` (pure torch everywhere)."""
    mode = os.environ.get(FUSED_ENV, "auto")
    if mode not in FUSED_MODES:
        raise ValueError(f"{FUSED_ENV} must be one of {', '.join(FUSED_MODES)}, not {mode!r}")
    return mode

# Decode attention over pages for a batch of decode rows: (q (B, H, D), the layer's streams as PagedStreams,
# seq_lens (B,), the rows' new tokens' positions in the batch, kernel backend) -> (B, H, D).
FusedDecode = Callable[[torch.Tensor, list[PagedStream], torch.Tensor, list[int], str], torch.Tensor]


@dataclass
class XQuantMetadata:
    """What attention over pages needs: per-request query ranges and lengths (CPU copies), block tables (on the
    device, and a CPU copy for host-side lookups: staging keys, with one copy per forward instead of a sync per
    layer and request)."""

    num_actual_tokens: int
    query_start_loc: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor
    block_table_cpu: torch.Tensor
    slot_mapping: torch.Tensor
    decode: DecodeRows


@dataclass
class DecodeRows:
    """The requests with one new token, what the fused kernels take (`XQuantAttention.fused_rows`), with what every
    layer's call needs, built once per forward: their indices, their new tokens' positions in the batch, and on the
    device their lengths, block tables and sealed counts of a per-channel stream (whole pages)."""

    requests: list[int]
    starts: list[int]
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    sealed_pages: torch.Tensor

    @classmethod
    def of(cls, query_start_loc: list[int], seq_lens: list[int], block_table: torch.Tensor, block_size: int
           ) -> DecodeRows:
        requests = [r for r in range(len(seq_lens)) if query_start_loc[r + 1] - query_start_loc[r] == 1]
        lens = torch.tensor([seq_lens[r] for r in requests], dtype=torch.int32).to(block_table.device)
        return cls(requests, [query_start_loc[r] for r in requests], lens, block_table[requests],
                   lens // block_size * block_size)


class XQuantMetadataBuilder(AttentionMetadataBuilder[XQuantMetadata]):
    def __init__(self, kv_cache_spec: KVCacheSpec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> XQuantMetadata:
        m = common_attn_metadata
        starts, lens = m.query_start_loc_cpu[:m.num_reqs + 1].tolist(), m.seq_lens[:m.num_reqs].tolist()
        return XQuantMetadata(num_actual_tokens=m.num_actual_tokens, query_start_loc=starts, seq_lens=lens,
                              block_table=m.block_table_tensor,
                              block_table_cpu=m.block_table_tensor[:m.num_reqs].cpu(), slot_mapping=m.slot_mapping,
                              decode=DecodeRows.of(starts, lens, m.block_table_tensor, self.kv_cache_spec.block_size))


class XQuantImpl(AttentionImpl):
    """Delegates to the layer, which owns the page layout, the staging of unsealed pages and the weights."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, alibi_slopes, sliding_window,
                 kv_cache_dtype: str, logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **kwargs) -> None:
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise NotImplementedError("the xq X cache supports plain causal attention only (no ALiBi, sliding "
                                      "window or logit soft-cap)")
        self.num_heads, self.head_size, self.scale, self.num_kv_heads = num_heads, head_size, scale, num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def do_kv_cache_update(self, layer: XQuantAttention, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        layer.write(key, value, kv_cache, slot_mapping)

    def forward(self, layer: XQuantAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: XQuantMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the xq X cache")
        if attn_metadata is not None:  # None while vLLM warms up
            layer.attend(query, kv_cache, attn_metadata, output)
        return output


class XQuantBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    accept_output_buffer: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[XQuantImpl]:
        return XQuantImpl

    @staticmethod
    def get_builder_cls() -> type[XQuantMetadataBuilder]:
        return XQuantMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        # A page is one per-channel quantization group (g = 128 tokens, docs/design.md §2): never split it.
        return [kv_cache_spec.block_size] if kv_cache_spec is not None else [128]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


class StagingPool:
    """Full-precision rows of unsealed pages of per-channel streams (X·U_k, K), by vLLM block id, shared by a
    model's layers.

    A per-channel group is a whole page, so its tokens wait here until the page fills (xq's window-0 rule,
    docs/design.md §6). A block written at offset 0 starts afresh (vLLM reuses freed blocks from offset 0);
    entries of finished requests whose last page never filled are dropped oldest-first beyond `capacity`.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()  # (layer, stream, block) -> (bs, C)

    def page(self, key: tuple[int, int, int], fresh: bool, shape: tuple[int, int], like: torch.Tensor
             ) -> torch.Tensor | None:
        """The staging rows of one (layer, stream, block); `fresh` (offset 0 written) starts them anew. None for
        a page that is not being filled: a sealed page whose last tokens vLLM recomputes (a full prefix-cache
        hit recomputes the prompt's last token), which keeps its sealed groups."""
        if fresh:
            self.rows[key] = like.new_zeros(shape)
        elif key not in self.rows:
            return None
        self.rows.move_to_end(key)
        while len(self.rows) > self.capacity:
            self.rows.popitem(last=False)
        return self.rows[key]

    def get(self, key: tuple[int, int, int]) -> torch.Tensor:
        try:
            return self.rows[key]
        except KeyError:
            raise RuntimeError(f"xq: the unsealed page (layer, stream, block) {key} was dropped from the staging "
                               f"pool ({self.capacity} pages); lower max_num_seqs") from None

    def drop(self, key: tuple[int, int, int]) -> None:
        self.rows.pop(key, None)


class XQuantAttention(Attention):
    """An attention layer whose cache holds one layer's X streams (`PageLayout`) instead of K and V.

    `key` and `value` passed to it are the streams to cache (xquant MHA: X twice; GQA: X·U_k and X·U_v; xquant-cl:
    a seed or delta in two halves, or twice; kivi: pre-RoPE K and V);
    `rebuild(values, positions, request, new)` turns a request's dequantized streams into RoPE'd K and V of shape
    (n, kv_heads·head_dim) (`request`: its index in the batch, `new`: its new tokens' slice of the batch's);
    `fused_decode` (None: not available for this layer) attends for a batch of decode rows with the fused kernels.
    """

    def __init__(self, *, layout: PageLayout, layer: int, staging: StagingPool,
                 rebuild: Callable[[list[torch.Tensor], torch.Tensor, int, slice], tuple[torch.Tensor, torch.Tensor]],
                 stream_values: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]],
                 fused_decode: FusedDecode | None = None, **kwargs) -> None:
        super().__init__(attn_backend=XQuantBackend, **kwargs)
        self.layout, self.layer_index, self.staging = layout, layer, staging
        self.rebuild, self.stream_values, self.fused_decode = rebuild, stream_values, fused_decode
        self.mode = fused_mode()

    def get_kv_cache_spec(self, vllm_config) -> KVCacheSpec:
        block_size = vllm_config.cache_config.block_size
        if block_size != self.layout.block_size:
            raise ValueError(f"xq: the X cache needs block_size {self.layout.block_size} (one quantization group "
                             f"per page), got {block_size}; pass block_size={self.layout.block_size}")
        return FullAttentionSpec(block_size=block_size, num_kv_heads=self.num_kv_heads, head_size=self.head_size,
                                 dtype=torch.uint8, num_head_slots=1, state_content_bytes=self.layout.row_bytes)

    def write(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Encode this step's tokens into their slots; fill and seal per-channel pages."""
        n = slot_mapping.shape[0]
        keep = slot_mapping[:n] >= 0
        slots = slot_mapping[:n][keep]
        values = [v.reshape(v.shape[0], -1)[:n][keep] for v in self.stream_values(key, value)]
        bs = self.layout.block_size
        blocks, offsets = slots // bs, slots % bs
        pages = kv_cache[:, 0]  # (num_blocks, bs, row_bytes)
        rows = self.layout.encode(values)
        for lo, hi in self.layout.token_spans():  # a sealed page's channel bytes stay as sealed
            pages[blocks, offsets, lo:hi] = rows[:, lo:hi]
        if not self.layout.has_channel:
            return
        chan = [i for i, s in enumerate(self.layout.streams) if s.axis == "channel"]
        for block in torch.unique_consecutive(blocks).tolist():
            sel = blocks == block
            offs = offsets[sel]
            staged = [self.staging.page((self.layer_index, i, block), bool(offs[0] == 0), (bs, values[i].shape[-1]),
                                        values[i]) for i in chan]
            if any(buf is None for buf in staged):
                continue
            for buf, i in zip(staged, chan):
                buf[offs] = values[i][sel]
            if bool(offs[-1] == bs - 1):  # the page is full: quantize its groups into the page
                full = [None] * len(values)
                for buf, i in zip(staged, chan):
                    full[i] = buf
                    self.staging.drop((self.layer_index, i, block))
                self.layout.seal(pages[block], full)

    def gather(self, pages: torch.Tensor, blocks: torch.Tensor, n: int, last_block: int) -> list[torch.Tensor]:
        """Dequantized streams of one request's first n tokens in pages `blocks` (unsealed per-channel rows from
        staging: `last_block`, the block id of token n − 1's page, is its key)."""
        bs = self.layout.block_size
        rows = pages[blocks].reshape(-1, self.layout.row_bytes)[:n]
        values = self.layout.decode(rows)
        for i, s in enumerate(self.layout.streams):
            if s.axis == "channel" and n % bs:
                tail = self.staging.get((self.layer_index, i, last_block))[:n % bs]
                values[i] = torch.cat([values[i], tail.to(values[i].dtype)])
        return values

    def fused_rows(self, query: torch.Tensor, md: XQuantMetadata) -> list[int]:
        """The requests the fused kernels take: those with one new token, where the mode allows (`fused_mode`)."""
        if self.fused_decode is None or self.mode == "off" or (self.mode == "auto" and not query.is_cuda):
            return []
        return md.decode.requests

    def paged_streams(self, pages: torch.Tensor, md: XQuantMetadata) -> list[PagedStream]:
        """The layer's streams of the decode rows as the kernels read them: sealed tokens in the pages, a
        per-channel stream's unsealed page from staging (its tail)."""
        bs, dec = self.layout.block_size, md.decode
        streams = []
        for i, s in enumerate(self.layout.streams):
            if s.axis == "channel":
                sealed = dec.sealed_pages
                tail = torch.zeros(len(dec.requests), bs, s.width, dtype=s.dtype, device=pages.device)
                for j, r in enumerate(dec.requests):
                    n = md.seq_lens[r]
                    if n % bs:
                        key = (self.layer_index, i, int(md.block_table_cpu[r, n // bs]))
                        tail[j, :n % bs] = self.staging.get(key)[:n % bs]
            else:
                sealed, tail = dec.seq_lens, torch.zeros(len(dec.requests), 0, s.width, dtype=s.dtype,
                                                         device=pages.device)
            streams.append(self.layout.paged_stream(i, pages, dec.block_table, tail, sealed))
        return streams

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, md: XQuantMetadata, output: torch.Tensor) -> None:
        """Causal attention of each request's new queries over all its cached tokens, K and V rebuilt: decode rows
        by the fused kernels when `fused_rows` says so, the rest in pure torch."""
        pages = kv_cache[:, 0]
        bs = self.layout.block_size
        group = self.num_heads // self.num_kv_heads
        fused = set(self.fused_rows(query, md))
        if fused:
            starts = md.decode.starts
            out = self.fused_decode(query[starts].contiguous(), self.paged_streams(pages, md), md.decode.seq_lens,
                                    starts, "auto" if self.mode == "auto" else "triton")
            output[starts] = out.to(output.dtype)
        for r, n in enumerate(md.seq_lens):
            q0, q1 = md.query_start_loc[r], md.query_start_loc[r + 1]
            if q1 == q0 or (r in fused and self.mode != "check"):
                continue
            blocks = md.block_table[r, :-(-n // bs)]
            positions = torch.arange(n, device=query.device)
            last_block = int(md.block_table_cpu[r, (n - 1) // bs])
            k, v = self.rebuild(self.gather(pages, blocks, n, last_block), positions, r, slice(q0, q1))
            k = k.view(n, self.num_kv_heads, self.head_size).repeat_interleave(group, dim=1).transpose(0, 1)
            v = v.view(n, self.num_kv_heads, self.head_size).repeat_interleave(group, dim=1).transpose(0, 1)
            q = query[q0:q1].transpose(0, 1)  # (heads, q_len, head_dim)
            q_pos = torch.arange(n - (q1 - q0), n, device=query.device)
            mask = positions[None, :] <= q_pos[:, None]
            # 4D, as xq's model calls it: 3D inputs miss torch's fused CPU kernel and round differently (~1e-7)
            out = F.scaled_dot_product_attention(q.to(k.dtype)[None], k[None], v[None], attn_mask=mask[None, None],
                                                 scale=self.impl.scale)[0]
            torch_out = out.transpose(0, 1).to(output.dtype)
            if r in fused:  # `check`: the fused kernels' output against this one, which is kept
                self.check_fused(output[q0:q1], torch_out, r, n)
            output[q0:q1] = torch_out

    def check_fused(self, fused: torch.Tensor, reference: torch.Tensor, request: int, n: int) -> None:
        """Raise unless the fused kernels' output of one decode row agrees with the torch path's (`check` mode)."""
        atol, rtol = CHECK_TOLERANCE[reference.dtype]
        err = (fused.float() - reference.float()).abs()
        if not bool((err <= atol + rtol * reference.float().abs()).all()):
            raise RuntimeError(f"xq: {XQ_CHECK_FAILED} in layer {self.layer_index}, request {request} at {n} tokens: "
                               f"the fused kernels differ from the torch path by up to {err.max().item():.3g} "
                               f"(atol {atol}, rtol {rtol})")
