"""What one generation call did and where the memory goes: plain data, rendered by `xqcli.readouts.stats`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from xqcli.cache.base import CacheBytes


@dataclass
class GenerationStats:
    """One call (`generate`, `generate_batch` or `chat_turn`), all rows together."""

    rows: int = 1
    prompt_tokens: int = 0  # tokens prefilled by this call
    reused_tokens: int = 0  # tokens already in the cache and kept (conversation turns)
    generated_tokens: int = 0
    prefill_s: float = 0.0  # call start -> first token ids on the host (time to first token)
    decode_s: float = 0.0  # first token -> last token
    finish: list[str] = field(default_factory=list)  # per row

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens from decode steps (the first token of each row comes from the prefill) per second."""
        n = self.generated_tokens - self.rows
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "prompt_tokens": self.prompt_tokens, "reused_tokens": self.reused_tokens,
                "generated_tokens": self.generated_tokens, "prefill_s": round(self.prefill_s, 6),
                "decode_s": round(self.decode_s, 6), "prefill_tok_s": round(self.prefill_tok_s, 3),
                "decode_tok_s": round(self.decode_tok_s, 3), "finish": list(self.finish)}


@dataclass
class MemoryReport:
    """Where the memory goes now, what the same tokens would cost without xq, and how far the context can grow."""

    cache_kind: str
    context_tokens: int  # tokens held now, all rows
    capacity_tokens: int  # rows x context: what the preallocated cache can hold
    cache: CacheBytes  # bytes the held tokens take now, itemized
    cache_allocated: int  # bytes of the preallocated storage (what llama.cpp reports at start)
    kv_fp16_bytes: int  # what an fp16 KV cache takes for the same tokens
    model_dtype: str  # the model's dtype: what a plain KV cache on this device would store
    kv_model_bytes: int  # what a KV cache in the model dtype takes for the same tokens
    bytes_per_token: float  # steady state: payload + scales of one token past the window (= `xq plan`)
    kv_fp16_bytes_per_token: int  # `kv_bytes_per_token(cfg)`: n_layers * 2 * kv_dim * 2
    workspace_bytes_per_token: float  # XQuant-CL accumulator, transient (not in the ratios)
    window: int  # newest tokens kept in full precision
    compression_from: int | None  # tokens from which the stored cache is below fp16 KV (None: never)
    tokens_left: int  # more tokens that fit: the allocation, the budget and the trained length, whichever is least
    tokens_left_limit: str  # which of those it is: "context", "budget" or "trained length"
    trained_tokens: int  # the model's trained positions (max_position_embeddings)
    device: str
    allocated: int | None = None  # CUDA: torch.cuda.memory_allocated
    reserved: int | None = None  # CUDA: memory_reserved
    peak: int | None = None  # CUDA: max_memory_allocated; CPU: peak RSS (never below `rss`)
    rss: int | None = None  # CPU: resident set size of this process
    budget: int | None = None  # bytes the cache may hold in total
    budget_source: str = ""

    @property
    def stored(self) -> int:
        """Bytes the held tokens take (payload + scales + fp window): the CL workspace is transient."""
        return self.cache.total - self.cache.workspace

    @property
    def ratio_now(self) -> float | None:
        """fp16 KV bytes / this cache's stored bytes for the tokens held now (the fp window included)."""
        return self.kv_fp16_bytes / self.stored if self.stored else None

    @property
    def ratio_now_model(self) -> float | None:
        """KV bytes in the model dtype / this cache's stored bytes, for the tokens held now."""
        return self.kv_model_bytes / self.stored if self.stored else None

    @property
    def ratio(self) -> float:
        """Steady-state compression vs fp16 KV, as `xq plan` reports it."""
        return self.kv_fp16_bytes_per_token / self.bytes_per_token if self.bytes_per_token else 0.0

    @property
    def context_left(self) -> int:
        return self.capacity_tokens - self.context_tokens

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["cache"] = self.cache.as_dict()
        return d | {"ratio_now": _round(self.ratio_now), "ratio_now_model": _round(self.ratio_now_model),
                    "ratio": _round(self.ratio), "context_left": self.context_left}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)
