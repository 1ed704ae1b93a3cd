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
from xqcli.kernels.quant import QTensor, QuantSpec, dequantize, fake_quantize, packed_width, quantize


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

    def stored_bytes_per_token(self) -> float | None:
        """(payload + scales) per sealed token; None while nothing is sealed."""
        n = sum(self.sealed)
        if n == 0:
            return None
        b = self.nbytes()
        return (b.payload + b.scales) / n

    def snapshot(self) -> tuple[list[int], list[int], torch.Tensor | None]:
        """Counters and the full-precision tail (rewritten in place by later steps; unquantized: none)."""
        return list(self.sealed), list(self.tail_len), self.tail.clone() if self.spec is not None else None

    def restore(self, saved: tuple[list[int], list[int], torch.Tensor | None]) -> None:
        sealed, tail_len, tail = saved
        self.sealed, self.tail_len = list(sealed), list(tail_len)
        if tail is not None:
            self.tail.copy_(tail)

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
        cos, sin = self.rope.tables(s)
        seq = self.step_memo("seq_lens", lambda: (self.lengths + self.n_new).to(torch.int32))
        return q[:, :, 0], cos, sin, seq, s

    def all_positions(self) -> torch.Tensor:
        s = self.step_total()
        return torch.arange(s, device=self.device).expand(self.batch, s)

    def finish_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, d_kv) pre-RoPE K and V -> post-RoPE heads."""
        return self.rope.apply(self.heads(k), self.all_positions(), self.step_total()), self.heads(v)

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

    def bytes_per_token(self) -> float | None:
        total = 0.0
        for layer in self.streams:
            for st in layer:
                per_token = st.stored_bytes_per_token()
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

