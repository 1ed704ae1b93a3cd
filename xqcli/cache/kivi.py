"""`kivi-B`: the paper's KIVI* baseline: pre-RoPE keys per-channel, values per-token, RoPE on fetch."""

from __future__ import annotations

import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.base import ModelParts
from xqcli.cache.spec import CacheSpec
from xqcli.cache.stream import Stream, StreamCache


class KiviCache(StreamCache):
    """KIVI*: pre-RoPE keys per-channel, values per-token (both group_size), RoPE after dequantization."""

    def __init__(self, parts: ModelParts, spec: CacheSpec, batch: int, max_len: int, device: torch.device | str,
                 artifacts: Artifacts, kernels: str = "auto") -> None:
        super().__init__(parts, spec, batch, max_len, device, artifacts, kernels)
        w = self.config.kv_dim
        self.streams = [[self.stream(w, spec.quant("channel", layer=i)),
                         self.stream(w, spec.quant("token", layer=i))] for i in range(self.config.num_hidden_layers)]

    def append_layer(self, layer: int, x: torch.Tensor) -> tuple[Stream, Stream]:
        """Project this step's X of one layer and append its pre-RoPE K and V; returns both streams."""
        ks, vs = self.streams[layer]
        k, v = self.project(layer, x)
        self.append(ks, k)
        self.append(vs, v)
        return ks, vs

    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs = self.append_layer(layer, x)
        return self.finish_kv(self.fetch(ks), self.fetch(vs))

    def fused_attention(self, layer: int, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
        if not self.fused_ready():
            return None
        from xqcli.kernels.kivi_attention import kivi_attention

        ks, vs = self.append_layer(layer, x)
        qq, cos, sin, seq, s = self.kernel_inputs(q)
        out = kivi_attention(qq, self.packed(ks, seq), self.packed(vs, seq), cos, sin, seq, max_seq_len=s,
                             backend="triton")
        return out[:, :, None]

