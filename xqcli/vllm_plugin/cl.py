"""XQuant-CL across the layers of one vLLM forward: each layer's part in the chain and the running accumulator X̂.

Pure torch, no vLLM (tests/vllm_plugin/test_pages.py drives it beside xq's `XQuantCLCache`). The semantics are
`xqcli/cache/xquant_cl.py`'s at window 0 (docs/design.md §4): layers < base_layers−1 are plain XQuant at base_bits;
the seed layer base_layers−1 stores Q(X·U_kv) (GQA) or Q(X) (MHA) at base_bits and seeds X̂; a delta layer i stores
Q((X_i − X̂_{i−1})·U_kv) or Q(X_i − X̂_{i−1}), per token, and X̂_i = X̂_{i−1} + deq(...)·U_kvᵀ.

vLLM gives an attention layer its own pages only, so the chain is carried from layer to layer in an
`Accumulator` (one per engine, reset by the seed layer at every forward): after layer i it holds X̂_i of every
token of every request in the batch. The cached tokens' X̂ is thus rebuilt from the pages of layers
base_layers−1..i at every forward, as xq's reference rebuilds it every step; the new tokens' X̂_{i−1}, which layer
i's deltas are formed against, is the same forward's previous layer's. On GQA with quantized pages that X̂ of the
new tokens (the ones being sealed, at window 0) is carried in float64 beside it, as xq does (docs/design.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from xqcli.cache.spec import CacheSpec
from xqcli.vllm_plugin.pages import PageLayout


def layer_spec(spec: CacheSpec, layer: int) -> tuple[CacheSpec, str]:
    """The kind one layer of an `spec` cache is quantized as, and its part: `plain` (its own X, latents or KIVI's
    K and V), `seed` or `delta`. XQuant-CL's layers below base_layers are at base_bits (`CacheSpec.layer_bits`),
    and those below base_layers−1 are plain XQuant."""
    if spec.method != "xquant-cl":
        return spec, "plain"
    bits = spec.layer_bits(layer)
    part = "plain" if layer < spec.base_layers - 1 else "seed" if layer == spec.base_layers - 1 else "delta"
    return replace(spec, method="xquant", bits=bits), part


def layer_layout(spec: CacheSpec, layer: int, kv_width: int, latent: bool, dtype: torch.dtype
                 ) -> tuple[PageLayout, str]:
    """One layer's pages and its part (`layer_spec`), for a rank with `kv_width` values of K per token that caches
    latents (`latent`) or X (kv_width wide). Plain: K or X·U_k per channel and V or X·U_v per token, or X per
    token; a seed or delta: one per-token stream, X·U_kv (2·kv_width) or X wide."""
    spec, part = layer_spec(spec, layer)
    if part != "plain":
        axes, width = ["token"], 2 * kv_width if latent else kv_width
    else:
        axes, width = (["channel", "token"] if spec.method == "kivi" or latent else ["token"]), kv_width
    return PageLayout.of_kind(spec, axes, width, layer, dtype), part


@dataclass(frozen=True)
class ChainLayer:
    """A seed or delta layer: U_kv (d × 2·d_kv: the stream is X's projection on it) or None (MHA: X itself)."""

    seed: bool
    u: torch.Tensor | None
    sealing: bool = False  # GQA, quantized: the new tokens' X̂ chain in float64 (`Accumulator.sealed`)

    def stream(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """What the page stores for new tokens of X (T, d) whose X̂_{i−1} is `prev` (T, d; float64 under `sealing`;
        the seed ignores it): X·U_kv − X̂_{i−1}·U_kv, as xq's stream subtracts the accumulator's projection when it
        quantizes (under `sealing` a float64 product rounded once, as xq's `XQuantCLCache.sealing`)."""
        down = x if self.u is None else x @ self.u
        if self.seed:
            return down
        if self.sealing:
            return down - (prev @ self.u.double()).to(down.dtype)
        return down - (prev if self.u is None else prev @ self.u)

    def up(self, stored: torch.Tensor) -> torch.Tensor:
        """Dequantized stream values (n, width) back in X's space: what they add to X̂."""
        return stored if self.u is None else stored @ self.u.T

    def up64(self, stored: torch.Tensor) -> torch.Tensor:
        """`up` in float64 (`sealing`): what the new tokens' stored values add to their float64 X̂."""
        return stored.double() @ self.u.double().T


class Accumulator:
    """X̂ after the last seed/delta layer of the forward running now: per request (by its index in the batch) for
    all its tokens, and at the forward's new tokens in the batch's token order (what the next layer's deltas are
    formed against). Layers replace it in place, one after another; the seed layer resets it.

    Decode rows that the fused kernels take keep theirs in one dense buffer instead (`dense`, (B, S, d), a row per
    new token at `dense_new` of the batch's), which `xqcli.kernels.xquant_cl.xquant_cl_update` updates in place."""

    def __init__(self) -> None:
        self.requests: dict[int, torch.Tensor] = {}
        self.new: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None
        self.dense_new: list[int] = []
        # `ChainLayer.sealing`: float64 X̂ at the new tokens, (T, d): `sealed` the previous layer's (what this layer's
        # deltas are formed against), `sealed_next` this layer's. Both attention paths of a row (the fused kernels and
        # torch, which `XQ_VLLM_FUSED=check` runs both) write the same value into `sealed_next`.
        self.sealed: torch.Tensor | None = None
        self.sealed_next: torch.Tensor | None = None

    def reset(self, hidden_states: torch.Tensor, sealing: bool = False) -> None:
        """Start a forward whose new tokens are `hidden_states` (T, d). X̂ stays 0 where no layer adds to it (vLLM's
        profiling forwards run without attention metadata)."""
        self.requests = {}
        self.new = torch.zeros_like(hidden_states)
        self.dense, self.dense_new = None, []
        self.sealed = None
        self.sealed_next = torch.zeros_like(hidden_states, dtype=torch.float64) if sealing else None

    def next_layer(self) -> torch.Tensor:
        """At a delta layer (`ChainLayer.sealing`): the previous layer's float64 X̂ at the new tokens becomes the one
        this layer's deltas are formed against; returns it."""
        if self.sealed_next is None:
            raise RuntimeError("xq: an XQuant-CL delta layer ran before its seed layer in this forward")
        spare = self.sealed if self.sealed is not None else torch.empty_like(self.sealed_next)
        self.sealed, self.sealed_next = self.sealed_next, spare  # two buffers per forward, swapped layer by layer
        return self.sealed

    def seal(self, new: slice | list[int], up: torch.Tensor, seed: bool) -> None:
        """This layer's float64 X̂ at the new tokens `new`: `up` (`ChainLayer.up64` of their stored values) alone at
        the seed, else added to the previous layer's."""
        self.sealed_next[new] = up if seed else self.sealed[new] + up

    def dense_for(self, new: list[int], seq_lens: torch.Tensor, width: int, dtype: torch.dtype, seed: bool
                  ) -> torch.Tensor:
        """The dense X̂ buffer ((B, longest, width)) of the decode rows whose new tokens are at `new` of the batch's:
        a fresh one at the seed layer, else the one the previous layers updated."""
        if seed:
            self.dense = torch.zeros(len(new), int(seq_lens.max()), width, dtype=dtype, device=seq_lens.device)
            self.dense_new = list(new)
        elif self.dense is None or self.dense_new != list(new):
            raise RuntimeError("xq: an XQuant-CL delta layer's decode rows differ from its seed layer's")
        return self.dense

    def dense_done(self, seq_lens: torch.Tensor) -> None:
        """After a layer updated `dense`: its rows' last tokens are the forward's new ones."""
        rows = torch.arange(len(self.dense_new), device=seq_lens.device)
        self.at_new_tokens()[self.dense_new] = self.dense[rows, seq_lens.long() - 1].to(self.new.dtype)

    def at_new_tokens(self) -> torch.Tensor:
        """X̂ at the forward's new tokens (T, d), in the batch's token order."""
        if self.new is None:
            raise RuntimeError("xq: an XQuant-CL delta layer ran before its seed layer in this forward")
        return self.new

    def add(self, request: int, new: slice, values: torch.Tensor, seed: bool) -> torch.Tensor:
        """X̂_i of one request's n tokens: `values` (n, d, already in X's space) alone at the seed, else X̂_{i−1} +
        `values`; its last tokens are the forward's new ones at `new`."""
        acc = values if seed else self.requests[request] + values
        self.requests[request] = acc
        self.at_new_tokens()[new] = acc[acc.shape[0] - (new.stop - new.start):]
        return acc
