"""The fp16/bf16 KV baseline (`kv`): post-RoPE K and V of every layer, preallocated for max_len tokens."""

from __future__ import annotations

import torch

from xqcli.cache.base import CacheBytes, ModelCache, ModelParts, state_tensor, tensor_bytes
from xqcli.rope import rotate


class KVCache(ModelCache):
    """The baseline: post-RoPE K and V in the model's float dtype, preallocated for max_len tokens."""

    kind = "kv"

    def __init__(self, parts: ModelParts, batch: int, max_len: int, device: torch.device | str) -> None:
        super().__init__(parts, batch, max_len, device)
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.project(layer, x)
        s = self.step_total()
        k, v = rotate(self.heads(k), *self.rope_new(k.dtype)), self.heads(v)
        self.rows_scatter(self.k[layer], k, token_dim=2)
        self.rows_scatter(self.v[layer], v, token_dim=2)
        return self.take(self.k[layer, :, :, :s]), self.take(self.v[layer, :, :, :s])

    def nbytes(self) -> CacheBytes:
        per_token = tensor_bytes(self.k, self.v) // self.max_len // self.batch
        return CacheBytes(payload=per_token * sum(self.host_lengths))

    def allocated(self) -> CacheBytes:
        return CacheBytes(payload=tensor_bytes(self.k, self.v))

    def bytes_per_token(self) -> float | None:
        n = sum(self.host_lengths)
        return self.nbytes().payload / n if n else None

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        # K is stored post-RoPE; a loaded row restarts at position 0, so its positions are the same.
        out = {}
        for b, n in enumerate(self.host_lengths):
            out[f"k.r{b}"], out[f"v.r{b}"] = self.k[:, b, :, :n], self.v[:, b, :, :n]
        return out

    def _load_state(self, meta: dict, tensors: dict[str, torch.Tensor], lengths: list[int]) -> None:
        L, _, h, _, d = self.k.shape
        for b, n in enumerate(lengths):
            for name, buf in (("k", self.k), ("v", self.v)):
                buf[:, b, :, :n] = state_tensor(tensors, f"{name}.r{b}", (L, h, n, d)).to(buf.device, buf.dtype)
