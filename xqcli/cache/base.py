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
"""

from __future__ import annotations

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
    def begin(self, n_new: torch.Tensor | list[int], width: int) -> torch.Tensor:
        """Start a step of `width` new (right-padded) tokens per row; returns positions (B, width).

        `n_new` (valid new tokens per row) as a list, or a tensor read back once here."""
        host = [int(n) for n in (n_new if isinstance(n_new, list) else n_new.tolist())]
        if len(host) != self.batch or min(host) < 0:
            raise ValueError(f"n_new must give 0 or more new tokens for each of the {self.batch} rows, got {host}")
        total = max(n + k for n, k in zip(self.host_lengths, host))
        if total > self.max_len:
            raise ResourceError(f"context full: {total} tokens > cache capacity {self.max_len}",
                                hint="start a new conversation (/reset) or raise --context")
        if isinstance(n_new, list):  # pinned, so the copy to a GPU does not wait for queued work
            pinned = torch.tensor(host, dtype=torch.long, pin_memory=self.device.type == "cuda")
            self._n_new = pinned.to(self.device, non_blocking=True)
        else:
            self._n_new = n_new.to(self.device, torch.long)
        self._n_new_host, self._step_total = host, total
        ar = torch.arange(width, device=self.device)
        self._positions = self.lengths[:, None] + ar[None, :]
        return self._positions

    def end(self) -> None:
        assert self._n_new is not None, "end() without begin()"
        self.set_lengths(self.lengths + self._n_new, [n + k for n, k in zip(self.host_lengths, self._n_new_host)])
        self._n_new = self._positions = None

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
        """Longest row after this step: the S of the K/V returned by update_and_fetch."""
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
        if not any(self.host_lengths) and all(n == width for n in self.n_new_host) and not self.window_applies():
            return None
        s = self.step_total()
        limit = self.positions.clamp(max=s - 1)  # padded queries see everything valid: no all-masked rows
        return causal_mask(limit, s, self.attention_window).unsqueeze(1)

    def rows_scatter(self, buf: torch.Tensor, new: torch.Tensor, token_dim: int) -> None:
        """Write the valid new tokens of every row into `buf` at that row's current length."""
        lens, n = self.host_lengths, self.n_new_host
        if len(set(lens)) == 1 and len(set(n)) == 1:
            idx = [slice(None)] * buf.dim()
            idx[token_dim] = slice(lens[0], lens[0] + n[0])
            src = new.narrow(token_dim, 0, n[0])
            buf[tuple(idx)] = src.to(buf.dtype)
            return
        for b, (start, cnt) in enumerate(zip(lens, n)):
            buf[b].narrow(token_dim - 1, start, cnt).copy_(new[b].narrow(token_dim - 1, 0, cnt))

    def project(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE K and V (B, T, d_kv) of one layer's post-norm X, exactly as the model's k_proj/v_proj."""
        w = self.weights[layer]
        return F.linear(x, w.w_k, w.b_k), F.linear(x, w.w_v, w.b_v)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, d_kv) -> (B, n_kv, S, head_dim), as the model splits its heads."""
        b, s, _ = t.shape
        return t.view(b, s, self.config.num_key_value_heads, self.config.head_dim).transpose(1, 2)

    # --- to implement ----------------------------------------------------------------------------
    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
