"""Perplexity through the cache: the paper's protocol and the real decode path (`xq eval`).

Text is split into non-overlapping windows of `seq_len` tokens (no BOS; the first token of each
window is context only, so a window scores seq_len − 1 tokens). For each window the fp KV logits are
computed once and every method is compared to them: perplexity, KL(kv ‖ method) and top-1 agreement.

- `paper`: teacher forcing in one forward, every position's K/V taken from the quantized cache
  (window 0, partial per-channel blocks quantized as smaller groups), as the paper measures.
- `decode`: the first `prefix` tokens are prefilled through the cache, then the rest go through it one
  token at a time, with the cache's real sealing rules (what `xq chat` sees). Prefilled positions are
  scored from the prefill logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.spec import CacheSpec, kv_bytes_per_token
from xqcli.errors import InputError, ResourceError
from xqcli.load import make_cache
from xqcli.model import Transformer
from xqcli.load import measured_bytes_per_token
from xqcli.readouts.plan import meta_model


@dataclass
class EvalRow:
    method: str
    bytes_per_token: float
    normalized: float
    compression: float
    ppl: float
    delta_ppl: float
    kl: float
    top1: float
    scored_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Acc:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    n: int = 0


def windows(tokens: list[int], seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """(n_windows, seq_len) of the first max_tokens tokens; refuses texts too short for one window."""
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2 (got {seq_len})")
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < seq_len:
        raise InputError(f"the text has {n} tokens, fewer than one window of --seq-len {seq_len}",
                         hint="use a longer text or a smaller --seq-len")
    k = n // seq_len
    return torch.tensor(tokens[: k * seq_len], dtype=torch.long).view(k, seq_len)


def method_logits(model: Transformer, artifacts: Artifacts, spec: CacheSpec, window: torch.Tensor,
                  protocol: str, prefix: int) -> torch.Tensor:
    """(T, vocab) logits of one window through a fresh cache of kind `spec`."""
    t = window.shape[0]
    tokens = window.view(1, t).to(model.device)
    if spec.method != "kv" and protocol == "paper":
        spec = replace(spec, window=0, quantize_partial=True)
    cache = make_cache(model, spec, 1, t, artifacts=artifacts)
    if protocol == "paper":
        return model(tokens, cache)[0]
    outs = [model(tokens[:, :prefix], cache)[0]]
    for i in range(prefix, t):
        outs.append(model(tokens[:, i:i + 1], cache)[0])
    return torch.cat(outs)


def evaluate(model: Transformer, tokens: list[int], methods: list[CacheSpec], *, seq_len: int = 2048,
             max_tokens: int | None = None, protocol: str = "paper", prefix: int | None = None,
             artifacts: Artifacts | None = None, progress: Callable[[int, int, str], None] | None = None,
             allow_long_context: bool = False) -> list[EvalRow]:
    """One row per method, in order. `kv` is always computed (it is the reference) but only reported if asked.
    `artifacts`: the loaded model's (`Loaded.artifacts`: a bundle's projections and rotation); by
    default a fresh one, so the SVDs run once for the whole evaluation. A window beyond the model's trained
    positions is refused unless `allow_long_context` (its perplexity would measure untrained positions)."""
    if protocol not in ("paper", "decode"):
        raise InputError(f"unknown protocol {protocol!r} (paper or decode)")
    trained = model.config.max_position_embeddings
    if seq_len > trained and not allow_long_context:
        raise ResourceError(f"--seq-len {seq_len:,} is beyond the {trained:,} positions the model was trained on",
                            hint="lower --seq-len, or pass --allow-long-context to measure past them anyway")
    artifacts = artifacts if artifacts is not None else Artifacts()
    wins = windows(tokens, seq_len, max_tokens)
    prefix = seq_len // 2 if prefix is None else prefix
    if not 1 <= prefix <= seq_len:
        raise InputError(f"--prefix must be between 1 and --seq-len ({seq_len})")
    accs = {s.name: _Acc() for s in methods}
    ref_nll = 0.0
    total, done = len(wins) * len(methods), 0
    for w in wins:
        ref = F.log_softmax(model(w.view(1, -1).to(model.device))[0, :-1].float(), -1)
        target = w[1:].to(ref.device)
        ref_top = ref.argmax(-1)
        ref_nll += float(-ref.gather(-1, target[:, None]).sum())
        for spec in methods:
            if progress:
                progress(done, total, spec.name)
            logp = ref if spec.method == "kv" else F.log_softmax(
                method_logits(model, artifacts, spec, w, protocol, prefix)[:-1].float(), -1)
            a = accs[spec.name]
            a.nll += float(-logp.gather(-1, target[:, None]).sum())
            a.kl += float((ref.exp() * (ref - logp)).sum())
            a.agree += int((logp.argmax(-1) == ref_top).sum())
            a.n += target.numel()
            done += 1
    if progress:
        progress(total, total, "")
    kv_ppl = math.exp(ref_nll / (wins.shape[0] * (seq_len - 1)))
    meta = meta_model(model.config, torch.float16)
    kv_bpt = kv_bytes_per_token(model.config)
    rows = []
    for spec in methods:
        a = accs[spec.name]
        ppl = math.exp(a.nll / a.n)
        bpt = measured_bytes_per_token(meta, spec)[0]
        rows.append(EvalRow(spec.name, bpt, bpt / kv_bpt, kv_bpt / bpt, ppl, ppl - kv_ppl, a.kl / a.n,
                            a.agree / a.n, a.n))
    return rows
