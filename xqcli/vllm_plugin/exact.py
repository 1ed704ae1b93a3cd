"""`xq_exact`: vLLM runs the X cache with xq's own arithmetic, so its greedy text is `xq generate`'s bit for bit.

Why a mode: at 4 bits one fp16 scale of a quantization group that lands on the other side of a rounding boundary
changes that group's values, and vLLM's CPU kernels compute X ~1e-6 away from xq's torch model (oneDNN GEMMs,
fused [q|k|v] and [gate|up] weights, a whole batch's rows in one GEMM, its C++ RoPE; docs/vllm.md, Blockers 4),
so its greedy text parts from xq's after a few tokens. Here every product is the one `xq generate` computes on the
CPU: xq's modules and weights (read from the same files, so they sit at the same addresses modulo the page, which
MKL's one-row kernel depends on), each request's rows on their own as xq's engine runs one prompt, xq's RoPE
tables. vLLM's scheduler, block allocator and pages run unchanged; the pages hold the same codes and scales as
without this mode, given the same X. Equal bits also need the `xq generate` run's dtype and BLAS thread count
(MKL splits products by thread; vLLM's CPU worker picks its own count unless OMP_NUM_THREADS is set).

It is slow (a GEMM per request and weight, no oneDNN) and doubles the weights in memory: a mode to check the
plugin against xq, not to serve. CPU, one rank.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from xqcli.bundle.projections import LayerProjections
from xqcli.load import Loaded, model_projections


class ExactNumerics:
    """xq's model (modules and weights, its SVD factors) and the request spans of the forward running now."""

    def __init__(self, loaded: Loaded) -> None:
        self.model, self.artifacts = loaded.model, loaded.artifacts
        self.spans: list[slice] = []

    def projections(self) -> list[LayerProjections]:
        """Every layer's SVD factors as xq's caches use them (a bundle's, else computed, cast to the model dtype)."""
        return model_projections(self.model, self.artifacts)

    def begin(self, query_start_loc: list[int] | None, n_tokens: int) -> None:
        """This forward's requests: token ranges from vLLM's attention metadata (none in its profiling runs: the
        batch is one request); tokens past the last request (padding) are one more."""
        bounds = query_start_loc if query_start_loc is not None else [0, n_tokens]
        if bounds[-1] < n_tokens:
            bounds = [*bounds, n_tokens]
        self.spans = [slice(a, b) for a, b in pairwise(bounds) if b > a]

    def rows(self, f: Callable[..., torch.Tensor], *ts: torch.Tensor) -> torch.Tensor:
        """`f` on each request's rows of `ts` on its own, concatenated: BLAS rounds a row by the product's shape."""
        return torch.cat([f(*(t[s] for t in ts)) for s in self.spans])

    def linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One of xq's nn.Linear on (T, in) rows, per request, as xq calls it: on a batch of one (1, T, in)."""
        return self.rows(lambda t: layer(t[None])[0], x)

    def rope(self, x: torch.Tensor, positions: torch.Tensor, head_dim: int) -> torch.Tensor:
        """(T, heads·head_dim) rows rotated at `positions` with xq's tables and op order (`xqcli.rope.rotate`)."""
        heads = x.view(x.shape[0], -1, head_dim).transpose(0, 1)[None]
        return self.model.rope.apply(heads, positions[None])[0].transpose(0, 1).reshape(x.shape)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Each sampled row's logits on its own, as xq's engine computes a prompt's (fp32, the true vocabulary)."""
        w = self.model.output_weight()
        return torch.cat([F.linear(h[None], w) for h in hidden_states]).float()
