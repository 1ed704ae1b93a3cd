"""`XqLlamaForCausalLM`: vLLM's Llama with each attention layer caching X, its SVD latents, XQuant-CL's deltas or
KIVI's K and V in vLLM pages.

Selected with `hf_overrides={"architectures": ["XqLlamaForCausalLM"]}` (optionally `"xq_cache": "xquant-4"`;
default: the bundle's `cache_defaults`, else `xquant-4`). Only the attention changes: q comes from vLLM's fused
qkv projection and RoPE; the cached streams are X (xquant, MHA), X·U_k, X·U_v (xquant, GQA, docs/design.md §3),
(X − X̂_{i−1})·U_kv or X − X̂_{i−1} (xquant-cl, `xqcli.vllm_plugin.cl`) or pre-RoPE K, V (kivi); K and V are rebuilt
from the pages on every forward (`xqcli.vllm_plugin.backend`). Under tensor parallelism each rank caches the
streams of its own kv-head slice (docs/vllm.md). `"xq_exact": True` computes every product as xq does instead
(`xqcli.vllm_plugin.exact`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from xqcli.bundle.format import is_bundle, open_bundle
from xqcli.bundle.projections import LayerProjections, layer_projections
from xqcli.cache.spec import CacheSpec
from xqcli.kernels.kivi_attention import kivi_attention
from xqcli.kernels.packed import PagedStream
from xqcli.kernels.xquant_attention import xquant_attention
from xqcli.kernels.xquant_cl import xquant_cl_attention, xquant_cl_update
from xqcli.load import load
from xqcli.vllm_plugin.backend import StagingPool, XQuantAttention
from xqcli.vllm_plugin.cl import Accumulator, ChainLayer, layer_layout
from xqcli.vllm_plugin.exact import ExactNumerics

DEFAULT_CACHE = "xquant-4"


def cache_kind(hf_config, model_path: str) -> tuple[CacheSpec, list[LayerProjections] | None]:
    """The cache kind to run (hf_overrides `xq_cache`, else the bundle's default, else xquant-4) and a bundle's
    stored SVD projections (None: computed from the weights, as `xq generate` does on a plain HF folder)."""
    name, projections = getattr(hf_config, "xq_cache", None), None
    folder = Path(model_path)
    if folder.is_dir() and is_bundle(folder):
        bundle = open_bundle(folder)
        name = name or (bundle.manifest.get("cache_defaults") or {}).get("cache")
        projections = bundle.projections() if bundle.has_projections else None
    spec = CacheSpec.parse(name or DEFAULT_CACHE, window=0)
    if spec.method == "kv" or spec.fp16_channel0 or spec.rotate:
        raise ValueError(f"xq's vLLM plugin runs xquant-B, xquant-cl-B and kivi-B (B: 2, 3, 4, 8 or fp; no +ch0, "
                         f"+rot), not {spec.name}; set hf_overrides xq_cache, e.g. xquant-4")
    return spec, projections


class XqLlamaAttention(LlamaAttention):
    """LlamaAttention whose `attn` caches this rank's X streams (XQuant-CL's deltas, KIVI's K and V) and rebuilds K,
    V from them."""

    def __init__(self, *args, prefix: str = "", **kwargs) -> None:
        super().__init__(*args, prefix=prefix, **kwargs)
        vllm_config = get_current_vllm_config()
        forward_context = vllm_config.compilation_config.static_forward_context
        del forward_context[f"{prefix}.attn"]  # replaced below under the same name
        shared = _shared(vllm_config)
        self.shared = shared
        self.bundle_projections = shared.projections
        self.layer = extract_layer_index(prefix)
        hidden = self.hidden_size
        # KIVI caches this rank's K and V whatever the head layout. XQuant caches latents when this rank's are
        # narrower than X (docs/design.md §3; under TP each rank has its own kv-head slice, docs/vllm.md), and X
        # only when it is exactly this rank's kv width (MHA without TP), since vLLM views a cached stream as
        # (kv_heads, head_dim); anything else would store more than X.
        self.kivi = shared.spec.method == "kivi"
        self.latent = not self.kivi and 2 * self.kv_size < hidden
        if not self.kivi and not self.latent and self.kv_size != hidden:
            raise ValueError(f"xq's vLLM plugin cannot cache this layer's X in its {self.num_kv_heads} kv heads x "
                             f"{self.head_dim} (X is {hidden} wide): use a tensor-parallel size that leaves each rank "
                             "under half of X's width in kv heads, or 1 for MHA models")
        # XQuant-CL's seeds and deltas: X·U_kv with this rank's [W_k | W_v] basis under TP.
        layout, self.part = layer_layout(shared.spec, self.layer, self.kv_size, self.latent, torch.get_default_dtype())
        rope = self.rotary_emb
        fused = (layout.quantized and not shared.exact_wanted and rope.is_neox_style
                 and rope.rotary_dim == self.head_dim)  # the kernels' RoPE: rotate-half over the whole head
        self.attn = XQuantAttention(
            layout=layout, layer=self.layer, staging=shared.staging, rebuild=self.rebuild, stream_values=self.stream_values,
            fused_decode=self.fused_decode if fused else None, num_heads=self.num_heads, head_size=self.head_dim,
            scale=self.scaling, num_kv_heads=self.num_kv_heads, cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn")
        self.accumulator = shared.accumulator
        self.chain: ChainLayer | None = None  # a seed or delta layer's, set with the weights
        self.factors: tuple[torch.Tensor, ...] = ()
        self.kv_bias: tuple[torch.Tensor, torch.Tensor] | None = None

    def capture_weights(self, exact: ExactNumerics | None = None) -> None:
        """Derive the rebuild weights from this rank's W_k, W_v while they are plain tensors: after loading, before
        vLLM's CPU GEMM dispatch may repack (and drop) `qkv_proj.weight`; under `xq_exact` xq's own tensors (the
        products' operands in xq's layouts: a contiguous copy of a transposed weight rounds differently). Latents:
        (u_k, m_k, u_v, m_v); X: (W_kᵀ, W_vᵀ); XQuant-CL's X̂: (W_k, W_v) for `F.linear`, with U_kv in `chain`.
        KIVI needs none: it caches K and V themselves."""
        if self.kivi:
            return
        if exact is None:
            w, b = self.qkv_proj.weight.detach(), self.qkv_proj.bias
            ks, vs = slice(self.q_size, self.q_size + self.kv_size), slice(self.q_size + self.kv_size, None)
            w_k, w_v = w[ks].clone(), w[vs].clone()
            self.kv_bias = None if b is None else (b.detach()[ks].clone(), b.detach()[vs].clone())
            w_kt, w_vt = w_k.T.contiguous(), w_v.T.contiguous()
        else:
            attn = exact.model.layers[self.layer].self_attn
            w_k, w_v = attn.k_proj.weight, attn.v_proj.weight
            self.kv_bias = None if attn.k_proj.bias is None else (attn.k_proj.bias, attn.v_proj.bias)
            w_kt, w_vt = w_k.T, w_v.T
        if not self.latent and self.part == "plain":
            self.factors = (w_kt, w_vt)
            return
        if exact is not None:
            p = exact.projections()[self.layer]
        elif self.bundle_projections is not None and self.tp_size == 1:
            p = self.bundle_projections[self.layer]
        else:
            p = layer_projections(w_k, w_v)  # under TP: the SVD of this rank's kv-head slice (docs/vllm.md)
        # xq's layouts under xq_exact (the factors as `Artifacts.projections` casts them), else contiguous copies
        cast = (lambda t: t.to(w_k.dtype)) if exact is not None else (lambda t: t.to(w_k.dtype).contiguous())
        if self.part == "plain":
            self.factors = tuple(cast(t) for t in (p.k.u, p.k.m, p.v.u, p.v.m))
            return
        self.chain = ChainLayer(seed=self.part == "seed", u=cast(p.kv.u) if self.latent else None,
                                sealing=self.latent and self.attn.layout.quantized)
        self.factors = (w_k, w_v)

    @property
    def tp_size(self) -> int:
        return self.total_num_heads // self.num_heads

    def stream_values(self, key: torch.Tensor, value: torch.Tensor) -> list[torch.Tensor]:
        """The streams `forward` handed to the cache, in the layout's order (a 2·d_kv-wide CL stream in two halves:
        vLLM views key and value as this rank's kv heads)."""
        if self.chain is not None and self.latent:
            return [torch.cat([key.flatten(1), value.flatten(1)], dim=-1)]
        return [key, value][:len(self.attn.layout.streams)]

    def rebuild(self, values: list[torch.Tensor], positions: torch.Tensor, request: int, new: slice
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """K (RoPE at `positions`) and V, (n, kv_size), from dequantized streams of request `request` of the batch,
        whose new tokens are `new` of the batch's."""
        if self.kivi:  # the cached pre-RoPE K (its bias included) and V themselves
            k, v = values
        else:
            f = self.factors
            b_k, b_v = self.kv_bias or (None, None)
            if self.chain is not None:  # X̂_i = X̂_{i−1} + this layer's dequantized deltas (the seed: alone)
                x = self.accumulator.add(request, new, self.chain.up(values[0]), self.chain.seed)
                if self.chain.sealing:  # the new tokens' chain in float64, from their stored values
                    stored = values[0][values[0].shape[0] - (new.stop - new.start):]
                    self.accumulator.seal(new, self.chain.up64(stored), self.chain.seed)
                k, v = F.linear(x, f[0], b_k), F.linear(x, f[1], b_v)  # as xq's XQuantCLCache
            else:
                k, v = (values[0] @ f[1], values[1] @ f[3]) if self.latent else (values[0] @ f[0], values[0] @ f[1])
                if b_k is not None:
                    k, v = k + b_k, v + b_v
        exact = self.shared.exact
        if exact is not None:
            return exact.rope(k, positions, self.head_dim), v
        k, _ = self.rotary_emb(positions, k.contiguous(), None)
        return k, v

    def fused_decode(self, q: torch.Tensor, streams: list[PagedStream], seq_lens: torch.Tensor, starts: list[int],
                     backend: str) -> torch.Tensor:
        """Attention of decode rows (q: (B, H, D), one new token each, at `starts` in the batch's tokens) over
        their pages with xq's fused kernels: K and V rebuilt in registers as `rebuild` does densely. XQuant-CL
        brings X̂ up to this layer in a dense buffer first (`Accumulator.dense`)."""
        cos, sin = self.shared.rope_tables(self.rotary_emb, q.device)
        b_k, b_v = self.kv_bias or (None, None)
        run = {"scale": self.scaling, "max_seq_len": int(seq_lens.max()), "backend": backend}
        if self.kivi:
            return kivi_attention(q, streams[0], streams[1], cos, sin, seq_lens, **run)
        f = self.factors
        if self.chain is None:
            k, v = streams if self.latent else (streams[0], streams[0])
            m_k, m_v = (f[1], f[3]) if self.latent else (f[0], f[1])
            return xquant_attention(q, k, v, m_k, m_v, cos, sin, seq_lens, b_k=b_k, b_v=b_v, **run)
        acc = self.accumulator.dense_for(starts, seq_lens, self.hidden_size, f[0].dtype, self.chain.seed)
        sealing = None  # the new tokens' float64 chain, extended by the update kernel
        if self.chain.sealing:
            sealing = (torch.zeros(len(starts), self.hidden_size, dtype=torch.float64, device=q.device)
                       if self.chain.seed else self.accumulator.sealed[starts].contiguous())
        xquant_cl_update(acc, streams[0], seq_lens, u_kv=self.chain.u, seed=self.chain.seed, sealing=sealing,
                         sealing_pos=seq_lens - 1, max_seq_len=run["max_seq_len"], backend=backend)
        if sealing is not None:
            self.accumulator.sealed_next[starts] = sealing  # the kernel's sum: what `seal` writes on the torch path
        self.accumulator.dense_done(seq_lens)
        return xquant_cl_attention(q, acc, f[0], f[1], cos, sin, seq_lens, b_k=b_k, b_v=b_v, **run)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Under `xq_exact` xq's attention module of this layer gives q (and KIVI's K, V) and the output, request by
        request (`ExactNumerics`)."""
        exact = self.shared.exact
        rows = _whole_batch if exact is None else exact.rows
        if exact is None:
            qkv, _ = self.qkv_proj(hidden_states)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            # q only: vLLM's RoPE works in place, and KIVI caches K before RoPE (`rebuild` rotates every K).
            q, _ = self.rotary_emb(positions, q)
        else:
            xq_attn = exact.model.layers[self.layer].self_attn
            q = exact.rope(exact.linear(xq_attn.q_proj, hidden_states), positions, self.head_dim)
            k, v = (exact.linear(xq_attn.k_proj, hidden_states), exact.linear(xq_attn.v_proj, hidden_states)
                    ) if self.kivi else (None, None)
        if self.kivi:
            key, value = k, v
        elif self.chain is not None:  # deltas against X̂_{i−1} of the new tokens, from this forward's previous layer
            if self.chain.seed:
                self.accumulator.reset(hidden_states, self.chain.sealing)
            prev = self.accumulator.next_layer() if self.chain.sealing and not self.chain.seed else (
                self.accumulator.at_new_tokens())
            s = rows(self.chain.stream, hidden_states, prev)
            key, value = (s[:, :self.kv_size].contiguous(), s[:, self.kv_size:].contiguous()) if self.latent else (s, s)
        elif self.latent:
            key = rows(lambda x: x @ self.factors[0], hidden_states)
            value = rows(lambda x: x @ self.factors[2], hidden_states)
        else:
            key = value = hidden_states
        out = self.attn(q, key, value)
        if exact is not None:
            return exact.linear(xq_attn.o_proj, out)
        output, _ = self.o_proj(out)
        return output


def _whole_batch(f, *ts: torch.Tensor) -> torch.Tensor:
    """`ExactNumerics.rows` without the mode: one product over the whole batch."""
    return f(*ts)


@dataclass
class _Shared:
    """What a model's layers share: the cache kind, a bundle's projections, the staging pool, XQuant-CL's X̂, and
    under `xq_exact` xq's model (set once the weights are loaded)."""

    spec: CacheSpec
    projections: list[LayerProjections] | None
    staging: StagingPool
    accumulator: Accumulator
    exact_wanted: bool = False
    exact: ExactNumerics | None = None
    rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def rope_tables(self, rotary_emb, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (positions, head_dim) cos and sin in HF's rotate-half layout, from vLLM's RoPE cache (scaling
        included), as the fused kernels take them; one pair per device for all layers."""
        if device not in self.rope:
            cos, sin = rotary_emb.cos_sin_cache.float().to(device).chunk(2, dim=-1)
            self.rope[device] = (torch.cat([cos, cos], -1).contiguous(), torch.cat([sin, sin], -1).contiguous())
        return self.rope[device]


_SHARED: dict[int, _Shared] = {}


def _shared(vllm_config) -> _Shared:
    """One `_Shared` per engine config (layers are built one by one, each with the current vLLM config)."""
    key = id(vllm_config)
    if key not in _SHARED:
        spec, projections = cache_kind(vllm_config.model_config.hf_config, vllm_config.model_config.model)
        if spec.method == "xquant-cl" and vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("xq's vLLM plugin runs xquant-cl without pipeline parallelism only: a layer's X̂ is the "
                             "previous layer's plus its deltas, and the plugin does not pass it between stages")
        exact = exact_wanted(vllm_config)
        pages = 2 * vllm_config.scheduler_config.max_num_seqs * vllm_config.model_config.hf_config.num_hidden_layers
        _SHARED[key] = _Shared(spec, projections, StagingPool(pages), Accumulator(), exact)
    return _SHARED[key]


def exact_wanted(vllm_config) -> bool:
    """hf_overrides `xq_exact`, checked: it computes as xq's CPU reference path does, so one rank, on the CPU."""
    exact = getattr(vllm_config.model_config.hf_config, "xq_exact", False)
    if exact not in (True, False):
        raise ValueError(f"hf_overrides xq_exact must be true or false, not {exact!r}")
    if not exact:
        return False
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise ValueError("xq_exact runs on one rank (tensor_parallel_size and pipeline_parallel_size 1): it "
                         "computes every product as xq does on one CPU; drop xq_exact to run in parallel")
    if vllm_config.device_config.device_type != "cpu":
        raise ValueError(f"xq_exact runs on the CPU (xq's reference arithmetic), not on "
                         f"{vllm_config.device_config.device_type}; drop xq_exact there")
    return True


class XqLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None, attn_layer_type=XqLlamaAttention) -> None:
        super().__init__(vllm_config, prefix=prefix, config=config, attn_layer_type=attn_layer_type)


class XqLlamaForCausalLM(LlamaForCausalLM):
    # vLLM's loader reads every *.safetensors of the folder; a bundle's projections.safetensors is not weights.
    allow_patterns_overrides: ClassVar[list[str]] = ["model*.safetensors"]

    def __init__(self, *, vllm_config, prefix: str = "", layer_type=XqLlamaDecoderLayer) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.shared = _shared(vllm_config)
        self.model_path, self.model_dtype = vllm_config.model_config.model, vllm_config.model_config.dtype

    def load_weights(self, weights) -> set[str]:
        loaded = super().load_weights(weights)
        if self.shared.exact_wanted:
            self.shared.exact = ExactNumerics(load(self.model_path, dtype=self.model_dtype, device="cpu"))
        for layer in self.model.layers:
            if isinstance(layer, XqLlamaDecoderLayer):  # pipeline parallel: other ranks' layers are placeholders
                layer.self_attn.capture_weights(self.shared.exact)
        return loaded

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None):
        """vLLM's Llama forward, or under `xq_exact` xq's `Transformer.hidden_states` with this model's attention
        layers (their pages) in place of xq's cache."""
        exact = self.shared.exact
        if exact is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        exact.begin(self._query_starts(), positions.shape[0])
        xq = exact.model
        h = xq.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer, xq_layer in zip(self.model.layers, xq.layers):
            h = h + layer.self_attn(positions, xq_layer.input_layernorm(h))
            h = h + exact.linear(xq_layer.mlp, xq_layer.post_attention_layernorm(h))
        return xq.model.norm(h)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        exact = self.shared.exact
        return super().compute_logits(hidden_states) if exact is None else exact.logits(hidden_states)

    def _query_starts(self) -> list[int] | None:
        """The running forward's per-request token ranges (None in vLLM's profiling runs, which carry none)."""
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            metadata = metadata[0] if metadata else None
        md = (metadata or {}).get(self.model.layers[0].self_attn.attn.layer_name)
        return None if md is None else md.query_start_loc
