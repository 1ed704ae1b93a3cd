"""Log-likelihood of continuations through a cache of any kind: what lm-eval's `loglikelihood` and the
passkey task score with (docs/eval.md states the protocol).

Each request is (context ids, continuation ids). A batch of requests goes through one fresh cache in two
forward steps: the contexts (right-padded, each row its own length), then every continuation but its
last token. The logits that score continuation token i therefore come from attention over K/V rebuilt
from the cache, context and earlier continuation tokens included. Scoring caches are built with no
full-precision window and with waiting tokens quantized (`quantize_partial`, per-channel streams' partial
blocks as one smaller group): every cached token the continuation attends over is quantized, as in the
paper's perplexity protocol (docs/design.md §9). Only the positions that score a token are projected to
the vocabulary, so a batch never holds (B, T, vocab) logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.spec import CacheSpec
from xqcli.errors import InputError
from xqcli.load import make_cache
from xqcli.model import Transformer


@dataclass(frozen=True)
class Scored:
    """One request's result: summed log-probability of the continuation and whether greedy decoding
    would have produced it (every continuation token is the argmax), lm-eval's `(logprob, is_greedy)`."""

    logprob: float
    greedy: bool


def scoring_spec(spec: CacheSpec) -> CacheSpec:
    """The cache a scored continuation goes through: `kv` as is; quantized kinds with window 0 and the
    waiting tokens quantized, so no cached token escapes quantization (docs/eval.md)."""
    return spec if spec.method == "kv" else replace(spec, window=0, quantize_partial=True)


def truncate(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """Drop context tokens from the left so context + continuation − 1 fits `max_length` positions (lm-eval's
    `hf` rule); at least one context token stays. Refuses a continuation that alone does not fit."""
    if not context or not continuation:
        raise InputError("a scored request needs at least one context and one continuation token")
    if len(continuation) > max_length:
        raise InputError(f"a continuation of {len(continuation):,} tokens does not fit the model's {max_length:,} "
                         f"positions", hint="score shorter continuations (lm-eval: max_length)")
    keep = max(1, max_length + 1 - len(continuation))
    return list(context[-keep:]), list(continuation)


@torch.inference_mode()
def _logits_at(model: Transformer, h: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """fp32 log-softmax at the given (row, position) pairs of final hidden states h (B, T, d)."""
    picked = h[torch.tensor(rows, device=h.device), torch.tensor(cols, device=h.device)]
    return F.log_softmax(F.linear(picked, model.output_weight()).float(), -1)


@torch.inference_mode()
def score_batch(model: Transformer, spec: CacheSpec, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                artifacts: Artifacts) -> list[Scored]:
    """Score one batch through one fresh cache of `scoring_spec(spec)` (see the module docstring)."""
    spec = scoring_spec(spec)
    dev = model.device
    ctx = [list(c) for c, _ in requests]
    cont = [list(c) for _, c in requests]
    fed = [c[:-1] for c in cont]  # continuation tokens that go through the cache after the context
    cache = make_cache(model, spec, len(requests), max(len(a) + len(b) for a, b in zip(ctx, fed)),
                       artifacts=artifacts)

    def step(rows: list[list[int]]) -> torch.Tensor:
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        return model.hidden_states(ids.to(dev), cache, [len(r) for r in rows])

    h_ctx = step(ctx)
    first = _logits_at(model, h_ctx, list(range(len(ctx))), [len(c) - 1 for c in ctx])
    h_cont = step(fed) if any(fed) else None
    out = []
    for b, c in enumerate(cont):
        logp = first[b:b + 1]
        if len(c) > 1:
            assert h_cont is not None
            logp = torch.cat([logp, _logits_at(model, h_cont, [b] * (len(c) - 1), list(range(len(c) - 1)))])
        target = torch.tensor(c, device=logp.device)
        out.append(Scored(float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
    return out


def score(model: Transformer, spec: CacheSpec, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
          artifacts: Artifacts | None = None, batch_size: int = 8, max_length: int | None = None) -> list[Scored]:
    """`Scored` per request, in the given order. Requests are batched longest first (similar lengths share a
    batch, so little padding) and left-truncated to `max_length` (default: the model's trained positions)."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1 (got {batch_size})")
    artifacts = artifacts if artifacts is not None else Artifacts()
    limit = max_length if max_length is not None else model.config.max_position_embeddings
    reqs = [truncate(c, k, limit) for c, k in requests]
    order = sorted(range(len(reqs)), key=lambda i: -(len(reqs[i][0]) + len(reqs[i][1])))
    results: list[Scored | None] = [None] * len(reqs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, r in zip(idx, score_batch(model, spec, [reqs[i] for i in idx], artifacts)):
            results[i] = r
    return [r for r in results if r is not None]
