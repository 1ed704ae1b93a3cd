"""The cache interface every cache kind implements (the KV baseline is `xqcli.cache.kv`).

A model forward step talks to one `ModelCache` for all layers:

    positions = cache.begin(n_new)           # per-row positions of the new tokens
    for each layer i:  k, v = cache.update_and_fetch(i, x_i)   # x_i: post-norm layer input X
    cache.end()                              # commit the new lengths

The cache receives X (not K/V) because XQuant caches X and rebuilds K/V itself; the KV baseline
projects X with the layer's own weights. A cache gets what it needs when it is built (`ModelParts`:
the model config, each layer's K/V weights as `LayerWeights`, the model's RoPE and dtype; the
quantized kinds also the bundle's `Artifacts`), so it never reaches into the model.
`update_and_fetch` returns post-RoPE keys and values for every cached position of each row, new
tokens included, as (B, n_kv, S, head_dim).

Rows of a batch have their own lengths (`lengths`, shape (B,)): prompts are right-padded, and
row b's new tokens occupy positions lengths[b] .. lengths[b] + n_new[b] - 1.

A step may name its active rows (`begin(n_new, width, rows=[...])`, the serving engine's steps): X,
positions, the mask and the returned K/V are then those k rows' (k, ...), in that order, and the other
rows get no tokens. Stored data is the same as a step over all rows with 0 new tokens for the others,
and so are the active rows' K/V bit for bit (S stays the longest row of the whole cache): what a step
dequantizes and rebuilds follows the rows that have tokens, not the rows allocated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from xqcli.config import ModelConfig
from xqcli.errors import InputError, ResourceError
from xqcli.rope import Rope, causal_mask

__all__ = ["CacheBytes", "CacheSnapshot", "LayerWeights", "ModelCache", "ModelParts", "causal_mask", "state_tensor",
           "tensor_bytes"]


@dataclass(frozen=True)
class LayerWeights:
    """One layer's K and V projections as nn.Linear holds them (weight: out × d, bias or None):
    what every cache kind projects or rebuilds K and V with."""

    w_k: torch.Tensor
    b_k: torch.Tensor | None
    w_v: torch.Tensor
    b_v: torch.Tensor | None


@dataclass(frozen=True)
class ModelParts:
    """What a cache needs from the model it serves (it never holds the model itself)."""

    config: ModelConfig
    layers: list[LayerWeights]
    rope: Rope  # the model's RoPE: `apply` for rebuilt keys, `tables` for the decode kernels
    dtype: torch.dtype  # the model's float dtype: what full-precision cached values are kept in


@dataclass
class CacheBytes:
    """Itemized cache memory in bytes, from the real storage tensors."""

    payload: int = 0  # K/V, codes or latents of stored tokens
    scales: int = 0  # quantization scales and zero points
    fp_window: int = 0  # newest tokens kept in full precision
    workspace: int = 0  # transient buffers (the XQuant-CL accumulator)

    @property
    def total(self) -> int:
        return self.payload + self.scales + self.fp_window + self.workspace

    def __add__(self, other: "CacheBytes") -> "CacheBytes":
        return CacheBytes(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


@dataclass
class CacheSnapshot:
    """What `ModelCache.snapshot` keeps: row lengths with their host mirror, and the kind's own counters."""

    lengths: torch.Tensor
    host_lengths: list[int]
    data: object = None


def tensor_bytes(*ts: torch.Tensor | None) -> int:
    """Allocated bytes (works on the meta device, which `xq plan` uses to size caches for free)."""
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class ModelCache:
    """Base class: row lengths, step bookkeeping and the attention mask. Subclasses store data."""

    kind: str = "?"

    def __init__(self, parts: ModelParts, batch: int, max_len: int, device: torch.device | str) -> None:
        if batch < 1 or max_len < 1:
            raise InputError(f"cache needs batch >= 1 and max_len >= 1 (got {batch}, {max_len})")
        if len(parts.layers) != parts.config.num_hidden_layers:
            raise ValueError(f"{len(parts.layers)} layer weights for a {parts.config.num_hidden_layers}-layer model")
        self.config, self.weights, self.dtype = parts.config, parts.layers, parts.dtype
        self.rope = parts.rope
        self.batch = batch
        self.max_len = max_len
        self.device = torch.device(device)
        self.set_lengths(torch.zeros(batch, dtype=torch.long, device=self.device), [0] * batch)
        self._n_new: torch.Tensor | None = None
        self._n_new_host: list[int] = []
        self._step_total = 0
        self._positions: torch.Tensor | None = None
        self._rows: list[int] | None = None  # this step's active rows; None: all of them
        self._row_index: torch.Tensor | None = None  # the same on the device
        self._step_memo: dict = {}

    # Row lengths live on the device (positions, masks and kernels read them there) and are mirrored
    # on the host, so a decode step never reads them back: on a GPU every read-back waits for all
    # queued work, once per layer it would serialize the step. Setting `lengths` from outside (a
    # restored snapshot) drops the mirror; it is then read back once, when next needed.
    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths

    @lengths.setter
    def lengths(self, value: torch.Tensor) -> None:
        self._lengths = value
        self._host_lengths: list[int] | None = None

    @property
    def host_lengths(self) -> list[int]:
        """Tokens per row, on the host."""
        if self._host_lengths is None:
            self._host_lengths = [int(n) for n in self._lengths.tolist()]
        return self._host_lengths

    def set_lengths(self, value: torch.Tensor, host: list[int]) -> None:
        """Set the row lengths with their host mirror (the caller knows both: nothing is read back)."""
        self.lengths = value
        self._host_lengths = host

    # --- step protocol -------------------------------------------------------------------------
    def begin(self, n_new: torch.Tensor | list[int], width: int, rows: Sequence[int] | None = None
              ) -> torch.Tensor:
        """Start a step of `width` new (right-padded) tokens per row; returns positions (B, width).

        `n_new` (valid new tokens per row) as a list, or a tensor read back once here. `rows`: the
        step's active rows (module docstring); `n_new` then counts theirs and positions are (k, width).
        A padded query's position is clamped below `step_total`, where the RoPE tables and masks end
        (its output is discarded: only valid tokens are stored)."""
        got = [int(n) for n in (n_new if isinstance(n_new, list) else n_new.tolist())]
        self._rows = self._row_index = None
        host = got if rows is None else self._scatter_counts(list(rows), got)
        if len(host) != self.batch or min(host) < 0:
            raise ValueError(f"n_new must give 0 or more new tokens for each of the {self.batch} rows, got {host}")
        total = max(self.host_lengths[r] + host[r] for r in self.rows)  # an idle row's tokens are not read
        if total > self.max_len:
            raise ResourceError(f"context full: {total} tokens > cache capacity {self.max_len}",
                                hint="start a new conversation (/reset) or raise --context")
        if isinstance(n_new, list) or self._rows is not None:  # pinned: the copy to a GPU does not wait
            pinned = torch.tensor(host, dtype=torch.long, pin_memory=self.device.type == "cuda")
            self._n_new = pinned.to(self.device, non_blocking=True)
        else:
            self._n_new = n_new.to(self.device, torch.long)
        self._n_new_host, self._step_total = host, total
        self._step_memo = {}
        ar = torch.arange(width, device=self.device)
        self._positions = (self.take(self.lengths)[:, None] + ar[None, :]).clamp(max=max(total - 1, 0))
        return self._positions

    def step_memo(self, key, make: Callable[[], object]):
        """A value computed once per step and shared by every layer (per-layer ops add up on the CPU path,
        launches on a GPU)."""
        if key not in self._step_memo:
            self._step_memo[key] = make()
        return self._step_memo[key]

    def rope_new(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at this step's positions (`Rope.cos_sin`), gathered once for every layer."""
        return self.step_memo(("rope new", dtype), lambda: self.rope.cos_sin(self.positions, dtype, self.step_total()))

    def _scatter_counts(self, rows: list[int], counts: list[int]) -> list[int]:
        """Every row's new tokens from the active rows' `counts`; sets the step's active rows."""
        if len(rows) != len(counts) or len(set(rows)) != len(rows) or not all(0 <= r < self.batch for r in rows):
            raise ValueError(f"rows must name distinct rows of 0..{self.batch - 1}, one per count; "
                             f"got rows {rows} for counts {counts}")
        if rows != list(range(self.batch)):
            self._rows = rows
            self._row_index = torch.tensor(rows, device=self.device)
        host = [0] * self.batch
        for r, n in zip(rows, counts):
            host[r] = n
        return host

    def end(self) -> None:
        assert self._n_new is not None, "end() without begin()"
        self.set_lengths(self.lengths + self._n_new, [n + k for n, k in zip(self.host_lengths, self._n_new_host)])
        self._n_new = self._positions = None
        self._rows = self._row_index = None

    @property
    def rows(self) -> list[int]:
        """This step's active rows: the rows of the X, positions and K/V it handles."""
        return list(range(self.batch)) if self._rows is None else self._rows

    @property
    def row_subset(self) -> bool:
        """Whether this step handles only some rows (then the fused whole-batch kernels do not apply)."""
        return self._rows is not None

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The active rows of a per-row (B, ...) tensor (itself when every row is active)."""
        return t if self._row_index is None else t[self._row_index]

    def spread(self, t: torch.Tensor) -> torch.Tensor:
        """An active rows' (k, ...) tensor as (B, ...), zeros for the other rows (they append nothing)."""
        if self._row_index is None:
            return t
        return t.new_zeros((self.batch, *t.shape[1:])).index_copy_(0, self._row_index, t)

    def rows_after(self) -> list[int]:
        """The active rows' lengths after this step's new tokens, on the host."""
        return [self.host_lengths[r] + self.n_new_host[r] for r in self.rows]

    @property
    def positions(self) -> torch.Tensor:
        assert self._positions is not None
        return self._positions

    @property
    def n_new(self) -> torch.Tensor:
        assert self._n_new is not None
        return self._n_new

    @property
    def n_new_host(self) -> list[int]:
        """This step's new tokens per row, on the host."""
        assert self._n_new is not None
        return self._n_new_host

    def step_total(self) -> int:
        """Longest active row after this step: the S of the K/V returned by update_and_fetch."""
        return self._step_total

    @property
    def attention_window(self) -> int | None:
        """The model's sliding attention window (Mistral), None for full causal attention."""
        return self.config.sliding_window

    def window_applies(self) -> bool:
        """Whether this step has a query that must not see every earlier key."""
        w = self.attention_window
        return w is not None and self.step_total() > w

    def attention_mask(self) -> torch.Tensor | None:
        """Boolean (B, 1, T, S): query i of row b sees key j iff j <= lengths[b] + i (and, with a
        sliding window W, j > lengths[b] + i - W).

        None when every row starts empty with the same number of new tokens and no window cuts in:
        plain causal attention, which SDPA runs without materializing a mask (`is_causal`)."""
        width = self.positions.shape[1]
        # Decided over every row, active or not: a step over some rows gets the mask the same step over
        # all rows gets (SDPA's causal path and a mask may round differently).
        if not any(self.host_lengths) and all(n == width for n in self.n_new_host) and not self.window_applies():
            return None
        # Padded queries sit at step_total − 1 (`begin`): they see everything valid, no row is all masked.
        return causal_mask(self.positions, self.step_total(), self.attention_window).unsqueeze(1)

    def rows_scatter(self, buf: torch.Tensor, new: torch.Tensor, token_dim: int) -> None:
        """Write the valid new tokens of every active row (`new`: theirs) into `buf` at the row's length."""
        lens, n = self.host_lengths, self.n_new_host
        if not self.row_subset and len(set(lens)) == 1 and len(set(n)) == 1:
            idx = [slice(None)] * buf.dim()
            idx[token_dim] = slice(lens[0], lens[0] + n[0])
            src = new.narrow(token_dim, 0, n[0])
            buf[tuple(idx)] = src.to(buf.dtype)
            return
        for i, b in enumerate(self.rows):
            buf[b].narrow(token_dim - 1, lens[b], n[b]).copy_(new[i].narrow(token_dim - 1, 0, n[b]))

    @staticmethod
    def by_row(f: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        """`f` (a matmul) on each row of a per-row (k, ...) tensor on its own, stacked. BLAS picks its
        kernel, and with it the rounding, by the rows of a product: batched, a row's K/V would depend
        on which other rows share the step."""
        if t.shape[0] == 1:  # the same product as the row's own, without the stack's copy
            return f(t)
        return torch.stack([f(row) for row in t])

    def project(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE K and V (k, T, d_kv) of the active rows' post-norm X, with the model's k_proj/v_proj weights."""
        w = self.weights[layer]
        return (self.by_row(lambda r: F.linear(r, w.w_k, w.b_k), x),
                self.by_row(lambda r: F.linear(r, w.w_v, w.b_v), x))

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, d_kv) -> (B, n_kv, S, head_dim), as the model splits its heads."""
        b, s, _ = t.shape
        return t.view(b, s, self.config.num_key_value_heads, self.config.head_dim).transpose(1, 2)

    # --- to implement ----------------------------------------------------------------------------
    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the active rows' X (k, T, d) and return their post-RoPE K and V (k, n_kv, S, head_dim)."""
        raise NotImplementedError

    def fused_attention(self, layer: int, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
        """Append X and return attention output (B, H, 1, hd) from a fused decode kernel, or None when
        this cache, device or step has none (then `update_and_fetch` and SDPA run instead)."""
        return None

    def nbytes(self) -> CacheBytes:
        """Bytes held now, itemized."""
        raise NotImplementedError

    def allocated(self) -> CacheBytes:
        """Bytes of the preallocated storage (what `max_len` tokens would hold), itemized."""
        raise NotImplementedError

    def bytes_per_token(self) -> float | None:
        """Stored bytes (payload + scales) per token and row once tokens are past the full-precision
        window, summed over the cache's streams; None until every stream holds such a token."""
        raise NotImplementedError

    # --- snapshot (bench: time decode steps from the same prefill) ---------------------------------
    def snapshot(self) -> CacheSnapshot:
        """The state now, to come back to with `restore` after more steps. Cheap: lengths, counters and
        full-precision windows are copied, not the stored tokens (later steps only write past them)."""
        return CacheSnapshot(self.lengths.clone(), list(self.host_lengths), self._snapshot_data())

    def restore(self, snapshot: CacheSnapshot) -> None:
        """Return to the state of `snapshot` (taken from this cache); reads nothing back from the device."""
        self.set_lengths(snapshot.lengths.clone(), list(snapshot.host_lengths))
        self._restore_data(snapshot.data)

    def _snapshot_data(self) -> object:
        return None

    def _restore_data(self, data: object) -> None:
        pass

    def reset(self) -> None:
        """Forget every token (storage is kept)."""
        # A new tensor, not zero_(): after a forward `lengths` is an inference tensor, which cannot be
        # changed in place outside torch.inference_mode().
        self.set_lengths(torch.zeros_like(self.lengths), [0] * self.batch)

    # --- state (session files: `xq chat` /save and /load) -----------------------------------------
    def spec_settings(self) -> dict:
        """The kind and every setting that shapes the stored data, JSON-ready (equal settings = exchangeable)."""
        return {"name": self.kind}

    def state_dict(self) -> dict:
        """Exactly the stored data up to the current lengths, plus the kind and its settings.

        Returns ``{"meta": JSON-ready dict, "tensors": {name: tensor}}``. Rows are stored separately
        (``...r{b}``), each cut at its own length; nothing position-dependent is stored beyond token
        order, because a loaded row restarts at position 0 exactly as it was written.
        """
        return {"meta": {"kind": self.kind, "spec": self.spec_settings(), "batch": self.batch,
                         "lengths": list(self.host_lengths)} | self._state_meta(),
                "tensors": self._state_tensors()}

    def load_state_dict(self, state: dict) -> None:
        """Replace this cache's contents with `state` (from `state_dict`); refuses other kinds or settings."""
        meta, tensors = state["meta"], state["tensors"]
        saved, mine = meta.get("spec", {}), self.spec_settings()
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            what = ", ".join(f"{k} {saved.get(k)!r} (saved) vs {mine.get(k)!r} (here)" for k in diff)
            raise InputError(f"the saved cache does not match this one: {what}",
                             hint=f"use the same cache settings as when it was saved ({saved.get('name')})")
        lengths = [int(n) for n in meta["lengths"]]
        if len(lengths) > self.batch:
            raise InputError(f"the saved cache has {len(lengths)} rows, this one {self.batch}")
        if lengths and max(lengths) > self.max_len:
            raise ResourceError(f"the saved cache holds {max(lengths)} tokens, more than this cache's capacity "
                                f"{self.max_len}", hint="raise --context")
        self.reset()
        self._load_state(meta, tensors, lengths)
        host = lengths + [0] * (self.batch - len(lengths))
        self.set_lengths(torch.tensor(host, dtype=torch.long, device=self.device), host)

    def _state_meta(self) -> dict:
        return {}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_state(self, meta: dict, tensors: dict[str, torch.Tensor], lengths: list[int]) -> None:
        raise NotImplementedError


def state_tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of a saved cache state, checked for presence and shape (InputError naming it otherwise)."""
    if name not in tensors:
        raise InputError(f"the saved cache state lacks tensor {name!r} (incomplete or not an xq session file)")
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise InputError(f"saved cache tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t
