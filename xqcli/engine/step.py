"""One static decode step for every cache kind: the same launches every step, nothing read back.

`DecodeStep(model, cache, weights)` runs one token per row through the model and its cache with the
decode kernels (`xqcli.kernels`) and the concatenated weights of `xqcli.engine.fused`:

    embedding → rms_norm → per layer: layer_head GEMV → rope_q → the kind's appends and attention
    (`capacity` = the cache's max_len) → fused_layer_tail → lm_head → lengths += n_new (in place)

Every per-step quantity lives in device memory: the step reads its tokens and new-token counts from
`tokens` and `n_new` (copy into them, then call), positions are the cache's `lengths`, and the sealed
counts of every stream, XQuant-CL's sealed-token and ring positions are looked up in tables built once
for every length 0..max_len (one indexing launch each, shared by all layers). So nothing in the host
code depends on the lengths: no branch, no scalar argument, no allocation size. A row with n_new = 0
(a finished or unused row) runs through the step and stores nothing it owns (its appends write
nothing; `kv` and `+ch0` write one slot past its length, or its last slot when it is full).

XQuant-CL seed/delta layers update the persistent accumulator (B, max_len, d) in place. A delta layer
needs X̂_{i−1} at the token the append seals (its closed-loop delta, `stream_append`'s ``sub``) and at
the tokens in the ring after the step (slot order), projected (GQA: ·U_kv), and hands the ring's part to
the update kernel as ``tail_sub``: it subtracts it from the raw ring as it reads the waiting tokens'
deltas (no separate subtract launch). MHA gathers them from the accumulator. GQA projects them in one
`xquant_cl_project` launch, the sealed token's from its float64 chain `sealing` (B, d), which the update
kernel extends layer by layer as the reference path does (docs/design.md §4), so both store the same codes.

Refused (`StepUnsupported`, the engine then decodes eagerly on the reference path): the paper protocol
(`quantize_partial`), unquantized streams other than `+ch0`'s channel, and a sliding window shorter
than the context on the quantized kinds (their kernels attend to every cached token; `kv`'s kernel
takes the window).

Launches (counted by the tracer: `python bench/trace_launches.py --step --context 64`, SmolLM2-135M,
30 layers, float32 on CPU, batch 1; "outside" includes the engine's greedy sampling, one argmax; bf16 on
a GPU adds the logits' float cast outside the layers):

    kind            per layer                                        outside the layers
    kv              11                                               6
    kivi-4          12                                               7
    xquant-4        13 (GQA latents; MHA X: 12), +rot 13             7
    xquant-4+ch0    14                                               8
    xquant-cl-3     base layers as xquant; seed 13, delta layers 14  8
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from xqcli.cache.base import ModelCache
from xqcli.cache.kivi import KiviCache
from xqcli.cache.kv import KVCache
from xqcli.cache.stream import Stream
from xqcli.cache.xquant import XQuantCache
from xqcli.cache.xquant_cl import XQuantCLCache
from xqcli.engine.fused import DecodeWeights, fused_layer_tail, layer_head
from xqcli.kernels.decode_ops import rms_norm
from xqcli.kernels.kivi_attention import kivi_attention
from xqcli.kernels.kv_attention import kv_append_rope, kv_attention
from xqcli.kernels.packed import PackedStream
from xqcli.kernels.rope_q import rope_q
from xqcli.kernels.stream_append import ring_view, sealed_count, stream_append
from xqcli.kernels.xquant_attention import xquant_attention
from xqcli.kernels.xquant_cl import xquant_cl_project, xquant_cl_update

__all__ = ["DecodeStep", "StepUnsupported"]


class StepUnsupported(Exception):
    """This cache cannot decode through the static step (the message says why); decode eagerly instead."""


class DecodeStep:
    """The static decode step of `model` over `cache` (see the module docstring).

    `tokens` (B,) and `n_new` (B,) are its inputs, `__call__()` returns the logits (B, vocab) in float32,
    and the cache's `lengths` advance in place. ``backend``: the kernels' choice ("auto": Triton on CUDA
    tensors; "triton": forced, for the interpreter and the tracer)."""

    def __init__(self, model: torch.nn.Module, cache: ModelCache, weights: DecodeWeights, *,
                 backend: str = "auto") -> None:
        refuse_reason = unsupported(cache)
        if refuse_reason:
            raise StepUnsupported(refuse_reason)
        cfg = model.config
        self.model, self.cache, self.weights, self.backend = model, cache, weights, backend
        self.cfg, self.b, self.cap = cfg, cache.batch, cache.max_len
        dev = cache.device
        self.tokens = torch.zeros(self.b, dtype=torch.long, device=dev)
        self.n_new = torch.zeros(self.b, dtype=torch.long, device=dev)
        self.cos, self.sin = model.rope.tables(self.cap + 1)  # a full row still reads position max_len
        n = torch.arange(self.cap + 1, device=dev)
        streams = [st for layer in getattr(cache, "streams", []) for st in layer if st.spec is not None]
        self.keys = list(dict.fromkeys(_key(st) for st in streams))  # distinct (window, spec): one table row each
        self.sealed_table = (torch.stack([sealed_count(n, w, s).long() for w, s in self.keys]) if self.keys
                             else None)
        self.zeros = torch.zeros(self.b, dtype=torch.int32, device=dev)  # sealed counts of dense streams
        self.cl_table = _cl_table(cache, n) if isinstance(cache, XQuantCLCache) else None
        self.sealing = None  # GQA XQuant-CL: float64 X̂ of the token each row seals (`xquant_cl_project`)
        if isinstance(cache, XQuantCLCache) and cache.latent:
            self.sealing = torch.zeros(self.b, cfg.hidden_size, dtype=torch.float64, device=dev)
        if isinstance(cache, XQuantCLCache):
            cache._acc_bytes = max(cache._acc_bytes, cache.acc_buffer().numel() * cache.acc_buffer().element_size())
        self.layer_weights = [_rebuild_weights(cache, i) for i in range(cfg.num_hidden_layers)]
        self.on_section: Callable[[str], None] = lambda section: None  # the tracer's layer attribution

    # --- the step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self) -> Tensor:
        cache, w = self.cache, self.weights
        h = F.embedding(self.tokens, self.model.model.embed_tokens.weight)
        x = rms_norm(h, w.norm_first.weight, w.norm_first.eps, backend=self.backend)
        seq = cache.lengths + self.n_new
        rows = {"seq": seq}
        if self.sealed_table is not None:
            rows["sealed"] = self.sealed_table[:, seq]  # (keys, B): row k contiguous
        if self.cl_table is not None:
            rows["cl"] = self.cl_table[:, seq]  # (1 + ring slots, B): the sealed token, then the ring's tokens
        if isinstance(cache, XQuantCache) and cache.latent and cache.spec.fp16_channel0:
            rows["slot"] = cache.lengths.clamp(max=self.cap - 1)[:, None, None]
        for i, ld in enumerate(w.layers):
            self.on_section(f"layer {i}")
            parts = layer_head(x, ld)
            q = rope_q(parts["q"].view(self.b, self.cfg.num_attention_heads, self.cfg.head_dim), self.cos, self.sin,
                       cache.lengths, backend=self.backend)
            attn = self.attend(i, parts, q, rows)
            h, x = fused_layer_tail(h, attn.view(self.b, -1), ld, backend=self.backend)
        self.on_section("after")
        logits = F.linear(x, self.model.output_weight()).float()
        cache.lengths.add_(self.n_new)
        return logits

    def attend(self, layer: int, parts: dict[str, Tensor], q: Tensor, rows: dict[str, Tensor]) -> Tensor:
        """Append this layer's stream inputs and attend (B, H, D), as the cache kind does."""
        cache, seq, be = self.cache, rows["seq"], self.backend
        if isinstance(cache, KVCache):
            heads = (self.b, self.cfg.num_key_value_heads, self.cfg.head_dim)
            k_buf, v_buf = cache.k[layer], cache.v[layer]
            kv_append_rope(k_buf, v_buf, parts["k"].view(heads), parts["v"].view(heads), self.cos, self.sin,
                           cache.lengths, backend=be)
            return kv_attention(q, k_buf, v_buf, seq, window=cache.attention_window, capacity=self.cap, backend=be)
        streams = cache.streams[layer]
        if isinstance(cache, KiviCache):
            ks, vs = (self.append_view(st, parts[name], rows) for st, name in zip(streams, ("k", "v")))
            return kivi_attention(q, ks, vs, self.cos, self.sin, seq, capacity=self.cap, backend=be)
        if isinstance(cache, XQuantCLCache) and layer >= cache.base - 1:
            return self.attend_delta(layer, parts, q, rows)
        m_k, m_v = self.layer_weights[layer]
        wl = cache.weights[layer]
        if not cache.latent:
            ks = vs = self.append_view(streams[0], parts["x"], rows)
            ch0 = None
        else:
            ks, vs = (self.append_view(st, parts[name], rows) for st, name in zip(streams, ("k", "v")))
            ch0 = None
            if cache.spec.fp16_channel0:
                ch0 = streams[2].full
                ch0.scatter_(1, rows["slot"], parts["ch0"][:, None].to(ch0.dtype))
        return xquant_attention(q, ks, vs, m_k, m_v, self.cos, self.sin, seq, b_k=wl.b_k, b_v=wl.b_v, k_ch0=ch0,
                                capacity=self.cap, backend=be)

    def append_view(self, st: Stream, new: Tensor, rows: dict[str, Tensor], sub: Tensor | None = None,
                    sub_start: Tensor | None = None) -> PackedStream:
        """Append one token per row (n_new of them valid) and return the kernels' view after the step."""
        stream_append(new[:, None].to(st.dtype), self.cache.lengths, self.n_new, st.buffers, window=st.window,
                      spec=st.spec, sub=sub, sub_start=sub_start, backend=self.backend)
        sealed = rows["sealed"][self.keys.index(_key(st))]
        return ring_view(st.buffers, rows["seq"], window=st.window, spec=st.spec, sealed=sealed)

    def attend_delta(self, layer: int, parts: dict[str, Tensor], q: Tensor, rows: dict[str, Tensor]) -> Tensor:
        """An XQuant-CL seed or delta layer: append, update the accumulator in place, attend over it."""
        cache, seq, be = self.cache, rows["seq"], self.backend
        dl = self.layer_weights[layer]
        acc = cache.acc_buffer()
        new = parts["x"]
        cl, tail_sub = rows["cl"], None
        if dl.seed:
            packed = self.append_view(dl.stream, new, rows)
        else:
            if dl.u is None:  # MHA: X̂_{i−1} at the sealed token, then at the ring's tokens
                down = acc.gather(1, cl.T[..., None].expand(-1, -1, acc.shape[-1]))
            else:  # GQA: the same projected on U_kv, the sealed token's from its float64 chain
                down = xquant_cl_project(acc, cl[1:].T, self.sealing, dl.u, backend=be)
            packed = self.append_view(dl.stream, new, rows, sub=down[:, :1], sub_start=cl[0])
            tail_sub = down[:, 1:]  # the update kernel forms the ring's deltas as it reads them
        xquant_cl_update(acc, packed, seq, u_kv=dl.u, seed=dl.seed, tail_sub=tail_sub, sealing=self.sealing,
                         sealing_pos=cl[0], capacity=self.cap, backend=be)
        dense = PackedStream.dense(acc, self.zeros)
        return xquant_attention(q, dense, dense, dl.w_k.T, dl.w_v.T, self.cos, self.sin, seq, b_k=dl.b_k,
                                b_v=dl.b_v, capacity=self.cap, backend=be)


def unsupported(cache: ModelCache) -> str | None:
    """Why `cache` cannot run the static step, or None."""
    if isinstance(cache, KVCache):
        return None
    if not isinstance(cache, (KiviCache, XQuantCache)):
        return f"the {cache.kind} cache has no static decode step"
    spec = cache.spec
    if spec.quantize_partial:
        return "the paper protocol (quantize_partial) decodes on the reference path"
    window = cache.attention_window
    if window is not None and window < cache.max_len:
        return (f"the model's sliding window ({window} tokens) is shorter than the context ({cache.max_len}): the "
                f"{spec.name} kernels attend to every cached token, so this cache decodes eagerly")
    for i, layer in enumerate(cache.streams):
        for j, st in enumerate(layer):
            if st.spec is None and not (j == 2 and isinstance(cache, XQuantCache) and cache.spec.fp16_channel0):
                return f"layer {i} stream {j} is unquantized: only quantized streams have a static append"
    return None


def _key(st: Stream) -> tuple:
    return st.window, st.spec


def _rebuild_weights(cache: ModelCache, layer: int):
    """Per layer, what the attention rebuilds K and V with: (m_k, m_v), or a CL seed/delta layer's `DeltaLayer`."""
    if isinstance(cache, XQuantCLCache) and layer >= cache.base - 1:
        return cache.delta_layer(layer)[0]
    if isinstance(cache, XQuantCache):
        return cache.rebuild_weights(layer)
    return None


def _cl_table(cache: XQuantCLCache, n: Tensor) -> Tensor:
    """(1 + ring slots, max_len + 1): for a row of n tokens after the step (n = 0..max_len): the token its append sealed (n − 1 − window,
    clamped at 0), then the token in each ring slot s (the one of [n − cap, n) congruent to s), clamped
    into the buffer. All delta streams share window and ring capacity."""
    st = cache.streams[-1][0]
    cap = st.tail.shape[1]
    sealed = (n - 1 - st.window).clamp(min=0)[:, None]
    base = (n - cap)[:, None]
    s = torch.arange(cap, device=n.device)[None, :]
    ring = (base + (s - base).remainder(cap)).clamp(0, cache.max_len - 1)
    return torch.cat([sealed, ring], dim=1).T.contiguous()
