"""Streams: how every quantized cache kind stores a token sequence, and the cache machinery around them.

A `Stream` holds one sequence of C-wide vectors per row (K, V, X, a latent or a CL delta): sealed tokens
as packed codes with fp16 scales and zero points (`xqcli.kernels.quant`), the newest ones in a
full-precision tail. `StreamCache` is what `kivi`, `xquant` and `xquant-cl` share: per-layer streams,
row-by-row appends, padded fetches, state, snapshots and the inputs of the fused decode kernels.
`-fp` instead of a bit width turns quantization off (the stream keeps the model dtype), which is how
the tests check that every kind is the same algebra as `kv`.

Residual window (all quantized kinds): the newest `window` tokens stay in full precision (default 128
for generation, 0 for the paper's perplexity protocol). A per-token stream quantizes a token as soon as
it leaves the window; a per-channel stream seals whole blocks of `group_size` tokens once they have
left it, so up to group_size−1 older tokens may wait in full precision too (KIVI's residual).
With `quantize_partial=True` (the paper protocol) tokens waiting in full precision are returned
fake-quantized (the partial block as one smaller group), as if the whole sequence had been quantized.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict

import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.bundle.projections import LayerProjections
from xqcli.bundle.rotation import Rotation
from xqcli.cache.base import CacheBytes, ModelCache, ModelParts, state_tensor, tensor_bytes
from xqcli.cache.spec import CacheSpec
from xqcli.errors import InputError
from xqcli.kernels.packed import PackedStream
from xqcli.kernels.quant import QTensor, QuantSpec, dequantize_ref, fake_quantize
from xqcli.kernels.stream_append import (
    StreamBuffers,
    allocate_stream,
    ring_view,
    sealed_count,
    stream_append,
    stream_values_ref,
)
from xqcli.rope import rotate


class Stream:
    """One cached token sequence of width C per row: quantized sealed tokens plus a full-precision ring.

    Storage and sealing are `xqcli.kernels.stream_append`'s (docs/design.md §6): codes, fp16 scales and
    zero points for `max_len` tokens and a ring of `ring_capacity` slots holding the unsealed tokens
    (token t in slot t % cap). The stream keeps no per-row counters: the sealed count is a function of
    the row length (`sealed_count`), and the lengths are the cache's, on the device and mirrored on the
    host. Unquantized (`spec` None): every token in `full` (B, max_len, C), written at its position.
    """

    def __init__(self, batch: int, max_len: int, width: int, spec: QuantSpec | None, window: int,
                 dtype: torch.dtype, device: torch.device, *, quantize_partial: bool = False) -> None:
        self.spec, self.width, self.window, self.dtype = spec, width, window, dtype
        self.quantize_partial = quantize_partial
        if spec is None:  # unquantized: everything lives in `full`
            self.full = torch.zeros(batch, max_len, width, dtype=dtype, device=device)
            return
        self.buffers = allocate_stream(batch, max_len, width, spec, window, dtype, device)
        self.codes, self.scale, self.zero, self.tail = self.buffers

    def sealed_host(self, n: int) -> int:
        """Sealed tokens of a row of n tokens (unquantized: none, every token is in `full`)."""
        if self.spec is None:
            return 0
        s = max(0, n - self.window)
        return s if self.spec.axis == "token" else s // self.spec.group_size * self.spec.group_size

    def counts(self, n: int) -> tuple[int, int]:
        """(stored, waiting in full precision) tokens of a row of n tokens, as session files record them."""
        if self.spec is None:
            return n, 0
        s = self.sealed_host(n)
        return s, n - s

    def sealed_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """sealed[b] for rows of these lengths (B,), as int32 on their device, without reading anything back."""
        if self.spec is None:
            return torch.zeros_like(lengths, dtype=torch.int32)
        return sealed_count(lengths, self.window, self.spec)

    def append(self, new: torch.Tensor, lengths: torch.Tensor, n_new: torch.Tensor, *,
               host_lengths: list[int] | None = None, host_n_new: list[int] | None = None,
               sub: torch.Tensor | None = None, sub_start: int = 0, backend: str = "auto") -> None:
        """Append row b's `new[b, :n_new[b]]` after its `lengths[b]` tokens (lengths before the step).

        `sub` (B, S, C): what XQuant-CL subtracts from token t's value when it is quantized,
        `sub[b, t − sub_start]` (its deltas, formed at sealing time; unquantized streams store deltas at
        once); it needs to cover only the tokens this step stores (`storing_span`).
        `host_*`: the same counts mirrored on the host, when the caller has them (the reference sizes
        its work with them; the kernel never reads them)."""
        new = new.to(self.dtype)
        if self.spec is None:
            if sub is not None:
                pos = lengths[:, None] + torch.arange(new.shape[1], device=new.device) - sub_start
                new = new - sub.gather(1, pos.clamp(0, sub.shape[1] - 1)[..., None].expand_as(new))
            put_rows(self.full, new, lengths, n_new, host_lengths, host_n_new)
            return
        starts = None if sub is None else torch.full_like(lengths, sub_start)
        stream_append(new, lengths, n_new, self.buffers, window=self.window, spec=self.spec, sub=sub,
                      sub_start=starts, host_lengths=host_lengths, host_n_new=host_n_new, backend=backend,
                      check=False)  # buffers from allocate_stream, the rest built by the cache

    def storing_span(self, host_lengths: list[int], host_n_new: list[int]) -> tuple[int, int]:
        """[lo, hi): the token positions that some row quantizes (or, unquantized, stores) in a step that
        appends `host_n_new` tokens to rows of `host_lengths`; lo >= hi when none does."""
        spans = [(n, n + m) if self.spec is None else (self.sealed_host(n), self.sealed_host(n + m))
                 for n, m in zip(host_lengths, host_n_new) if m]
        spans = [(a, b) for a, b in spans if b > a]
        return (min(a for a, _ in spans), max(b for _, b in spans)) if spans else (0, 0)

    def values(self, lengths: torch.Tensor, n: int, host_lengths: list[int] | None = None, *,
               rows: torch.Tensor | None = None, quantize_waiting: bool = True) -> torch.Tensor:
        """(B, n, C) every row's first n tokens in the stream's dtype (dequantized sealed tokens, then the
        ring's), 0 at and after each row's length. Given the lengths on the host, only the sealed part is
        dequantized, and in the paper protocol (unless `quantize_waiting` is off) the waiting tokens are
        returned fake-quantized (a per-channel stream's partial block as one smaller group).
        `rows` (k,): only those rows, (k, n, C); `lengths` and `host_lengths` are then theirs."""
        if self.spec is None:
            keep = torch.arange(n, device=lengths.device)[None, :, None] < lengths[:, None, None]
            full = self.full[:, :n] if rows is None else self.full[rows, :n]
            return torch.where(keep, full, torch.zeros((), dtype=self.dtype, device=self.full.device))
        max_sealed = max(map(self.sealed_host, host_lengths)) if host_lengths is not None else None
        buffers = self.buffers if rows is None else self.row_buffers(rows, n if max_sealed is None else max_sealed)
        out = stream_values_ref(buffers, lengths, window=self.window, spec=self.spec, n=n, max_sealed=max_sealed,
                                min_length=None if host_lengths is None else min(host_lengths)).to(self.dtype)
        if self.quantize_partial and quantize_waiting and host_lengths is not None:
            for b, length in enumerate(host_lengths):
                s = self.sealed_host(length)
                if length > s:
                    out[b, s:length] = fake_quantize(out[b, s:length], self.spec)
        return out

    def row_buffers(self, rows: torch.Tensor, n: int) -> StreamBuffers:
        """A copy of `rows`' storage: codes and scales of their first n tokens, the whole ring."""
        blocks = n if self.spec.axis == "token" else -(-n // self.spec.group_size)
        return StreamBuffers(self.codes[rows, :n], self.scale[rows, :blocks], self.zero[rows, :blocks],
                             self.tail[rows])

    def sealed_values(self, lo: int, hi: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, hi − lo, C) float32: the dequantized codes at positions [lo, hi) of every row (token axis;
        `rows`: only those), meaningful where a row has sealed them (zero codes elsewhere)."""
        codes, scale, zero = (t[:, lo:hi] if rows is None else t[rows, lo:hi] for t in self.buffers[:3])
        q = QTensor(codes, scale, zero, self.spec, torch.Size((codes.shape[0], hi - lo, self.width)), torch.float32)
        return dequantize_ref(q, torch.float32)

    def waiting(self, b: int, length: int) -> torch.Tensor:
        """Row b's unsealed tokens (raw, as appended) in token order, for a row of `length` tokens."""
        first, cap = self.sealed_host(length), self.tail.shape[1]
        if first % cap + length - first <= cap:  # no wrap: a view
            return self.tail[b, first % cap:first % cap + length - first]
        return self.tail[b, torch.arange(first, length, device=self.tail.device) % cap]

    def packed(self, seq_lens: torch.Tensor, sealed: torch.Tensor) -> PackedStream:
        """The kernels' view of rows holding `seq_lens` tokens, `sealed` of them sealed (no copy)."""
        if self.spec is None:
            return PackedStream.dense(self.full, sealed)
        return ring_view(self.buffers, seq_lens, window=self.window, spec=self.spec, sealed=sealed)

    def nbytes(self, lengths: list[int]) -> CacheBytes:
        """Bytes held by rows of these lengths (per-channel scales count per started block)."""
        if self.spec is None:
            return CacheBytes(payload=self.width * self.full.element_size() * sum(lengths))
        sealed = [self.sealed_host(n) for n in lengths]
        if self.spec.axis == "token":
            sz = self.scale.shape[-1] * 4 * sum(sealed)
        else:
            sz = sum(math.ceil(n / self.spec.group_size) for n in sealed) * self.width * 4
        tail = sum(n - s for n, s in zip(lengths, sealed)) * self.width * self.tail.element_size()
        return CacheBytes(payload=self.codes.shape[-1] * sum(sealed), scales=sz, fp_window=tail)

    def allocated(self) -> CacheBytes:
        if self.spec is None:
            return CacheBytes(payload=tensor_bytes(self.full))
        return CacheBytes(payload=tensor_bytes(self.codes), scales=tensor_bytes(self.scale, self.zero),
                          fp_window=tensor_bytes(self.tail))

    def stored_bytes_per_token(self, lengths: list[int]) -> float | None:
        """(payload + scales) per stored token past the window; None while there is none."""
        n = sum(n if self.spec is None else self.sealed_host(n) for n in lengths)
        if n == 0:
            return None
        b = self.nbytes(lengths)
        return (b.payload + b.scales) / n

    def snapshot(self) -> torch.Tensor | None:
        """The ring (rewritten in place by later steps; the codes are only written past the sealed counts)."""
        return self.tail.clone() if self.spec is not None else None

    def restore(self, tail: torch.Tensor | None) -> None:
        if tail is not None:
            self.tail.copy_(tail)

    def state(self, prefix: str, lengths: list[int]) -> dict[str, torch.Tensor]:
        """Row b's stored data, cut at its length: codes, scales, zero points and the waiting tokens in
        token order (or `full`)."""
        out = {}
        for b, length in enumerate(lengths):
            r = f"{prefix}.r{b}"
            if self.spec is None:
                out[f"{r}.full"] = self.full[b, :length]
                continue
            n = self.sealed_host(length)
            ns = n if self.spec.axis == "token" else n // self.spec.group_size  # channel: whole sealed blocks
            out |= {f"{r}.codes": self.codes[b, :n], f"{r}.scale": self.scale[b, :ns], f"{r}.zero": self.zero[b, :ns],
                    f"{r}.tail": self.waiting(b, length)}
        return out

    def load_state(self, prefix: str, lengths: list[int], tensors: dict[str, torch.Tensor]) -> None:
        for b, length in enumerate(lengths):
            r = f"{prefix}.r{b}"
            if self.spec is None:
                self.full[b, :length] = state_tensor(tensors, f"{r}.full", (length, self.width)).to(self.full)
                continue
            n = self.sealed_host(length)
            t = length - n
            if t > self.tail.shape[1]:
                raise InputError(f"saved cache stream {r} has {t} tail tokens, more than this window holds "
                                 f"({self.tail.shape[1]})")
            ns = n if self.spec.axis == "token" else n // self.spec.group_size
            self.codes[b, :n] = state_tensor(tensors, f"{r}.codes", (n, self.codes.shape[-1])).to(self.codes)
            self.scale[b, :ns] = state_tensor(tensors, f"{r}.scale", (ns, self.scale.shape[-1])).to(self.scale)
            self.zero[b, :ns] = state_tensor(tensors, f"{r}.zero", (ns, self.zero.shape[-1])).to(self.zero)
            slots = torch.arange(n, length, device=self.tail.device) % self.tail.shape[1]
            self.tail[b, slots] = state_tensor(tensors, f"{r}.tail", (t, self.width)).to(self.tail)


def put_rows(buf: torch.Tensor, new: torch.Tensor, lengths: torch.Tensor, n_new: torch.Tensor,
             host_lengths: list[int] | None = None, host_n_new: list[int] | None = None) -> None:
    """buf[b, lengths[b] + i] = new[b, i] for i < n_new[b] (token axis 1), in place.

    With the host mirror a slice copy per row (the CPU path); without it one indexed write with the
    positions on the device: a row's positions past its count are clamped onto its last slot and get
    that slot's old value back (a row at capacity writes nothing it does not own)."""
    if host_lengths is not None and host_n_new is not None:
        for b, (start, cnt) in enumerate(zip(host_lengths, host_n_new)):
            buf[b, start:start + cnt] = new[b, :cnt]
        return
    rows = torch.arange(buf.shape[0], device=buf.device)[:, None]
    i = torch.arange(new.shape[1], device=buf.device)[None, :]
    pos = (lengths[:, None] + i).clamp(max=buf.shape[1] - 1)
    keep = (i < n_new[:, None])[..., None]
    buf[rows, pos] = torch.where(keep, new, buf[rows, pos])


class StreamCache(ModelCache):
    """Shared machinery: per-layer streams, appending valid new tokens row by row, padded fetches."""

    def __init__(self, parts: ModelParts, spec: CacheSpec, batch: int, max_len: int, device: torch.device | str,
                 artifacts: Artifacts, kernels: str = "auto") -> None:
        super().__init__(parts, batch, max_len, device)
        n_layers = parts.config.num_hidden_layers
        if spec.clips is not None and len(spec.clips) != n_layers:
            raise InputError(f"{len(spec.clips)} per-layer clip ratios for a {n_layers}-layer model")
        self.spec = spec
        self.artifacts = artifacts
        self.streams: list[list[Stream]] = []
        self.kernels = kernels  # "auto": fused decode kernels on CUDA; "triton": forced (interpreter tests); "off"

    def stream(self, width: int, qspec: QuantSpec | None) -> Stream:
        return Stream(self.batch, self.max_len, width, qspec, self.spec.window, self.dtype, self.device,
                      quantize_partial=self.spec.quantize_partial)

    def append(self, stream: Stream, new: torch.Tensor, sub: torch.Tensor | None = None, sub_start: int = 0
               ) -> None:
        """This step's valid new tokens of every active row (`new`, `sub`: theirs), after the row's length
        (`Stream.append`)."""
        stream.append(self.spread(new), self.lengths, self.n_new, host_lengths=self.host_lengths,
                      host_n_new=self.n_new_host, sub=None if sub is None else self.spread(sub), sub_start=sub_start,
                      backend="ref" if self.kernels == "off" else "auto")

    def step_host_lengths(self) -> list[int]:
        """Row lengths after this step's new tokens, on the host."""
        return [n + k for n, k in zip(self.host_lengths, self.n_new_host)]

    def fetch(self, stream: Stream, quantize_waiting: bool = True) -> torch.Tensor:
        """(k, S, width) the active rows' dequantized values, rows shorter than S zero-padded (they are
        masked); `quantize_waiting` as in `Stream.values`."""
        return stream.values(self.take(self.lengths + self.n_new), self.step_total(), self.rows_after(),
                             rows=self._row_index, quantize_waiting=quantize_waiting)

    def folded(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A weight derived once per model (rotations folded into projections), computed in float64."""
        return self.artifacts.folded(key, self.dtype, self.device, make)

    def projections(self) -> list[LayerProjections]:
        """Every layer's SVD factors in this cache's dtype (a bundle's, else computed once per model)."""
        return self.artifacts.projections(self.weights, self.dtype)

    def rotation(self, width: int) -> tuple[Rotation, torch.Tensor] | None:
        """(R, its matrix) for `+rot` caches: the bundle's choice, else a (block) Hadamard."""
        if not self.spec.rotate:
            return None
        kind, seed = self.artifacts.rotation
        rot = Rotation(kind, width, seed)
        return rot, self.folded(("R", rot), lambda: rot.matrix(torch.float64))

    def rotate(self, t: torch.Tensor, r: tuple[Rotation, torch.Tensor] | None) -> torch.Tensor:
        """t·R for the new tokens' values (k, T, C) (fast Walsh-Hadamard transform when R is a Hadamard)."""
        return t if r is None else self.by_row(lambda row: r[0].apply(row, r[1]), t)

    # --- fused decode kernels (xqcli.kernels) --------------------------------------------------------
    def fused_ready(self) -> bool:
        """A one-token decode step over every row on CUDA (or forced), outside the paper protocol."""
        if self.kernels == "off" or self.spec.quantize_partial or self.positions.shape[1] != 1:
            return False
        if self.row_subset:  # the kernels run on whole batches (the engine's static step masks free rows)
            return False
        if self.window_applies():  # the kernels attend to every cached token: the masked path does the window
            return False
        if self.kernels == "triton":
            return True
        from xqcli.kernels._triton import HAS_TRITON

        return HAS_TRITON and self.device.type == "cuda"

    def packed(self, st: Stream, seq_lens: torch.Tensor) -> PackedStream:
        """The kernels' view of a stream after this step's append: codes, scales and ring as stored
        (no copy), the sealed counts computed on the device from `seq_lens` (no host-to-device copy)."""
        g = None if st.spec is None else (st.spec.group_size if st.spec.axis == "channel" else 1)
        sealed = self.step_memo(("sealed", g, st.window), lambda: st.sealed_counts(seq_lens))
        return st.packed(seq_lens, sealed)

    def kernel_inputs(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(q (B, H, D), cos, sin, seq_lens int32, max length) for one decode step."""
        s = self.step_total()
        cos, sin = self.rope.tables(s)
        seq = self.step_memo("seq_lens", lambda: (self.lengths + self.n_new).to(torch.int32))
        return q[:, :, 0], cos, sin, seq, s

    def all_positions(self) -> torch.Tensor:
        s = self.step_total()
        return torch.arange(s, device=self.device).expand(len(self.rows), s)

    def finish_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, S, d_kv) pre-RoPE K and V of the active rows -> post-RoPE heads."""
        cos_sin = self.step_memo(("rope all", k.dtype),
                                 lambda: self.rope.cos_sin(self.all_positions(), k.dtype, self.step_total()))
        return rotate(self.heads(k), *cos_sin), self.heads(v)

    def nbytes(self) -> CacheBytes:
        total = CacheBytes()
        for layer in self.streams:
            for st in layer:
                total = total + st.nbytes(self.host_lengths)
        return total

    def allocated(self) -> CacheBytes:
        total = CacheBytes()
        for layer in self.streams:
            for st in layer:
                total = total + st.allocated()
        return total

    def bytes_per_token(self) -> float | None:
        total = 0.0
        for layer in self.streams:
            for st in layer:
                per_token = st.stored_bytes_per_token(self.host_lengths)
                if per_token is None:
                    return None
                total += per_token
        return total

    def _snapshot_data(self) -> object:
        return [[st.snapshot() for st in layer] for layer in self.streams]

    def _restore_data(self, data: object) -> None:
        for layer, saved in zip(self.streams, data, strict=True):
            for st, s in zip(layer, saved, strict=True):
                st.restore(s)

    def spec_settings(self) -> dict:
        settings = asdict(self.spec)
        if settings["clips"] is not None:  # a tuple becomes a JSON list: compare like with like
            settings["clips"] = list(settings["clips"])
        return {"name": self.spec.name} | settings

    def _state_meta(self) -> dict:
        lengths = self.host_lengths
        return {"streams": [[dict(zip(("sealed", "tail_len"), map(list, zip(*map(st.counts, lengths)))))
                             for st in layer] for layer in self.streams]}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, layer in enumerate(self.streams):
            for j, st in enumerate(layer):
                out |= st.state(f"L{i}.S{j}", self.host_lengths)
        return out

    def _load_state(self, meta: dict, tensors: dict[str, torch.Tensor], lengths: list[int]) -> None:
        saved = meta.get("streams")
        if not isinstance(saved, list) or [len(x) for x in saved] != [len(x) for x in self.streams]:
            raise InputError("the saved cache has a different stream layout (another model or cache kind?)")
        rows = len(lengths)
        for i, layer in enumerate(self.streams):
            for j, st in enumerate(layer):
                sealed, tail = saved[i][j]["sealed"][:rows], saved[i][j]["tail_len"][:rows]
                if list(zip(sealed, tail)) != [st.counts(n) for n in lengths]:
                    raise InputError(f"saved cache stream L{i}.S{j} holds {sealed}+{tail} tokens, rows of {lengths} "
                                     f"tokens hold {[st.counts(n) for n in lengths]} here")
                st.load_state(f"L{i}.S{j}", lengths, tensors)

