"""The cache kinds of XQuant (arXiv 2508.10395) behind the `ModelCache` interface.

Names (one vocabulary everywhere): `kv`, `kivi-B`, `xquant-B`, `xquant-cl-B` with B in {2, 3, 4, 8};
`-fp` instead of a bit width turns quantization off (the stream keeps the model dtype), which is how
the tests check that every kind is the same algebra as `kv`. Variant suffixes: `+ch0` keeps latent
channel 0 of X·U_k unquantized in the model dtype (the paper's appendix B: fp16).

- `kivi-B`: the paper's KIVI* baseline: pre-RoPE keys per-channel, values per-token, RoPE on fetch.
- `xquant-B`: caches post-norm X per-token and rebuilds K = X̂·W_kᵀ (+ b, then RoPE), V = X̂·W_vᵀ.
  For grouped-query models it caches the SVD latents X·U_k (per-channel) and X·U_v (per-token)
  instead, and rebuilds K = lat_k·M_k, V = lat_v·M_v (see `xqcli.bundle.projections`). Choice (ours): latents
  are used when they are narrower than X, i.e. when 2·d_kv < d; otherwise X is cached.
- `xquant-cl-B`: closed-loop cross-layer deltas. Layers < base_layers are plain XQuant at base_bits
  (4); layer base_layers-1 seeds the accumulator X̂; layer i >= base_layers stores Q(X_i − X̂_{i−1})
  and X̂_i = X̂_{i−1} + deq(...). For GQA the delta is projected on U_kv (2·d_kv wide) and
  X̂_i = X̂_{i−1} + deq(Q(ΔX_i·U_kv))·U_kvᵀ, [K|V] = X̂_i·[W_k|W_v].
  Choices (spec UNSPECIFIED, ours): deltas are quantized per-token; the running accumulator is kept in
  the model dtype, rebuilt every step from the base layer, and counted as `workspace` (the fused decode
  path keeps it in one (B, max_len, d) buffer that the CL kernel updates in place, layer after layer); on GQA the base
  layer stores Q4(X·U_kv) (KV-sized, like the paper's Table 4 sizes) and seeds X̂ = deq(...)·U_kvᵀ; the
  current token's own K/V come from X̂ like every other token's.

Residual window (all quantized kinds): the newest `window` tokens stay in full precision (default 128
for generation, 0 for the paper's perplexity protocol). A per-token stream quantizes a token as soon as
it leaves the window; a per-channel stream seals whole blocks of `group_size` tokens once they have
left it, so up to group_size−1 older tokens may wait in full precision too (KIVI's residual).
With `quantize_partial=True` (the paper protocol) tokens waiting in full precision are returned
fake-quantized (the partial block as one smaller group), as if the whole sequence had been quantized.
For XQuant-CL the full-precision window holds X (GQA: X·U_kv); a token's delta is formed when it is
sealed, against the accumulator of that moment, so encoder and decoder always see the same X̂_{i−1}
(no drift). A window token's X̂ is X̂_{i−1} + (X_i·U_kv − X̂_{i−1}·U_kv)·U_kvᵀ, whose K/V are exact.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from xqcli.cache.base import CacheBytes, KVCache, ModelCache, state_tensor, tensor_bytes
from xqcli.errors import InputError
from xqcli.cache.spec import BITS, CacheSpec, uses_latents
from xqcli.kernels.quant import QTensor, QuantSpec, dequantize, fake_quantize, packed_width, quantize
from xqcli.bundle.projections import model_projections
from xqcli.bundle.rotation import Rotation

if TYPE_CHECKING:
    from xqcli.model import Transformer

# --------------------------------------------------------------------------------------------- streams


class Stream:
    """One cached token sequence of width C per row: quantized sealed tokens plus a full-precision tail.

    `seal_fn(row, start, raw)` may transform raw tail values into what is quantized at sealing time
    (XQuant-CL forms its closed-loop deltas there); it defaults to the identity.
    """

    def __init__(self, batch: int, max_len: int, width: int, spec: QuantSpec | None, window: int,
                 dtype: torch.dtype, device: torch.device, *, quantize_partial: bool = False) -> None:
        self.spec, self.width, self.window, self.dtype = spec, width, window, dtype
        self.quantize_partial = quantize_partial
        self.sealed = [0] * batch
        self.tail_len = [0] * batch
        if spec is None:  # unquantized: everything lives in `full`
            self.full = torch.zeros(batch, max_len, width, dtype=dtype, device=device)
            return
        g = spec.group_size
        self.codes = torch.zeros(batch, max_len, packed_width(width, spec.bits), dtype=torch.uint8, device=device)
        if spec.axis == "token":
            sz = (batch, max_len, math.ceil(width / g))
            tail_cap = window
        else:
            sz = (batch, math.ceil(max_len / g), width)
            tail_cap = window + g - 1
        self.scale = torch.zeros(sz, dtype=torch.float16, device=device)
        self.zero = torch.zeros(sz, dtype=torch.float16, device=device)
        self.tail = torch.zeros(batch, tail_cap, width, dtype=dtype, device=device)

    def length(self, b: int) -> int:
        return self.sealed[b] + self.tail_len[b]

    def append(self, b: int, new: torch.Tensor, seal_fn: Callable | None = None) -> None:
        """Add row b's new tokens (T, width); seal what has left the window."""
        if self.spec is None:
            n0 = self.sealed[b]
            self.full[b, n0:n0 + new.shape[0]] = (seal_fn(b, n0, new) if seal_fn else new).to(self.dtype)
            self.sealed[b] += new.shape[0]
            return
        buf = torch.cat([self.tail[b, :self.tail_len[b]], new.to(self.dtype)])
        n = buf.shape[0]
        if self.spec.axis == "token":
            n_seal = max(0, n - self.window)
        else:
            g = self.spec.group_size
            n_seal = max(0, n - self.window) // g * g
        if n_seal:
            start = self.sealed[b]
            vals = seal_fn(b, start, buf[:n_seal]) if seal_fn else buf[:n_seal]
            q = quantize(vals, self.spec)
            self.codes[b, start:start + n_seal] = q.packed
            if self.spec.axis == "token":
                self.scale[b, start:start + n_seal] = q.scale
                self.zero[b, start:start + n_seal] = q.zero
            else:
                g0 = start // self.spec.group_size
                self.scale[b, g0:g0 + q.scale.shape[0]] = q.scale
                self.zero[b, g0:g0 + q.zero.shape[0]] = q.zero
            self.sealed[b] += n_seal
        rest = n - n_seal
        self.tail[b, :rest] = buf[n_seal:]
        self.tail_len[b] = rest

    def sealed_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """sealed[b] for rows of these lengths (B,), as int32 on their device, without reading anything
        back: `append` seals a per-token stream's tokens as they leave the window, a per-channel stream's
        in whole groups, so sealed = max(0, length − window), rounded down to the group for channels."""
        n = (lengths - self.window).clamp(min=0)
        if self.spec.axis == "channel":
            n = n // self.spec.group_size * self.spec.group_size
        return n.to(torch.int32)

    def sealed_values(self, b: int) -> torch.Tensor:
        """Dequantized sealed tokens of row b, (sealed, width)."""
        n = self.sealed[b]
        if self.spec is None:
            return self.full[b, :n]
        if n == 0:
            return self.codes.new_zeros(0, self.width, dtype=self.dtype)
        if self.spec.axis == "token":
            scale, zero = self.scale[b, :n], self.zero[b, :n]
        else:
            nb = n // self.spec.group_size
            scale, zero = self.scale[b, :nb], self.zero[b, :nb]
        q = QTensor(self.codes[b, :n], scale, zero, self.spec, torch.Size((n, self.width)), self.dtype)
        return dequantize(q, self.dtype)

    def tail_values(self, b: int) -> torch.Tensor:
        """Row b's full-precision tail, fake-quantized in the paper protocol, (tail_len, width)."""
        if self.spec is None:
            return self.full.new_zeros(0, self.width)
        t = self.tail[b, :self.tail_len[b]]
        if self.quantize_partial and t.shape[0]:
            return fake_quantize(t, self.spec)
        return t

    def nbytes(self) -> CacheBytes:
        """Bytes held by the stored tokens now (per-channel scales count per started block)."""
        if self.spec is None:
            per_tok = self.width * self.full.element_size()
            return CacheBytes(payload=per_tok * sum(self.sealed))
        per_tok = self.codes.shape[-1]
        if self.spec.axis == "token":
            sz = self.scale.shape[-1] * 4 * sum(self.sealed)
        else:
            sz = sum(math.ceil(n / self.spec.group_size) for n in self.sealed) * self.width * 4
        tail = sum(self.tail_len) * self.tail.shape[-1] * self.tail.element_size()
        return CacheBytes(payload=per_tok * sum(self.sealed), scales=sz, fp_window=tail)

    def allocated(self) -> CacheBytes:
        if self.spec is None:
            return CacheBytes(payload=tensor_bytes(self.full))
        return CacheBytes(payload=tensor_bytes(self.codes), scales=tensor_bytes(self.scale, self.zero),
                          fp_window=tensor_bytes(self.tail))

    def reset(self) -> None:
        self.sealed = [0] * len(self.sealed)
        self.tail_len = [0] * len(self.tail_len)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Row b's stored data, cut at its length: codes, scales, zero points and tail (or `full`)."""
        out = {}
        for b, (n, t) in enumerate(zip(self.sealed, self.tail_len)):
            r = f"{prefix}.r{b}"
            if self.spec is None:
                out[f"{r}.full"] = self.full[b, :n]
                continue
            ns = n if self.spec.axis == "token" else n // self.spec.group_size  # channel: whole sealed blocks
            out |= {f"{r}.codes": self.codes[b, :n], f"{r}.scale": self.scale[b, :ns], f"{r}.zero": self.zero[b, :ns],
                    f"{r}.tail": self.tail[b, :t]}
        return out

    def load_state(self, prefix: str, sealed: list[int], tail_len: list[int], tensors: dict[str, torch.Tensor]) -> None:
        for b, (n, t) in enumerate(zip(sealed, tail_len)):
            r = f"{prefix}.r{b}"
            if self.spec is None:
                self.full[b, :n] = state_tensor(tensors, f"{r}.full", (n, self.width)).to(self.full)
            else:
                if t > self.tail.shape[1]:
                    raise InputError(f"saved cache stream {r} has {t} tail tokens, more than this window holds "
                                     f"({self.tail.shape[1]})")
                ns = n if self.spec.axis == "token" else n // self.spec.group_size
                self.codes[b, :n] = state_tensor(tensors, f"{r}.codes", (n, self.codes.shape[-1])).to(self.codes)
                self.scale[b, :ns] = state_tensor(tensors, f"{r}.scale", (ns, self.scale.shape[-1])).to(self.scale)
                self.zero[b, :ns] = state_tensor(tensors, f"{r}.zero", (ns, self.zero.shape[-1])).to(self.zero)
                self.tail[b, :t] = state_tensor(tensors, f"{r}.tail", (t, self.tail.shape[-1])).to(self.tail)
            self.sealed[b], self.tail_len[b] = n, (0 if self.spec is None else t)


# ----------------------------------------------------------------------------------------- the caches


class StreamCache(ModelCache):
    """Shared machinery: per-layer streams, appending valid new tokens row by row, padded fetches."""

    def __init__(self, model: "Transformer", spec: CacheSpec, batch: int, max_len: int,
                 device: torch.device | None = None) -> None:
        super().__init__(model, batch, max_len, device if device is not None else model.device)
        if spec.clips is not None and len(spec.clips) != model.config.num_hidden_layers:
            raise InputError(f"{len(spec.clips)} per-layer clip ratios for a {model.config.num_hidden_layers}-layer "
                             "model")
        self.spec = spec
        self.cfg = model.config
        self.dtype = model.dtype
        self.streams: list[list[Stream]] = []
        self.kernels = "auto"  # "auto": fused decode kernels on CUDA; "triton": forced (interpreter tests); "off"
        self._step_memo: dict = {}

    def stream(self, width: int, qspec: QuantSpec | None) -> Stream:
        return Stream(self.batch, self.max_len, width, qspec, self.spec.window, self.dtype, self.device,
                      quantize_partial=self.spec.quantize_partial)

    def append(self, stream: Stream, new: torch.Tensor, seal_fn: Callable | None = None) -> None:
        for b, cnt in enumerate(self.n_new_host):
            stream.append(b, new[b, :cnt], seal_fn)

    def fetch(self, stream: Stream) -> torch.Tensor:
        """(B, S, width) dequantized values, rows shorter than S zero-padded (they are masked)."""
        s = self.step_total()
        rows = []
        for b in range(self.batch):
            r = torch.cat([stream.sealed_values(b), stream.tail_values(b)])
            rows.append(torch.nn.functional.pad(r, (0, 0, 0, s - r.shape[0])))
        return torch.stack(rows)

    def folded(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A weight derived once per model (rotations folded into projections), computed in float64."""
        memo = self.model.__dict__.setdefault("_xq_folded", {})
        k = (key, self.dtype, self.device)
        if k not in memo:
            memo[k] = make().to(device=self.device, dtype=self.dtype)
        return memo[k]

    def rotation(self, width: int) -> tuple[Rotation, torch.Tensor] | None:
        """(R, its matrix) for `+rot` caches: the model's choice (a bundle's), else a (block) Hadamard."""
        if not self.spec.rotate:
            return None
        kind, seed = getattr(self.model, "_xq_rotation", ("hadamard", 0))
        rot = Rotation(kind, width, seed)
        return rot, self.folded(("R", rot), lambda: rot.matrix(torch.float64))

    def rotate(self, t: torch.Tensor, r: tuple[Rotation, torch.Tensor] | None) -> torch.Tensor:
        """t·R for a new token's values (fast Walsh-Hadamard transform when R is a Hadamard)."""
        return t if r is None else r[0].apply(t, r[1])

    # --- fused decode kernels (xqcli.kernels) --------------------------------------------------------
    def fused_ready(self) -> bool:
        """A one-token decode step on CUDA (or forced) outside the paper protocol."""
        if self.kernels == "off" or self.spec.quantize_partial or self.positions.shape[1] != 1:
            return False
        if self.window_applies():  # the kernels attend to every cached token: the masked path does the window
            return False
        if self.kernels == "triton":
            return True
        from xqcli.kernels._triton import HAS_TRITON

        return HAS_TRITON and self.device.type == "cuda"

    def packed(self, st: Stream, seq_lens: torch.Tensor):
        """The kernels' view of a stream after this step's append: codes, scales and tail as stored
        (no copy), the sealed counts computed on the device from `seq_lens` (no host-to-device copy)."""
        from xqcli.kernels.packed import PackedStream

        if st.spec is None:
            none = self.step_memo("no sealed", lambda: torch.zeros(self.batch, dtype=torch.int32, device=self.device))
            return PackedStream.dense(st.full, none)
        g = st.spec.group_size if st.spec.axis == "channel" else 1
        sealed = self.step_memo(("sealed", g, st.window), lambda: st.sealed_counts(seq_lens))
        return PackedStream(tail=st.tail, sealed=sealed, codes=st.codes, scale=st.scale, zero=st.zero, spec=st.spec)

    def step_memo(self, key, make: Callable[[], object]):
        """A value computed once per step and shared by every layer's launch (device work per launch adds up)."""
        if key not in self._step_memo:
            self._step_memo[key] = make()
        return self._step_memo[key]

    def begin(self, n_new: torch.Tensor | list[int], width: int) -> torch.Tensor:
        self._step_memo = {}
        return super().begin(n_new, width)

    def kernel_inputs(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(q (B, H, D), cos, sin, seq_lens int32, max length) for one decode step."""
        s = self.step_total()
        cos, sin = self.model.rope.tables(s)
        seq = self.step_memo("seq_lens", lambda: (self.lengths + self.n_new).to(torch.int32))
        return q[:, :, 0], cos, sin, seq, s

    def all_positions(self) -> torch.Tensor:
        s = self.step_total()
        return torch.arange(s, device=self.device).expand(self.batch, s)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.cfg.num_key_value_heads, self.cfg.head_dim).transpose(1, 2)

    def finish_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, d_kv) pre-RoPE K and V -> post-RoPE heads."""
        return self.model.rope.apply(self.heads(k), self.all_positions(), self.step_total()), self.heads(v)

    def nbytes(self) -> CacheBytes:
        total = CacheBytes()
        for layer in self.streams:
            for st in layer:
                total = total + st.nbytes()
        return total

    def allocated(self) -> CacheBytes:
        total = CacheBytes()
        for layer in self.streams:
            for st in layer:
                total = total + st.allocated()
        return total

    def reset(self) -> None:
        super().reset()
        for layer in self.streams:
            for st in layer:
                st.reset()

    def spec_settings(self) -> dict:
        settings = asdict(self.spec)
        for key in ("clips", "layer_bits"):  # tuples become JSON lists: compare like with like
            settings[key] = list(settings[key]) if settings[key] is not None else None
        return {"name": self.spec.name} | settings

    def _state_meta(self) -> dict:
        return {"streams": [[{"sealed": list(st.sealed), "tail_len": list(st.tail_len)} for st in layer]
                            for layer in self.streams]}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, layer in enumerate(self.streams):
            for j, st in enumerate(layer):
                out |= st.state(f"L{i}.S{j}")
        return out

    def _load_state(self, meta: dict, tensors: dict[str, torch.Tensor], lengths: list[int]) -> None:
        saved = meta.get("streams")
        if not isinstance(saved, list) or [len(x) for x in saved] != [len(x) for x in self.streams]:
            raise InputError("the saved cache has a different stream layout (another model or cache kind?)")
        rows = len(lengths)
        for i, layer in enumerate(self.streams):
            for j, st in enumerate(layer):
                sealed, tail = saved[i][j]["sealed"][:rows], saved[i][j]["tail_len"][:rows]
                if [a + b for a, b in zip(sealed, tail)] != lengths:
                    raise InputError(f"saved cache stream L{i}.S{j} holds {sealed}+{tail} tokens, rows hold {lengths}")
                st.load_state(f"L{i}.S{j}", sealed, tail, tensors)


class KiviCache(StreamCache):
    """KIVI*: pre-RoPE keys per-channel, values per-token (both group_size), RoPE after dequantization."""

    def __init__(self, model, spec, batch, max_len, device=None) -> None:
        super().__init__(model, spec, batch, max_len, device)
        w = self.cfg.kv_dim
        self.streams = [[self.stream(w, spec.quant("channel", layer=i)),
                         self.stream(w, spec.quant("token", layer=i))] for i in range(self.cfg.num_hidden_layers)]

    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.model.layers[layer].self_attn
        ks, vs = self.streams[layer]
        self.append(ks, attn.k_proj(x))
        self.append(vs, attn.v_proj(x))
        return self.finish_kv(self.fetch(ks), self.fetch(vs))

    def fused_attention(self, layer: int, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
        if not self.fused_ready():
            return None
        from xqcli.kernels.kivi_attention import kivi_attention

        attn = self.model.layers[layer].self_attn
        ks, vs = self.streams[layer]
        self.append(ks, attn.k_proj(x))
        self.append(vs, attn.v_proj(x))
        qq, cos, sin, seq, s = self.kernel_inputs(q)
        out = kivi_attention(qq, self.packed(ks, seq), self.packed(vs, seq), cos, sin, seq, max_seq_len=s,
                             backend="triton")
        return out[:, :, None]


class XQuantCache(StreamCache):
    """XQuant: X (MHA-like) or the SVD latents X·U_k, X·U_v (GQA), rebuilt into K and V every step."""

    def __init__(self, model, spec, batch, max_len, device=None) -> None:
        super().__init__(model, spec, batch, max_len, device)
        self.latent = uses_latents(self.cfg)
        self.streams = [self.layer_streams(spec.bits_for(i), i) for i in range(self.cfg.num_hidden_layers)]

    def layer_streams(self, bits: int | None, layer: int) -> list[Stream]:
        cfg, spec = self.cfg, self.spec
        if not self.latent:
            return [self.stream(cfg.hidden_size, spec.quant("token", bits, layer))]
        k = self.stream(cfg.kv_dim - int(spec.fp16_channel0), spec.quant("channel", bits, layer))
        v = self.stream(cfg.kv_dim, spec.quant("token", bits, layer))
        if spec.fp16_channel0:  # appendix B: channel 0 of X·U_k (the outlier channel) kept unquantized,
            # in the model dtype (fp16/bf16 on GPUs, as in the paper; fp32 in CPU tests)
            return [k, v, Stream(self.batch, self.max_len, 1, None, 0, self.dtype, self.device)]
        return [k, v]

    def append_layer(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's X of one layer; returns (m_k, m_v) with K = values_k·m_k, V = values_v·m_v."""
        attn = self.model.layers[layer].self_attn
        streams = self.streams[layer]
        if not self.latent:
            r = self.rotation(self.cfg.hidden_size)
            self.append(streams[0], self.rotate(x, r))  # X̂·R under +rot: R folded into W_k, W_v
            if r is None:
                return attn.k_proj.weight.T, attn.v_proj.weight.T
            wk = self.folded(("wk", layer, r[0]), lambda: attn.k_proj.weight.double() @ r[1].double())
            wv = self.folded(("wv", layer, r[0]), lambda: attn.v_proj.weight.double() @ r[1].double())
            return wk.T, wv.T
        p = model_projections(self.model)[layer]
        r = self.rotation(self.cfg.kv_dim)  # +rot: only the per-token latent X·U_v is rotated
        lat_k, lat_v = x @ p.k.u, self.rotate(x @ p.v.u, r)
        m_v = p.v.m if r is None else self.folded(("mv", layer, r[0]), lambda: r[1].double().T @ p.v.m.double())
        if self.spec.fp16_channel0:
            self.append(streams[2], lat_k[..., :1])
            lat_k = lat_k[..., 1:]
        self.append(streams[0], lat_k)
        self.append(streams[1], lat_v)
        return p.k.m, m_v

    def rebuild(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's X of one layer and rebuild pre-RoPE K, V (B, S, d_kv) for all tokens."""
        attn = self.model.layers[layer].self_attn
        streams = self.streams[layer]
        m_k, m_v = self.append_layer(layer, x)
        vals_k = self.fetch(streams[0])
        vals_v = vals_k if not self.latent else self.fetch(streams[1])
        if self.latent and self.spec.fp16_channel0:
            vals_k = torch.cat([self.fetch(streams[2]).to(vals_k.dtype), vals_k], dim=-1)
        k, v = vals_k @ m_k, vals_v @ m_v
        if attn.k_proj.bias is not None:
            k, v = k + attn.k_proj.bias, v + attn.v_proj.bias
        return k, v

    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish_kv(*self.rebuild(layer, x))

    def fused_attention(self, layer: int, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
        """Dequantize -> rebuild K -> RoPE -> attention with V absorbed, in the kernels (K/V never stored)."""
        if not self.fused_ready():
            return None
        from xqcli.kernels.xquant_attention import xquant_attention

        attn = self.model.layers[layer].self_attn
        streams = self.streams[layer]
        m_k, m_v = self.append_layer(layer, x)
        qq, cos, sin, seq, s = self.kernel_inputs(q)
        ks = self.packed(streams[0], seq)
        vs = ks if not self.latent else self.packed(streams[1], seq)
        ch0 = streams[2].full if self.latent and self.spec.fp16_channel0 else None
        out = xquant_attention(qq, ks, vs, m_k, m_v, cos, sin, seq, b_k=attn.k_proj.bias, b_v=attn.v_proj.bias,
                               k_ch0=ch0, max_seq_len=s, backend="triton")
        return out[:, :, None]


@dataclass
class DeltaLayer:
    """One XQuant-CL seed/delta layer in this step: its stream, delta rule and (folded) weights."""

    stream: Stream
    seed: bool  # the first layer of the chain: X̂ = Δ
    delta: Callable[[int, int, torch.Tensor], torch.Tensor]  # (row, first token, raw values) -> deltas
    w_k: torch.Tensor  # (d_kv, d), R folded in under +rot (MHA)
    w_v: torch.Tensor
    u: torch.Tensor | None  # U_kv (d, 2·d_kv) for GQA, None for MHA
    b_k: torch.Tensor | None
    b_v: torch.Tensor | None


class XQuantCLCache(XQuantCache):
    """XQuant-CL: base layers plain XQuant, then closed-loop deltas against a running accumulator X̂."""

    def __init__(self, model, spec, batch, max_len, device=None) -> None:
        StreamCache.__init__(self, model, spec, batch, max_len, device)
        cfg = self.cfg
        self.latent = uses_latents(cfg)
        self.base = min(spec.base_layers, cfg.num_hidden_layers)
        self.acc: torch.Tensor | None = None  # X̂_{i-1} for every token of every row: (B, S, d)
        self._acc_buf: torch.Tensor | None = None  # the fused path's accumulator, (B, max_len, d), kept
        self._acc_bytes = 0
        self.streams = []
        for i in range(cfg.num_hidden_layers):
            bits = spec.base_bits if (i < self.base and spec.bits is not None) else spec.bits
            if i < self.base - 1:
                self.streams.append(self.layer_streams(bits, i))
            elif self.latent:  # seed layer and delta layers: Q(ΔX·U_kv), X·U_kv in the window
                self.streams.append([self.stream(2 * cfg.kv_dim, spec.quant("token", bits))])
            else:
                self.streams.append([self.stream(cfg.hidden_size, spec.quant("token", bits))])

    def append_delta_layer(self, layer: int, x: torch.Tensor) -> DeltaLayer:
        """Append this step's X of a seed/delta layer (its deltas are formed as tokens are sealed)."""
        attn = self.model.layers[layer].self_attn
        stream = self.streams[layer][0]
        seed = layer == self.base - 1
        w_k, w_v = attn.k_proj.weight, attn.v_proj.weight
        u = None
        if self.latent:  # +rot folds R into the basis: U_kv·R still has orthonormal columns
            u = model_projections(self.model)[layer].kv.u
            r = self.rotation(2 * self.cfg.kv_dim)
            if r is not None:
                u = self.folded(("ukv", layer, r[0]), lambda: u.double() @ r[1].double())
            down = prev_down = (lambda t: t @ u)  # the accumulator lives in X's space
        else:  # +rot: the accumulator lives in the rotated space, R folded into W_kv
            r = self.rotation(self.cfg.hidden_size)
            down, prev_down = (lambda t: self.rotate(t, r)), (lambda t: t)
            if r is not None:  # the same folded weights as plain XQuant's rotated X
                w_k = self.folded(("wk", layer, r[0]), lambda: w_k.double() @ r[1].double())
                w_v = self.folded(("wv", layer, r[0]), lambda: w_v.double() @ r[1].double())
        prev = self.acc

        def delta(b: int, start: int, raw: torch.Tensor) -> torch.Tensor:
            """What layer i quantizes: (X_i − X̂_{i−1})·U_kv, formed against the accumulator right now."""
            return raw if seed else raw - prev_down(prev[b, start:start + raw.shape[0]])

        # The stream holds X·U_kv (GQA) or X (MHA); deltas are formed when tokens are sealed.
        self.append(stream, down(x), delta)
        return DeltaLayer(stream, seed, delta, w_k, w_v, u, attn.k_proj.bias, attn.v_proj.bias)

    def tail_deltas(self, dl: DeltaLayer, b: int) -> torch.Tensor:
        """Row b's waiting tokens as deltas against the accumulator of this moment."""
        st = dl.stream
        if st.spec is None:  # unquantized: the stream already holds deltas, nothing waits
            return st.full.new_zeros(0, st.width)
        n, t = st.sealed[b], st.tail_len[b]
        d_tail = dl.delta(b, n, st.tail[b, :t])
        if self.spec.quantize_partial and t:
            d_tail = fake_quantize(d_tail, st.spec)  # paper protocol: the waiting tokens too
        return d_tail

    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer < self.base - 1:
            return super().update_and_fetch(layer, x)
        dl = self.append_delta_layer(layer, x)
        prev, st = self.acc, dl.stream
        acc = torch.zeros(self.batch, self.step_total(), self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        for b in range(self.batch):
            d = torch.cat([st.sealed_values(b), self.tail_deltas(dl, b)])
            if dl.u is not None:
                d = d @ dl.u.T
            n = d.shape[0]
            acc[b, :n] = d if dl.seed else prev[b, :n] + d
        self.acc = acc
        self._acc_bytes = max(self._acc_bytes, tensor_bytes(acc))
        k, v = F.linear(acc, dl.w_k, dl.b_k), F.linear(acc, dl.w_v, dl.b_v)  # no per-step weight concatenation
        return self.finish_kv(k, v)

    def fused_attention(self, layer: int, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
        """Base layers: the XQuant kernel. Seed and delta layers: the CL update kernel (dequantize the
        deltas, X̂ += Δ(·U_kvᵀ) in place on a persistent accumulator), then attention over X̂ with K
        rebuilt per tile and V absorbed (K and V never stored)."""
        if layer < self.base - 1:
            return super().fused_attention(layer, x, q)
        if not self.fused_ready():
            return None
        from xqcli.kernels.xquant_cl import xquant_cl_attention, xquant_cl_update

        qq, cos, sin, seq, s = self.kernel_inputs(q)
        if layer == self.base - 1:  # the seed overwrites: the buffer's old contents do not matter
            if self._acc_buf is None:
                self._acc_buf = torch.empty(self.batch, self.max_len, self.cfg.hidden_size, dtype=self.dtype,
                                            device=self.device)
            self.acc = self._acc_buf[:, :s]
        dl = self.append_delta_layer(layer, x)  # seals against X̂_{i−1}: before the in-place update
        packed = self.packed(dl.stream, seq)
        if dl.stream.spec is not None and not dl.seed:
            tail = torch.empty_like(dl.stream.tail)  # read only up to each row's waiting tokens
            for b in range(self.batch):
                d = self.tail_deltas(dl, b)
                tail[b, :d.shape[0]] = d
            packed = replace(packed, tail=tail)
        xquant_cl_update(self.acc, packed, seq, u_kv=dl.u, seed=dl.seed, max_seq_len=s, backend="triton")
        self._acc_bytes = max(self._acc_bytes, tensor_bytes(self.acc))
        out = xquant_cl_attention(qq, self.acc, dl.w_k, dl.w_v, cos, sin, seq, b_k=dl.b_k, b_v=dl.b_v,
                                  max_seq_len=s, backend="triton")
        return out[:, :, None]

    def end(self) -> None:
        super().end()
        self.acc = None  # transient: rebuilt from the base layer at every step

    def nbytes(self) -> CacheBytes:
        return super().nbytes() + CacheBytes(workspace=self._acc_bytes)

    def _state_meta(self) -> dict:
        return super()._state_meta() | {"workspace_bytes": self._acc_bytes}

    def _load_state(self, meta: dict, tensors: dict[str, torch.Tensor], lengths: list[int]) -> None:
        super()._load_state(meta, tensors, lengths)
        self._acc_bytes = int(meta.get("workspace_bytes", 0))

    def allocated(self) -> CacheBytes:
        # The accumulator at full context: one layer's X for every cached token (model dtype).
        acc = self.batch * self.max_len * self.cfg.hidden_size * torch.empty(0, dtype=self.dtype).element_size()
        return super().allocated() + CacheBytes(workspace=acc)


def kernels_setting() -> str:
    """XQ_KERNELS from the environment: "auto" (default) or "off"; anything else is an error."""
    env = os.environ.get("XQ_KERNELS", "auto").strip().lower() or "auto"
    if env not in ("auto", "off"):
        raise InputError(f"XQ_KERNELS={env!r}: use auto or off")
    return env


def make_cache(model: "Transformer", spec: CacheSpec | str, batch: int, max_len: int,
               device: torch.device | None = None, kernels: str = "auto") -> ModelCache:
    """Build a cache of any kind for `batch` rows of up to `max_len` tokens.

    `kernels`: "auto" uses the fused Triton decode kernels on CUDA tensors, "triton" forces them (CPU
    tests under TRITON_INTERPRET=1), "off" keeps the pure-torch reference path. The environment
    variable XQ_KERNELS=off turns "auto" off: an escape hatch should a kernel misbehave on some GPU."""
    if kernels == "auto":
        kernels = kernels_setting()
    if isinstance(spec, str):
        spec = CacheSpec.parse(spec)
    spec = resolve(model, spec)
    if spec.method == "kv":
        return KVCache(model, batch, max_len, device=device)
    cls = {"kivi": KiviCache, "xquant": XQuantCache, "xquant-cl": XQuantCLCache}[spec.method]
    cache = cls(model, spec, batch, max_len, device)
    cache.kernels = kernels
    return cache



def resolve(model: "Transformer", spec: CacheSpec) -> CacheSpec:
    """Fill in what a spec takes from the model's bundle: the per-layer bits of `+mix`."""
    if spec.mix is None or spec.layer_bits is not None:
        return spec
    from xqcli.convert.calibrate import bit_plan

    cal = getattr(model, "_xq_calibration", None)
    if not cal:
        raise InputError(f"{spec.name} needs a bundle with a calibration (per-layer errors)",
                         hint="make one with: xq convert MODEL, then use the bundle")
    errors = [{int(b): e for b, e in layer["attn_error"]["xquant"].items()} for layer in cal["layers"]]
    if len(errors) != model.config.num_hidden_layers:
        raise InputError(f"the calibration has {len(errors)} layers, the model {model.config.num_hidden_layers}")
    plan = bit_plan(errors, spec.mix)
    if sum(plan) > spec.mix * len(plan) + 1e-9:
        raise InputError(f"no per-layer plan averages {spec.mix:g} bits", hint="the lowest is 2 bits everywhere")
    return replace(spec, layer_bits=tuple(plan))
