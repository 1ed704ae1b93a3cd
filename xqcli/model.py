"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) in pure torch, with HF parameter names.

It is the reference runtime: CPU or CUDA, SDPA attention, batch >= 1 with per-row lengths. Attention
never branches on the cache kind: each layer hands its post-norm input X to the cache and gets back
post-RoPE K and V (see `xqcli.cache.base`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from xqcli.config import ModelConfig
from xqcli.rope import Rope

if TYPE_CHECKING:
    from xqcli.cache.base import ModelCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as HF: normalize in fp32, cast back, then apply the gain.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.q_dim, cfg.hidden_size, bias=False)

    def split_heads(self, t: torch.Tensor, n_heads: int) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, n_heads, self.cfg.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE K and V (B, n_kv, T, hd) from post-norm X: what every cache kind rebuilds."""
        n_kv = self.cfg.num_key_value_heads
        return self.split_heads(self.k_proj(x), n_kv), self.split_heads(self.v_proj(x), n_kv)

    def forward(self, x: torch.Tensor, layer: int, cache: "ModelCache", rope: Rope,
                mask: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        q = self.split_heads(self.q_proj(x), cfg.num_attention_heads)
        q = rope.apply(q, cache.positions, cache.step_total())
        b, _, t, _ = q.shape
        fused = cache.fused_attention(layer, x, q)  # decode kernels: K/V never materialized
        if fused is not None:
            return self.o_proj(fused.reshape(b, t, cfg.q_dim).to(x.dtype))
        k, v = cache.update_and_fetch(layer, x)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                             is_causal=mask is None, enable_gqa=cfg.is_gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, cfg.q_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Inner(nn.Module):
    """`model.*` in HF names: embeddings, layers and the final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """Causal LM. `forward(tokens, cache, n_new)` returns logits for every new position."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Inner(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope: Rope | None = None

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def rope(self) -> Rope:
        if self._rope is None or self._rope.inv_freq.device != self.device:
            self._rope = Rope(self.config, self.device)
        return self._rope

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, tokens: torch.Tensor, cache: "ModelCache",
                      n_new: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Run one step through every layer and commit it to the cache; returns final-norm hidden (B, T, d).

        n_new: valid tokens per row (default: all T); a list saves reading a device tensor back."""
        b, t = tokens.shape
        cache.begin([t] * b if n_new is None else n_new, t)
        mask = cache.attention_mask()
        h = self.model.embed_tokens(tokens)
        rope = self.rope
        for i, layer in enumerate(self.model.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), i, cache, rope, mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        cache.end()
        return self.model.norm(h)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: "ModelCache | None" = None,
                n_new: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32. Without a cache, a throwaway KV cache of the prompt's size is used."""
        if cache is None:
            from xqcli.cache.base import KVCache

            cache = KVCache(self, tokens.shape[0], tokens.shape[1])
        h = self.hidden_states(tokens, cache, n_new)
        return F.linear(h, self.output_weight()).float()
