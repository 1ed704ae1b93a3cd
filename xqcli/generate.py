"""Greedy generation over any cache kind: a generator of token ids, so printing stays outside the loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from xqcli.cache import CacheBytes
from xqcli.caches import CacheSpec, make_cache
from xqcli.errors import InputError
from xqcli.model import Transformer


@dataclass
class GenStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    cache: CacheBytes = field(default_factory=CacheBytes)
    kv_fp16_bytes: int = 0  # what an fp16 KV cache would hold for the same tokens
    stop_reason: str = ""

    @property
    def decode_tok_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s > 0 and self.generated_tokens > 1 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
                "prefill_tok_s": round(self.prefill_tok_s, 2), "decode_tok_s": round(self.decode_tok_s, 2),
                "stop_reason": self.stop_reason, "cache_bytes": self.cache.as_dict(),
                "kv_fp16_bytes": self.kv_fp16_bytes,
                "ratio_vs_fp16_kv": round(self.kv_fp16_bytes / self.cache.total, 3) if self.cache.total else None}


def greedy(model: Transformer, prompt: list[int], *, max_tokens: int = 64, cache: CacheSpec | str = "kv",
           eos_ids: list[int] | tuple[int, ...] = (), stats: GenStats | None = None) -> Iterator[int]:
    """Yield greedily chosen token ids after the prompt, stopping at EOS or max_tokens."""
    if not prompt:
        raise InputError("the prompt is empty", hint="pass some text with -p")
    if max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1 (got {max_tokens})")
    stats = stats if stats is not None else GenStats()
    c = make_cache(model, cache, 1, len(prompt) + max_tokens)
    stats.prompt_tokens = len(prompt)
    t0 = time.perf_counter()
    logits = model(torch.tensor([prompt], device=model.device), c)[:, -1]
    stats.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    stats.stop_reason = "max_tokens"
    for i in range(max_tokens):
        tok = int(logits.argmax(-1))
        stats.generated_tokens += 1
        yield tok
        if tok in eos_ids:
            stats.stop_reason = "eos"
            break
        if i + 1 < max_tokens:
            logits = model(torch.tensor([[tok]], device=model.device), c)[:, -1]
    stats.decode_s = time.perf_counter() - t1
    cfg = model.config
    stats.cache = c.nbytes()
    stats.kv_fp16_bytes = int(c.lengths.sum()) * cfg.num_hidden_layers * 2 * cfg.kv_dim * 2
