"""GPU only: the decode step of the `kv` cache captured once in a CUDA graph, then replayed.

With `cuda_graph=True` on a CUDA device and the `kv` cache, the engine decodes over a static-shape
KV cache (full-length K/V, a device-side length mask, no host syncs inside the step). Every other
case (CPU, quantized kinds, whose storage is per-row Python bookkeeping) runs the same step eagerly.
The graph path cannot be exercised on CPU machines: it is kept small, and its eager twin (the static
cache with `static = True`, run without capture) is what the tests check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from xqcli.cache.base import ModelParts
from xqcli.cache.kv import KVCache
from xqcli.load import model_parts
from xqcli.rope import Rope, causal_mask, rotate_half

if TYPE_CHECKING:
    from xqcli.model import Transformer


class StaticRope:
    """A model's RoPE with tables precomputed for the whole context: no `positions.max()` sync, and
    tables that never move (a captured graph keeps pointing at them)."""

    def __init__(self, rope: Rope, n: int) -> None:
        cos, sin = rope.tables(n + 1)  # a finished row at full capacity still reads position n
        self.inv_freq, self._cos, self._sin = rope.inv_freq, cos, sin

    def apply(self, x: torch.Tensor, positions: torch.Tensor, bound: int | None = None) -> torch.Tensor:
        """`Rope.apply` over the fixed tables (`bound` is not needed: they cover every position)."""
        cos = self._cos[positions].unsqueeze(1).to(x.dtype)
        sin = self._sin[positions].unsqueeze(1).to(x.dtype)
        return x * cos + rotate_half(x) * sin


class StaticKVCache(KVCache):
    """The `kv` cache with static shapes for CUDA-graph capture of the decode step.

    `static = True` (set around decode steps) switches to: K/V written with a device-side scatter at
    each row's length, full-length K/V returned with a length mask, lengths advanced in place, and no
    host syncs. Prefill uses the ordinary (dynamic) KVCache code. The engine checks capacity on the
    host before every step, since the static path cannot.
    """

    static = False

    def __init__(self, parts: ModelParts, batch: int, max_len: int, device: torch.device | str) -> None:
        super().__init__(parts, batch, max_len, device)
        self.rope = StaticRope(parts.rope, max_len)  # fixed tables; the graph step lends them to the model

    def begin(self, n_new: torch.Tensor, width: int) -> torch.Tensor:
        if not self.static:
            return super().begin(n_new, width)
        self._n_new = n_new
        self._step_total = self.max_len  # an upper bound: the static path attends over the whole buffer
        self._positions = self.lengths[:, None] + torch.arange(width, device=self.device)[None, :]
        return self._positions

    def end(self) -> None:
        # The static step does not know its new tokens on the host (that would sync): the mirror is
        # dropped and read back when next needed.
        host = None if self.static else [n + k for n, k in zip(self.host_lengths, self._n_new_host)]
        self.lengths.add_(self._n_new)  # in place: a captured graph keeps pointing at this tensor
        self._host_lengths = host
        self._n_new = self._positions = None

    def reset(self) -> None:
        self.lengths.zero_()  # in place, for the same reason (the engine calls it in inference mode)
        self._host_lengths = [0] * self.batch

    def load_state_dict(self, state: dict) -> None:
        lengths = self.lengths
        super().load_state_dict(state)
        self.set_lengths(lengths.copy_(self.lengths), self.host_lengths)

    def attention_mask(self) -> torch.Tensor:
        if not self.static:
            return super().attention_mask()
        return causal_mask(self._positions, self.max_len, self.attention_window).unsqueeze(1)

    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.static:
            return super().update_and_fetch(layer, x)
        k, v = (self.heads(t) for t in self.project(layer, x))  # (B, n_kv, 1, hd)
        k = self.rope.apply(k, self._positions)
        idx = self._positions.clamp(max=self.max_len - 1)[:, None, :, None].expand_as(k)
        self.k[layer].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]


def static_kv_cache(model: Transformer, batch: int, max_len: int) -> StaticKVCache:
    """The `kv` cache of `model` (its weights, RoPE, dtype and device) in its static-shape form."""
    return StaticKVCache(model_parts(model), batch, max_len, model.device)


class GraphedDecode:
    """One (B, 1) decode step over a StaticKVCache, warmed up eagerly then captured and replayed.

    Every call is a real step (warm-up steps run on a side stream, as torch.cuda.graphs asks), so
    capture never advances the cache twice: capturing records work without running it, and the replay
    that follows runs it once.
    """

    WARMUP = 2

    def __init__(self, model: Transformer, cache: StaticKVCache) -> None:
        self.model, self.cache = model, cache
        b = cache.batch
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=cache.device)
        self.n_new = torch.ones(b, dtype=torch.long, device=cache.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.warm = 0

    def _step(self) -> torch.Tensor:
        # Static cache and sync-free RoPE only while this step runs (or is captured): replays need no Python.
        self.cache.static, saved, self.model._rope = True, self.model._rope, self.cache.rope
        try:
            return self.model(self.tokens, self.cache, self.n_new)[:, -1]
        finally:
            self.cache.static, self.model._rope = False, saved

    def __call__(self, tokens: torch.Tensor, n_new: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.n_new.copy_(n_new)
        if self.graph is None and self.warm < self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.warm += 1
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
        self.graph.replay()
        return self.logits
