"""`xquant-B`: caches post-norm X per-token and rebuilds K = X̂·W_kᵀ (+ b, then RoPE), V = X̂·W_vᵀ.

For grouped-query models it caches the SVD latents X·U_k (per-channel) and X·U_v (per-token) instead,
and rebuilds K = lat_k·M_k, V = lat_v·M_v (see `xqcli.bundle.projections`). Choice (ours): latents are
used when they are narrower than X, i.e. when 2·d_kv < d; otherwise X is cached. Variants: `+ch0` keeps
latent channel 0 of X·U_k unquantized in the model dtype (the paper's appendix B: fp16); `+rot` caches
X·R with R folded into the weights (`xqcli.bundle.rotation`).
"""

from __future__ import annotations

import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.base import ModelParts
from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.cache.stream import Stream, StreamCache


class XQuantCache(StreamCache):
    """XQuant: X (MHA-like) or the SVD latents X·U_k, X·U_v (GQA), rebuilt into K and V every step."""

    def __init__(self, parts: ModelParts, spec: CacheSpec, batch: int, max_len: int, device: torch.device | str,
                 artifacts: Artifacts, kernels: str = "auto") -> None:
        super().__init__(parts, spec, batch, max_len, device, artifacts, kernels)
        self.latent = uses_latents(self.config)
        self.streams = [self.layer_streams(spec.bits, i) for i in range(self.config.num_hidden_layers)]

    def layer_streams(self, bits: int | None, layer: int) -> list[Stream]:
        cfg, spec = self.config, self.spec
        if not self.latent:
            return [self.stream(cfg.hidden_size, spec.quant("token", bits, layer))]
        k = self.stream(cfg.kv_dim - int(spec.fp16_channel0), spec.quant("channel", bits, layer))
        v = self.stream(cfg.kv_dim, spec.quant("token", bits, layer))
        if spec.fp16_channel0:  # appendix B: channel 0 of X·U_k (the outlier channel) kept unquantized,
            # in the model dtype (fp16/bf16 on GPUs, as in the paper; fp32 in CPU tests)
            return [k, v, Stream(self.batch, self.max_len, 1, None, 0, self.dtype, self.device)]
        return [k, v]

    def rebuild_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_k, m_v) of one layer: K = values_k·m_k, V = values_v·m_v (R folded in under +rot)."""
        w = self.weights[layer]
        if not self.latent:
            r = self.rotation(self.config.hidden_size)
            if r is None:
                return w.w_k.T, w.w_v.T
            wk = self.folded(("wk", layer, r[0]), lambda: w.w_k.double() @ r[1].double())
            wv = self.folded(("wv", layer, r[0]), lambda: w.w_v.double() @ r[1].double())
            return wk.T, wv.T
        p = self.projections()[layer]
        r = self.rotation(self.config.kv_dim)  # +rot: only the per-token latent X·U_v is rotated
        m_v = p.v.m if r is None else self.folded(("mv", layer, r[0]), lambda: r[1].double().T @ p.v.m.double())
        return p.k.m, m_v

    def append_layer(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's X of one layer; returns (m_k, m_v) with K = values_k·m_k, V = values_v·m_v."""
        streams = self.streams[layer]
        if not self.latent:
            self.append(streams[0], self.rotate(x, self.rotation(self.config.hidden_size)))  # X̂·R under +rot
            return self.rebuild_weights(layer)
        p = self.projections()[layer]
        lat_k = self.by_row(lambda r: r @ p.k.u, x)
        lat_v = self.rotate(self.by_row(lambda r: r @ p.v.u, x), self.rotation(self.config.kv_dim))
        if self.spec.fp16_channel0:
            self.append(streams[2], lat_k[..., :1])
            lat_k = lat_k[..., 1:]
        self.append(streams[0], lat_k)
        self.append(streams[1], lat_v)
        return self.rebuild_weights(layer)

    def rebuild(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's X of one layer and rebuild pre-RoPE K, V (B, S, d_kv) for all tokens."""
        w = self.weights[layer]
        streams = self.streams[layer]
        m_k, m_v = self.append_layer(layer, x)
        vals_k = self.fetch(streams[0])
        vals_v = vals_k if not self.latent else self.fetch(streams[1])
        if self.latent and self.spec.fp16_channel0:
            vals_k = torch.cat([self.fetch(streams[2]).to(vals_k.dtype), vals_k], dim=-1)
        k, v = self.by_row(lambda r: r @ m_k, vals_k), self.by_row(lambda r: r @ m_v, vals_v)
        if w.b_k is not None:
            k, v = k + w.b_k, v + w.b_v
        return k, v

    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish_kv(*self.rebuild(layer, x))

    def fused_attention(self, layer: int, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
        """Dequantize -> rebuild K -> RoPE -> attention with V absorbed, in the kernels (K/V never stored)."""
        if not self.fused_ready():
            return None
        from xqcli.kernels.xquant_attention import xquant_attention

        w = self.weights[layer]
        streams = self.streams[layer]
        m_k, m_v = self.append_layer(layer, x)
        qq, cos, sin, seq, s = self.kernel_inputs(q)
        ks = self.packed(streams[0], seq)
        vs = ks if not self.latent else self.packed(streams[1], seq)
        ch0 = streams[2].full if self.latent and self.spec.fp16_channel0 else None
        out = xquant_attention(qq, ks, vs, m_k, m_v, cos, sin, seq, b_k=w.b_k, b_v=w.b_v,
                               k_ch0=ch0, max_seq_len=s, backend="triton")
        return out[:, :, None]

