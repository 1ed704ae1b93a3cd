"""Positions: rotary embeddings in Hugging Face's rotate-half convention (`llama3` and `linear` scaling),
and which earlier positions a query sees (`causal_mask`).

Kept apart from the model because every cache kind that stores pre-RoPE keys (KIVI*, XQuant)
applies RoPE again to rebuilt keys at their absolute positions, and the caches build the attention
mask of a step while the model builds it when it runs without a cache.
"""

from __future__ import annotations

import math

import torch

from xqcli.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies (head_dim/2,), float32, with the config's scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        return inv / rs.factor
    if rs.rope_type == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class Rope:
    """cos/sin tables grown on demand; `apply` rotates (B, H, T, D) by per-row positions (B, T)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = inv_frequencies(cfg).to(device)
        self._cos = self._sin = torch.empty(0, cfg.head_dim, device=device)

    def _ensure(self, n: int) -> None:
        if n <= self._cos.shape[0]:
            return
        n = max(n, 2 * self._cos.shape[0], 256)
        t = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos, self._sin = emb.cos(), emb.sin()

    def tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions 0..n-1, (n, head_dim) float32: what the fused decode kernels read."""
        self._ensure(n)
        return self._cos[:n], self._sin[:n]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, bound: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, 1, T, D) for integer positions (B, T), all below `bound` when it is
        given (a cache knows it on the host; otherwise it is read from the positions: a device sync)."""
        self._ensure(bound if bound is not None else (int(positions.max()) + 1 if positions.numel() else 1))
        return self._cos[positions].unsqueeze(1).to(dtype), self._sin[positions].unsqueeze(1).to(dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor, bound: int | None = None) -> torch.Tensor:
        return rotate(x, *self.cos_sin(positions, x.dtype, bound))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by `Rope.cos_sin`'s tables: the caller gathers them once for many heads or
    layers (a decode step would otherwise gather them again in each of its layers)."""
    return x * cos + rotate_half(x) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def causal_mask(positions: torch.Tensor, n_keys: int, window: int | None = None) -> torch.Tensor:
    """Boolean (..., T, n_keys): the query at position p sees key j iff j <= p, and j > p - window
    when there is a sliding window (HF's rule: the window counts the query's own token)."""
    j = torch.arange(n_keys, device=positions.device)
    p = positions[..., None]
    mask = j <= p
    return mask & (j > p - window) if window is not None else mask
