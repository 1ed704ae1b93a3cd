"""`xquant-cl-B`: closed-loop cross-layer deltas.

Layers < base_layers are plain XQuant at base_bits (4); layer base_layers-1 seeds the accumulator X̂;
layer i >= base_layers stores Q(X_i − X̂_{i−1}) and X̂_i = X̂_{i−1} + deq(...). For GQA the delta is
projected on U_kv (2·d_kv wide) and X̂_i = X̂_{i−1} + deq(Q(ΔX_i·U_kv))·U_kvᵀ, [K|V] = X̂_i·[W_k|W_v].

Choices (ours, docs/design.md §9): deltas are quantized per-token; the running accumulator is kept in
the model dtype, rebuilt every step from the base layer, and counted as `workspace` (the fused decode
path keeps it in one (B, max_len, d) buffer that the CL kernel updates in place, layer after layer); on
GQA the base layer stores Q4(X·U_kv) (KV-sized, like the paper's Table 4 sizes) and seeds
X̂ = deq(...)·U_kvᵀ; the current token's own K/V come from X̂ like every other token's.

The full-precision window holds X (GQA: X·U_kv); a token's delta is formed when it is sealed, against
the accumulator of that moment, so encoder and decoder always see the same X̂_{i−1} (no drift). A window
token's X̂ is X̂_{i−1} + (X_i·U_kv − X̂_{i−1}·U_kv)·U_kvᵀ, whose K/V are exact.

GQA, ours (docs/design.md §4): the tokens a step seals carry their own X̂ chain in float64 (`sealing`, from
their codes and the stored U_kv), and their subtrahend X̂_{i−1}·U_kv is rounded once from it, so a float32
GEMM's summation order (MKL here, cuBLAS or the decode step's kernels elsewhere) cannot flip their codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.base import CacheBytes, ModelParts, tensor_bytes
from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.cache.stream import Stream, StreamCache
from xqcli.cache.xquant import XQuantCache
from xqcli.kernels.quant import fake_quantize


@dataclass
class DeltaLayer:
    """One XQuant-CL seed/delta layer in this step: its stream, delta rule and (folded) weights."""

    stream: Stream
    seed: bool  # the first layer of the chain: X̂ = Δ
    prev_down: Callable[[torch.Tensor], torch.Tensor]  # a row's X̂_{i−1} tokens -> stream space (GQA: ·U_kv)
    w_k: torch.Tensor  # (d_kv, d), R folded in under +rot (MHA)
    w_v: torch.Tensor
    u: torch.Tensor | None  # U_kv (d, 2·d_kv) for GQA, None for MHA
    b_k: torch.Tensor | None
    b_v: torch.Tensor | None


class XQuantCLCache(XQuantCache):
    """XQuant-CL: base layers plain XQuant, then closed-loop deltas against a running accumulator X̂."""

    def __init__(self, parts: ModelParts, spec: CacheSpec, batch: int, max_len: int, device: torch.device | str,
                 artifacts: Artifacts, kernels: str = "auto") -> None:
        StreamCache.__init__(self, parts, spec, batch, max_len, device, artifacts, kernels)
        cfg = self.config
        self.latent = uses_latents(cfg)
        self.base = min(spec.base_layers, cfg.num_hidden_layers)
        self.acc: torch.Tensor | None = None  # X̂_{i-1} for every token of the step's rows: (k, S, d)
        self._acc_buf: torch.Tensor | None = None  # the fused path's accumulator, (B, max_len, d), kept
        self._acc_bytes = 0
        self.sealing: torch.Tensor | None = None  # GQA: float64 X̂_{i−1} of the tokens this step seals (k, n, d)
        self.streams = []
        for i in range(cfg.num_hidden_layers):
            bits = spec.layer_bits(i)
            if i < self.base - 1:
                self.streams.append(self.layer_streams(bits, i))
            elif self.latent:  # seed layer and delta layers: Q(ΔX·U_kv), X·U_kv in the window
                self.streams.append([self.stream(2 * cfg.kv_dim, spec.quant("token", bits))])
            else:
                self.streams.append([self.stream(cfg.hidden_size, spec.quant("token", bits))])

    def delta_layer(self, layer: int) -> tuple[DeltaLayer, Callable[[torch.Tensor], torch.Tensor]]:
        """A seed/delta layer's `DeltaLayer`, and what maps its X (k, T, d) to the stream's input (GQA: ·U_kv)."""
        w = self.weights[layer]
        stream = self.streams[layer][0]
        seed = layer == self.base - 1
        w_k, w_v = w.w_k, w.w_v
        u = None
        if self.latent:  # +rot folds R into the basis: U_kv·R still has orthonormal columns
            u = self.projections()[layer].kv.u
            r = self.rotation(2 * self.config.kv_dim)
            if r is not None:
                u = self.folded(("ukv", layer, r[0]), lambda: u.double() @ r[1].double())
            prev_down = (lambda t: t @ u)  # the accumulator lives in X's space
            down = (lambda t: self.by_row(prev_down, t))
        else:  # +rot: the accumulator lives in the rotated space, R folded into W_kv
            r = self.rotation(self.config.hidden_size)
            down, prev_down = (lambda t: self.rotate(t, r)), (lambda t: t)
            if r is not None:  # the same folded weights as plain XQuant's rotated X
                w_k = self.folded(("wk", layer, r[0]), lambda: w_k.double() @ r[1].double())
                w_v = self.folded(("wv", layer, r[0]), lambda: w_v.double() @ r[1].double())
        return DeltaLayer(stream, seed, prev_down, w_k, w_v, u, w.b_k, w.b_v), down

    def append_delta_layer(self, layer: int, x: torch.Tensor) -> DeltaLayer:
        """Append this step's X of a seed/delta layer (its deltas are formed as tokens are sealed)."""
        dl, down = self.delta_layer(layer)
        # The stream holds X·U_kv (GQA) or X (MHA); what layer i quantizes, (X_i − X̂_{i−1})·U_kv, is
        # formed when tokens are sealed, against the accumulator of that moment: only the tokens this
        # step seals need X̂_{i−1} brought into the stream's space.
        st = dl.stream
        lo, hi = st.storing_span(self.host_lengths, self.n_new_host)
        if dl.u is None or st.spec is None:  # MHA, -fp: float32 sums round alike on every path
            sub = None if dl.seed or hi <= lo else self.by_row(dl.prev_down, self.acc[:, lo:hi])
            self.append(st, down(x), sub, lo)
            return dl
        u64 = self.sealing_basis(layer, dl.u)
        sub = None if dl.seed or hi <= lo else (self.sealing @ u64).to(self.dtype)
        self.append(st, down(x), sub, lo)
        if hi > lo:  # X̂_i of the tokens just sealed, from their own codes
            d = st.sealed_values(lo, hi, self._row_index).double() @ u64.T
            self.sealing = d if dl.seed else self.sealing + d
        return dl

    def sealing_basis(self, layer: int, u: torch.Tensor) -> torch.Tensor:
        """U_kv (as stored, in the model dtype) in float64 for the sealing chain. Kept per layer on CPUs, which
        decode on this path every step (48 MB for SmolLM2's 28 chain layers); converted per call elsewhere, where
        this path runs only for prefill and the copies would hold GPU memory (about 2 GB for Llama-3.1-8B)."""
        if self.device.type != "cpu":
            return u.double()
        key = ("ukv-sealing", layer, self.spec.rotate, self.dtype)
        return self.artifacts.folded(key, torch.float64, self.device, lambda: u.double())

    def acc_buffer(self) -> torch.Tensor:
        """The fused paths' accumulator (B, max_len, d), allocated once and kept (a captured step points at it)."""
        if self._acc_buf is None:
            self._acc_buf = torch.empty(self.batch, self.max_len, self.config.hidden_size, dtype=self.dtype,
                                        device=self.device)
        return self._acc_buf

    def tail_deltas(self, dl: DeltaLayer, b: int, length: int, prev: torch.Tensor | None) -> torch.Tensor:
        """Row b's waiting tokens (of `length` after this step) as deltas against its accumulator now,
        `prev` (S, d; None for the seed layer)."""
        st = dl.stream
        if st.spec is None:  # unquantized: the stream already holds deltas, nothing waits
            return st.full.new_zeros(0, st.width)
        n = st.sealed_host(length)
        d_tail = st.waiting(b, length)
        if not dl.seed:
            d_tail = d_tail - dl.prev_down(prev[n:length])
        if self.spec.quantize_partial and length > n:
            d_tail = fake_quantize(d_tail, st.spec)  # paper protocol: the waiting tokens too
        return d_tail

    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer < self.base - 1:
            return super().update_and_fetch(layer, x)
        dl = self.append_delta_layer(layer, x)
        prev, st, rows = self.acc, dl.stream, self.rows
        acc = torch.zeros(len(rows), self.step_total(), self.config.hidden_size, dtype=self.dtype, device=self.device)
        stored = self.fetch(st, quantize_waiting=False)  # stored deltas (-fp: all of them); the waiting ones below
        for i, (b, length) in enumerate(zip(rows, self.rows_after())):
            waiting = self.tail_deltas(dl, b, length, None if dl.seed else prev[i])
            d = torch.cat([stored[i, :st.counts(length)[0]], waiting])
            if dl.u is not None:
                d = d @ dl.u.T
            n = d.shape[0]
            acc[i, :n] = d if dl.seed else prev[i, :n] + d
        self.acc = acc
        self._acc_bytes = max(self._acc_bytes, tensor_bytes(acc))
        k = self.by_row(lambda r: F.linear(r, dl.w_k, dl.b_k), acc)  # no per-step weight concatenation
        v = self.by_row(lambda r: F.linear(r, dl.w_v, dl.b_v), acc)
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
            self.acc = self.acc_buffer()[:, :s]
        dl = self.append_delta_layer(layer, x)  # seals against X̂_{i−1}: before the in-place update
        packed = self.packed(dl.stream, seq)
        if dl.stream.spec is not None and not dl.seed:
            tail = torch.empty_like(dl.stream.tail)  # read only at each row's waiting tokens' slots
            for b, length in enumerate(self.step_host_lengths()):
                n = dl.stream.sealed_host(length)
                tail[b, torch.arange(n, length) % tail.shape[1]] = self.tail_deltas(dl, b, length, self.acc[b])
            packed = replace(packed, tail=tail)
        xquant_cl_update(self.acc, packed, seq, u_kv=dl.u, seed=dl.seed, max_seq_len=s, backend="triton")
        self._acc_bytes = max(self._acc_bytes, tensor_bytes(self.acc))
        out = xquant_cl_attention(qq, self.acc, dl.w_k, dl.w_v, cos, sin, seq, b_k=dl.b_k, b_v=dl.b_v,
                                  max_seq_len=s, backend="triton")
        return out[:, :, None]

    def end(self) -> None:
        super().end()
        self.acc = self.sealing = None  # transient: rebuilt from the base layer at every step

    def nbytes(self) -> CacheBytes:
        return super().nbytes() + CacheBytes(workspace=self._acc_bytes)

    def _state_meta(self) -> dict:
        return super()._state_meta() | {"workspace_bytes": self._acc_bytes}

    def _load_state(self, meta: dict, tensors: dict[str, torch.Tensor], lengths: list[int]) -> None:
        super()._load_state(meta, tensors, lengths)
        self._acc_bytes = int(meta.get("workspace_bytes", 0))

    def allocated(self) -> CacheBytes:
        # The accumulator at full context: one layer's X for every cached token (model dtype).
        acc = self.batch * self.max_len * self.config.hidden_size * torch.empty(0, dtype=self.dtype).element_size()
        return super().allocated() + CacheBytes(workspace=acc)

