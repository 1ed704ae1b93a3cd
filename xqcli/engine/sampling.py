"""Choosing the next token on the model's device, and the `/set` grammar for sampling settings.

Sampling (greedy, temperature, top-k, top-p, min-p, repetition penalty) runs where the logits are,
without a host sync. Drawing from the filtered distribution uses the exponential-race trick (argmax
of p / Exp(1)), which needs no `torch.multinomial` sync (gpt-fast `multinomial_sample_one_no_sync`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from xqcli.errors import InputError

@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. `temperature=0` is greedy (the other filters then do nothing)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repeat_penalty: float = 1.0  # 1: off; >1 discourages every token already in the context
    seed: int | None = None  # reseeds the engine's generator at the start of each call
    max_tokens: int = 256
    stop: tuple[str, ...] = ()

    def check(self) -> SamplingParams:
        """Raise InputError (with the number) for any value out of range; returns self."""
        problems = []
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            problems.append(f"top-k must be >= 0, 0 meaning off (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top-p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.min_p < 1:
            problems.append(f"min-p must be in [0, 1) (got {self.min_p})")
        if not (self.repeat_penalty > 0 and math.isfinite(self.repeat_penalty)):
            problems.append(f"repeat penalty must be > 0, 1 meaning off (got {self.repeat_penalty})")
        if self.max_tokens < 1:
            problems.append(f"max tokens must be >= 1 (got {self.max_tokens})")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            problems.append(f"seed must be in [0, 2**63) (got {self.seed})")
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
        if problems:
            raise InputError("; ".join(problems))
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes: Any) -> SamplingParams:
        """A checked copy with some fields changed (`stop` accepts any sequence of strings)."""
        if "stop" in changes and changes["stop"] is not None:
            changes["stop"] = tuple(changes["stop"])
        return replace(self, **{k: v for k, v in changes.items() if v is not None or k == "seed"}).check()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"stop": list(self.stop)}


# Keys `/set` accepts, with their parsers (`none` or `off` clears the seed).
SETTABLE: dict[str, Callable[[str], Any]] = {
    "temperature": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float,
    "seed": lambda v: None if v.lower() in ("none", "off", "random") else int(v), "max_tokens": int,
}


def parse_setting(key: str, value: str) -> dict[str, Any]:
    """`/set KEY VALUE` -> {field: value}; accepts `top-k` for `top_k`; InputError for anything else."""
    k = key.strip().lower().replace("-", "_")
    k = {"temp": "temperature", "repetition_penalty": "repeat_penalty", "n": "max_tokens"}.get(k, k)
    if k not in SETTABLE:
        raise InputError(f"unknown setting {key!r}", hint=f"settable: {', '.join(SETTABLE)}")
    try:
        return {k: SETTABLE[k](value.strip())}
    except ValueError:
        raise InputError(f"{k} takes a number (got {value!r})") from None


def apply_repeat_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL / HF rule: a seen token's positive logit is divided by the penalty, a negative one multiplied."""
    if seen is None or penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def mask_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def mask_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    srt, idx = torch.sort(logits, dim=-1, descending=True)
    probs = srt.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= p  # the mass before a token already reaches p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))


def mask_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the most likely token's."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from fp32 logits (B, V), on the logits' device, without a host sync.

    Order (Hugging Face's): repetition penalty, temperature, top-k, top-p, min-p, then a draw.
    """
    logits = apply_repeat_penalty(logits, seen, params.repeat_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = mask_min_p(mask_top_p(mask_top_k(logits / params.temperature, params.top_k), params.top_p),
                        params.min_p)
    probs = logits.softmax(-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)  # argmax p/E ~ Categorical(p)
    return (probs / race).argmax(-1)

