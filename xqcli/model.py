"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) in pure torch, with HF parameter names.

It is the reference runtime: CPU or CUDA, SDPA attention, batch >= 1 with per-row lengths. Attention
never branches on the cache kind: each layer hands its post-norm input X to the cache and gets back
post-RoPE K and V. The model knows caches only through `StepCache`, the few methods it calls (every
kind in `xqcli.cache` has them); without a cache it attends over the prompt itself.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from xqcli.config import ModelConfig
from xqcli.rope import Rope, causal_mask, rotate


class StepCache(Protocol):
    """What a forward step asks of a cache (`xqcli.cache.base.ModelCache` implements it)."""

    def begin(self, n_new: torch.Tensor | list[int], width: int) -> torch.Tensor:
        """Start a step of `width` new tokens per row (`n_new` of them valid); returns positions (B, width)."""

    def attention_mask(self) -> torch.Tensor | None:
        """Boolean (B, 1, T, S) for this step, or None for plain causal attention."""

    @property
    def positions(self) -> torch.Tensor:
        """This step's positions (B, T)."""

    def step_total(self) -> int:
        """Longest row after this step: the S of the keys attention sees."""

    def fused_attention(self, layer: int, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
        """Store X and return the attention output from a fused kernel, or None (then update_and_fetch)."""

    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store X and return post-RoPE K and V (B, n_kv, S, head_dim) of every cached token."""

    def end(self) -> None:
        """Commit the step."""


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

    def forward(self, x: torch.Tensor, layer: int, cache: StepCache, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None) -> torch.Tensor:
        """rope: cos and sin at this step's positions (`Rope.cos_sin`), gathered once for every layer."""
        cfg = self.cfg
        q = rotate(self.split_heads(self.q_proj(x), cfg.num_attention_heads), *rope)
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

    def hidden_states(self, tokens: torch.Tensor, cache: StepCache | None = None,
                      n_new: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Run one step through every layer and commit it to the cache; returns final-norm hidden (B, T, d).

        n_new: valid tokens per row (default: all T); a list saves reading a device tensor back. Without a
        cache every row is the whole prompt (attention is causal, so padding after a row cannot reach it)."""
        b, t = tokens.shape
        if cache is None:
            if n_new is not None:
                raise ValueError("n_new needs a cache: without one every row is the whole prompt")
            cache = _PromptOnly(self, b, t)
        cache.begin([t] * b if n_new is None else n_new, t)
        mask = cache.attention_mask()
        h = self.model.embed_tokens(tokens)
        rope = self.rope.cos_sin(cache.positions, h.dtype, cache.step_total())
        for i, layer in enumerate(self.model.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), i, cache, rope, mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        cache.end()
        return self.model.norm(h)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: StepCache | None = None,
                n_new: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32. Without a cache, plain causal attention over the prompt."""
        h = self.hidden_states(tokens, cache, n_new)
        return F.linear(h, self.output_weight()).float()


class _PromptOnly:
    """The `StepCache` of a forward without a cache: each layer attends over the prompt's own K and V
    (the same numbers as an empty `kv` cache, without storing anything)."""

    def __init__(self, model: Transformer, batch: int, width: int) -> None:
        self.model, self.width = model, width
        self.positions = torch.arange(width, device=model.device).expand(batch, width)

    def begin(self, n_new: torch.Tensor | list[int], width: int) -> torch.Tensor:
        return self.positions

    def step_total(self) -> int:
        return self.width

    def attention_mask(self) -> torch.Tensor | None:
        w = self.model.config.sliding_window
        if w is None or self.width <= w:
            return None
        return causal_mask(self.positions, self.width, w).unsqueeze(1)

    def fused_attention(self, layer: int, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
        return None

    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.model.layers[layer].self_attn.project_kv(x)
        return self.model.rope.apply(k, self.positions, self.width), v

    def end(self) -> None:
        pass
