"""The decode engine: chunked prefill, one decode step, on-device sampling, stop handling, readouts.

Library first (style.md Part 4, items 7, 10 and 12): `Engine.generate`, `generate_batch` and
`chat_turn` are generators of `Step` records. Printing, live panels and JSON are consumers of that
stream; the numbers they show come from the plain dataclasses `GenerationStats` and `MemoryReport`.

    engine = Engine(model, tokenizer, cache="xquant-4", context=4096)
    for step in engine.generate(tokenizer.encode("The capital of France is"), max_tokens=16):
        print(step.text, end="")
    print(engine.stats.decode_tok_s, engine.memory().ratio)

Shapes and rules:
- Caches are allocated once, for `batch` rows of `context` tokens, when the engine is built.
- Prompts longer than `prefill_chunk` are prefilled chunk by chunk; a batch is right-padded and each
  row's valid length is passed to the model (`n_new`), so rows of different lengths never mix.
- Sampling (greedy, temperature, top-k, top-p, min-p, repetition penalty) runs on the model's device;
  the only host sync per step is reading the sampled ids back for streaming and stop checks.
  Sampling from the filtered distribution uses the exponential-race trick (argmax of p / Exp(1)),
  which needs no `torch.multinomial` sync (gpt-fast `multinomial_sample_one_no_sync`).
- Stop strings are matched on the decoded text; text that could be the start of a stop string is
  held back until it is decided, so a stop string is never printed.
- GPU only: with `cuda_graph=True` on a CUDA device and the `kv` cache, the decode step runs over a
  static-shape KV cache (full-length K/V, a device-side length mask, no host syncs inside the step)
  and is captured once in a CUDA graph, then replayed. Every other case (CPU, quantized kinds, whose
  storage is per-row Python bookkeeping) runs the same step eagerly. The graph path cannot be
  exercised on CPU machines: it is kept small and its eager twin is what the tests check.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from xqcli.cache.base import CacheBytes, KVCache, ModelCache, causal_mask
from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.load import make_cache
from xqcli.errors import InputError, ResourceError
from xqcli.bundle.projections import model_projections

if TYPE_CHECKING:
    from xqcli.model import Transformer
    from xqcli.tokenizer import Tokenizer

DEFAULT_CONTEXT = 4096
DEFAULT_PREFILL_CHUNK = 512
FINISH_REASONS = ("eos", "stop", "max_tokens", "context", "interrupted")


# ------------------------------------------------------------------------------------------ sampling


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


# ------------------------------------------------------------------------------------- step and stats


@dataclass
class Step:
    """One generated token of one row. `text` may be "" (a partial character, held stop-string text)."""

    row: int
    index: int  # 0-based among this row's generated tokens
    token: int
    text: str
    t: float  # seconds since the call started (prefill included)
    dt: float  # seconds since this row's previous token (time to first token for index 0)
    finish: str | None = None  # on a row's last step: eos | stop | max_tokens | context | interrupted


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

    def lines(self) -> list[str]:
        """Plain-text readout (stdout when it is not a terminal, and the rich table's rows)."""
        return [f"prompt: {self.prompt_tokens:,} tokens prefilled, {self.reused_tokens:,} reused from the cache",
                f"generated: {self.generated_tokens:,} tokens, finish {', '.join(self.finish) or '-'}",
                f"prefill: {self.prefill_s:.3f} s, {self.prefill_tok_s:,.1f} tok/s",
                f"decode: {self.decode_s:.3f} s, {self.decode_tok_s:,.1f} tok/s"]

    def __rich__(self):
        return _table("generation", self.lines())


@dataclass
class MemoryReport:
    """Where the memory goes now, and how far the context can grow."""

    cache_kind: str
    context_tokens: int  # tokens held now, all rows
    capacity_tokens: int  # rows x context: what the preallocated cache can hold
    cache: CacheBytes  # bytes the held tokens take now, itemized
    kv_fp16_bytes: int  # what an fp16 KV cache takes for the same tokens
    bytes_per_token: float  # steady state: payload + scales of one token past the window (= `xq plan`)
    kv_fp16_bytes_per_token: int  # n_layers * 2 * kv_dim * 2
    workspace_bytes_per_token: float  # XQuant-CL accumulator, transient (not in the ratio)
    device: str
    allocated: int | None = None  # CUDA: torch.cuda.memory_allocated
    reserved: int | None = None  # CUDA: memory_reserved
    peak: int | None = None  # CUDA: max_memory_allocated; CPU: peak RSS
    rss: int | None = None  # CPU: resident set size of this process
    budget: int | None = None  # bytes the cache may hold in total
    budget_source: str = ""
    tokens_left: int | None = None  # more tokens that fit the budget at bytes_per_token (+ workspace)

    @property
    def ratio_now(self) -> float | None:
        """fp16 KV bytes / this cache's bytes for the tokens held now (the fp window included)."""
        return self.kv_fp16_bytes / self.cache.total if self.cache.total else None

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
        return d | {"ratio_now": _round(self.ratio_now), "ratio": _round(self.ratio),
                    "context_left": self.context_left}

    def lines(self) -> list[str]:
        c = self.cache
        now = f", {self.ratio_now:.2f}x this cache now" if self.ratio_now else ""
        out = [
            f"context: {self.context_tokens:,} tokens held, {self.context_left:,} of {self.capacity_tokens:,} left",
            (f"cache {self.cache_kind}: {_b(c.total)} = payload {_b(c.payload)} + scales {_b(c.scales)} "
             f"+ fp window {_b(c.fp_window)} + CL workspace {_b(c.workspace)}"),
            f"fp16 KV for the same tokens: {_b(self.kv_fp16_bytes)}{now}",
            (f"per token past the window: {self.bytes_per_token:,.0f} B/token (payload+scales) vs fp16 KV "
             f"{self.kv_fp16_bytes_per_token:,} B/token: ratio {self.ratio:.2f}x"),
        ]
        if self.allocated is not None:
            out.append(f"device {self.device}: allocated {_b(self.allocated)}, reserved {_b(self.reserved)}, "
                       f"peak {_b(self.peak)}")
        else:
            out.append(f"device {self.device}: RSS {_b(self.rss)}, peak {_b(self.peak)}")
        if self.budget is not None:
            per = self.bytes_per_token + self.workspace_bytes_per_token
            out.append(f"budget: {_b(self.budget)} ({self.budget_source}) -> {self.tokens_left:,} more tokens at "
                       f"{per:,.0f} B/token")
        return out

    def __rich__(self):
        return _table("memory", self.lines())


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _b(n: float | None) -> str:
    """Bytes for people: 0 B, 812 B, 12.3 KiB, 4.56 MiB, 1.20 GiB."""
    if n is None:
        return "n/a"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{int(n):,} B"


def _table(title: str, lines: list[str]):
    from rich.table import Table

    t = Table(title=title, show_header=False, box=None, title_justify="left", pad_edge=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    for line in lines:
        key, _, val = line.partition(": ")
        t.add_row(key, val)
    return t


def process_memory() -> tuple[int | None, int | None]:
    """(current RSS, peak RSS) of this process in bytes, from /proc and getrusage; None where unknown."""
    rss = peak = None
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except (ImportError, OSError):
        pass
    return rss, peak


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ------------------------------------------------------------------------------ stop strings and text


class _RowText:
    """Incremental text of one row: streaming decode plus stop strings, holding back what may start one."""

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...]) -> None:
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.stop = stop
        self.pending = ""  # decoded but not emitted: could be the start of a stop string
        self.text = ""  # emitted so far

    def feed(self, token: int) -> tuple[str, bool]:
        """(text to emit, whether a stop string was completed)."""
        return self._emit(self.decoder.feed(token) if self.decoder is not None else "")

    def finish(self) -> str:
        """The rest (an unfinished character, held text) at the end of the row."""
        piece, stopped = self._emit(self.decoder.flush() if self.decoder is not None else "")
        if not stopped:
            piece, self.pending = piece + self.pending, ""
            self.text += self.pending
        return piece

    def _emit(self, piece: str) -> tuple[str, bool]:
        if not self.stop:
            self.text += piece
            return piece, False
        buf = self.pending + piece
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = buf[:min(hits)], ""
            self.text += out
            return out, True
        hold = max((k for s in self.stop for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])),
                   default=0)
        out, self.pending = buf[:len(buf) - hold], buf[len(buf) - hold:]
        self.text += out
        return out, False


# ----------------------------------------------------------------------- GPU-only static decode path


class StaticKVCache(KVCache):
    """GPU-only: the `kv` cache with static shapes for CUDA-graph capture of the decode step.

    `static = True` (set by the engine around decode steps) switches to: K/V written with a device-side
    scatter at each row's length, full-length K/V returned with a length mask, lengths advanced in
    place, and no host syncs. Prefill uses the ordinary (dynamic) KVCache code. The engine checks
    capacity on the host before every step, since the static path cannot.
    """

    static = False

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
        k, v = self.model.layers[layer].self_attn.project_kv(x)  # (B, n_kv, 1, hd)
        k = self.model.rope.apply(k, self._positions, self.max_len)
        idx = self._positions.clamp(max=self.max_len - 1)[:, None, :, None].expand_as(k)
        self.k[layer].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]


class _StaticRope:
    """GPU-only: the model's RoPE with tables precomputed for the whole context (no `positions.max()` sync)."""

    def __init__(self, rope, n: int) -> None:
        rope._ensure(n)
        self.inv_freq, self._cos, self._sin = rope.inv_freq, rope._cos, rope._sin

    def apply(self, x: torch.Tensor, positions: torch.Tensor, bound: int | None = None) -> torch.Tensor:
        from xqcli.rope import rotate_half

        cos = self._cos[positions].unsqueeze(1).to(x.dtype)
        sin = self._sin[positions].unsqueeze(1).to(x.dtype)
        return x * cos + rotate_half(x) * sin


class _GraphedDecode:
    """GPU-only: one (B, 1) decode step over a StaticKVCache, warmed up eagerly then captured and replayed.

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
        self.rope = _StaticRope(model.rope, cache.max_len)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.warm = 0

    def _step(self) -> torch.Tensor:
        # Static cache and sync-free RoPE only while this step runs (or is captured): replays need no Python.
        self.cache.static, saved, self.model._rope = True, self.model._rope, self.rope
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


# --------------------------------------------------------------------------------------------- engine


class Engine:
    """A model, its tokenizer and a preallocated cache of any kind, with generation and conversation state.

    Args:
        model: a loaded `Transformer` (moved to `device` if one is given).
        tokenizer: needed for text pieces, stop strings and `chat_turn`; None for token ids only.
        cache: a `CacheSpec` or a kind name (`kv`, `kivi-4`, `xquant-4`, `xquant-cl-3`, ...).
        context: tokens per row the cache holds (default: min(model max, 4096)).
        batch: rows of the cache (`generate_batch` takes up to this many prompts).
        prefill_chunk: prompt tokens per forward pass during prefill.
        cuda_graph: GPU only, `kv` only: capture the decode step in a CUDA graph (else ignored; see
            `decode_mode`).
        budget: bytes the cache may hold in total, for `MemoryReport.tokens_left` (default: what it holds
            now plus the free device memory, or MemAvailable on CPU).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, cache: CacheSpec | str = "kv",
                 *, context: int | None = None, device: str | torch.device | None = None, batch: int = 1,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, cuda_graph: bool = False,
                 sampling: SamplingParams | None = None, budget: int | None = None) -> None:
        if device is not None and torch.device(device) != model.device:
            model = model.to(torch.device(device))
        self.model, self.tokenizer = model, tokenizer
        self.spec = CacheSpec.parse(cache) if isinstance(cache, str) else cache
        cfg = model.config
        self.context = int(context) if context is not None else min(cfg.max_position_embeddings, DEFAULT_CONTEXT)
        if self.context < 2:
            raise InputError(f"context must be at least 2 tokens (got {self.context})")
        if batch < 1:
            raise InputError(f"batch must be >= 1 (got {batch})")
        if prefill_chunk < 1:
            raise InputError(f"prefill chunk must be >= 1 (got {prefill_chunk})")
        self.batch, self.prefill_chunk, self.budget = batch, prefill_chunk, budget
        self.sampling = (sampling or SamplingParams()).check()
        self.device = model.device
        graph = cuda_graph and self.device.type == "cuda" and self.spec.method == "kv"
        self.decode_mode = "cuda-graph" if graph else "eager"
        try:
            with torch.inference_mode():
                self.cache: ModelCache = (StaticKVCache(model, batch, self.context) if graph
                                          else make_cache(model, self.spec, batch, self.context))
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError and the CPU allocator error are RuntimeErrors
            if "memory" not in str(e).lower():
                raise
            raise ResourceError(f"cannot allocate a {self.spec.name} cache for {batch} x {self.context:,} tokens: "
                                f"{str(e).splitlines()[0]}", hint="lower --context") from None
        if self.spec.method in ("xquant", "xquant-cl") and uses_latents(model.config):
            model_projections(model)  # SVDs now, not inside the first timed prefill
        self._graph: _GraphedDecode | None = None
        if graph:
            self._graph = _GraphedDecode(model, self.cache)
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()
        self.ids: list[list[int]] = [[] for _ in range(batch)]  # token ids held by each cache row
        self.stats = GenerationStats()
        self._stop = False
        self._per_token: tuple[float, float] | None = None

    # --- conversation / cache state --------------------------------------------------------------
    @torch.inference_mode()
    def reset(self) -> None:
        """Forget every cached token."""
        self.cache.reset()
        self.ids = [[] for _ in range(self.batch)]

    def request_stop(self) -> None:
        """Ask a running generation to end after the current step (safe from a signal handler)."""
        self._stop = True

    # --- public generation API -------------------------------------------------------------------
    def generate(self, prompt: Sequence[int], sampling: SamplingParams | None = None, **overrides: Any
                 ) -> Iterator[Step]:
        """Steps of one completion of `prompt` (token ids), from an empty cache."""
        yield from self.generate_batch([prompt], sampling, **overrides)

    def generate_batch(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None,
                       **overrides: Any) -> Iterator[Step]:
        """Steps of several completions at once (rows right-padded, each with its own length).

        Rows finish independently; a finished row stops growing its cache. Steps of one decode step
        come row by row.
        """
        if not prompts or len(prompts) > self.batch:
            raise InputError(f"generate_batch takes 1 to {self.batch} prompts (the engine's batch), got {len(prompts)}")
        if any(len(p) == 0 for p in prompts):
            raise InputError("a prompt is empty", hint="pass some text")
        self.reset()
        yield from self._run([list(p) for p in prompts], self._params(sampling, overrides), reused=0)

    def chat_turn(self, messages: list[dict[str, Any]], sampling: SamplingParams | None = None,
                  **overrides: Any) -> Iterator[Step]:
        """Steps of the assistant's answer to `messages`, reusing the cache across turns (row 0).

        The whole conversation is rendered with the chat template; when the ids already in the cache
        are a prefix of it, only the rest is prefilled. Otherwise (an edited history, a re-tokenized
        answer that differs from the sampled ids, a new system prompt) the cache is reset and the
        whole conversation is prefilled.
        """
        if self.tokenizer is None:
            raise InputError("chat needs a tokenizer")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        held = self.ids[0]
        if len(ids) > len(held) and ids[:len(held)] == held:
            new, reused = ids[len(held):], len(held)
        else:
            self.reset()
            new, reused = ids, 0
        yield from self._run([new], self._params(sampling, overrides), reused=reused)

    def logits(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Next-token logits (rows, vocab) in fp32 after prefilling `prompts` from an empty cache."""
        if not prompts or len(prompts) > self.batch or any(len(p) == 0 for p in prompts):
            raise InputError(f"logits takes 1 to {self.batch} non-empty prompts")
        self.reset()
        self._stop = False
        return self._prefill([list(p) for p in prompts])[:len(prompts)]

    def _params(self, sampling: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
        params = (sampling or self.sampling).with_(**overrides) if overrides else (sampling or self.sampling).check()
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer")
        return params

    # --- the loop ----------------------------------------------------------------------------------
    def _run(self, prompts: list[list[int]], params: SamplingParams, reused: int) -> Iterator[Step]:
        """Prefill `prompts` (appended to what each row holds) and decode until every row has finished."""
        n = len(prompts)
        for r, p in enumerate(prompts):
            if len(self.ids[r]) + len(p) >= self.context:
                raise ResourceError(f"the prompt needs {len(self.ids[r]) + len(p):,} tokens of context and leaves "
                                    f"no room to answer: the context is {self.context:,}",
                                    hint="raise --context, or /reset the conversation")
        stats = self.stats = GenerationStats(rows=n, prompt_tokens=sum(map(len, prompts)), reused_tokens=reused,
                                             finish=[""] * n)
        self._stop = False
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        texts = [_RowText(self.tokenizer, params.stop) for _ in range(n)]
        eos = set(self.tokenizer.eos_ids) if self.tokenizer is not None else set()
        t0 = time.perf_counter()
        try:
            logits = self._prefill(prompts)
        except BaseException:
            self._invalidate()
            raise
        if logits is None:  # interrupted between prefill chunks; the cache holds what was prefilled
            stats.prefill_s = time.perf_counter() - t0
            stats.finish = ["interrupted"] * n
            return
        seen = self._seen(params)
        tok = self._sample(logits, params, seen)
        active = list(range(n))
        counts, last_t = [0] * n, [t0] * n
        n_host = [1] * n + [0] * (self.batch - n)  # new tokens per row in a decode step
        n_new = torch.tensor(n_host, device=self.device)
        t_first = None
        while True:
            host = tok.tolist()  # the one host sync per step: ids for streaming and stop checks
            now = time.perf_counter()
            if t_first is None:
                t_first = now
                stats.prefill_s = now - t0
            stats.decode_s = now - t_first
            stop_asked = self._stop
            steps = []
            for r in active:
                token = host[r]
                counts[r] += 1
                stats.generated_tokens += 1
                finish = None
                if token in eos:
                    text, finish = texts[r].finish(), "eos"
                else:
                    text, stopped = texts[r].feed(token)
                    if stopped:
                        finish = "stop"
                    elif counts[r] >= params.max_tokens:
                        finish = "max_tokens"
                    elif len(self.ids[r]) >= self.context:  # no room to feed this token back
                        finish = "context"
                    elif stop_asked:
                        finish = "interrupted"
                    if finish not in (None, "stop"):
                        text += texts[r].finish()
                if finish:
                    stats.finish[r] = finish
                steps.append(Step(r, counts[r] - 1, token, text, now - t0, now - last_t[r], finish))
                last_t[r] = now
            still = [s.row for s in steps if s.finish is None]
            if len(still) != len(active):  # only when the active set changes
                n_host = [int(r in still) for r in range(self.batch)]
                n_new = torch.tensor(n_host, device=self.device)
            active = still
            yield from steps
            if not active:
                return
            try:
                logits = self._decode(tok, n_new, n_host)
            except BaseException:
                self._invalidate()
                raise
            for r in active:
                self.ids[r].append(host[r])
            tok = self._sample(logits, params, seen)

    def _invalidate(self) -> None:
        """A forward pass did not complete (error, Ctrl-C): the cache may be half-written, so drop it."""
        self.reset()

    @torch.inference_mode()
    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor | None:
        """Push each row's new tokens through the model in chunks; logits (B, V) after each row's last one."""
        model, dev, chunk = self.model, self.device, self.prefill_chunk
        lens = [len(p) for p in prompts] + [0] * (self.batch - len(prompts))
        last = None
        for start in range(0, max(lens), chunk):
            n = [max(0, min(chunk, ln - start)) for ln in lens]
            width = max(n)
            rows = [p[start:start + c] + [0] * (width - c) for p, c in zip(prompts + [[]] * self.batch, n)]
            h = model.hidden_states(torch.tensor(rows, device=dev), self.cache, n)
            for r in range(len(prompts)):
                self.ids[r].extend(prompts[r][start:start + n[r]])
            ends = [r for r in range(len(prompts)) if n[r] and start + n[r] == lens[r]]
            if ends:
                hl = h[torch.tensor(ends, device=dev), torch.tensor([n[r] - 1 for r in ends], device=dev)]
                lg = F.linear(hl, model.output_weight()).float()  # only the rows' last positions
                if last is None:
                    last = torch.zeros(self.batch, lg.shape[-1], device=dev)
                last[ends] = lg
            if self._stop and start + chunk < max(lens):
                return None
        return last

    @torch.inference_mode()
    def _decode(self, tok: torch.Tensor, n_new: torch.Tensor, n_host: list[int]) -> torch.Tensor:
        tokens = tok[:, None]
        if self._graph is not None:
            return self._graph(tokens, n_new)
        return self.model(tokens, self.cache, n_host)[:, -1]  # host counts: nothing read back

    @torch.inference_mode()
    def _seen(self, params: SamplingParams) -> torch.Tensor | None:
        """(B, V) bool: tokens already in each row's context, for the repetition penalty."""
        if params.repeat_penalty == 1.0:
            return None
        seen = torch.zeros(self.batch, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
        for r, ids in enumerate(self.ids):
            if ids:
                seen[r, torch.tensor(ids, device=self.device)] = True
        return seen

    @torch.inference_mode()
    def _sample(self, logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
        tok = sample(logits, params, self.generator, seen)
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        return tok

    # --- readouts ----------------------------------------------------------------------------------
    def per_token_bytes(self) -> tuple[float, float]:
        """(payload+scales, workspace) bytes per token past the window, measured like `xq plan`."""
        if self._per_token is None:
            from xqcli.readouts.plan import measured_bytes_per_token

            bpt, _, ws = measured_bytes_per_token(self.model, self.spec)
            self._per_token = (bpt, ws)
        return self._per_token

    def memory(self) -> MemoryReport:
        cfg = self.model.config
        held = int(self.cache.lengths.sum())
        kv_tok = cfg.num_hidden_layers * 2 * cfg.kv_dim * 2
        bpt, ws = self.per_token_bytes()
        nb = self.cache.nbytes()
        rep = MemoryReport(self.spec.name, held, self.batch * self.context, nb, held * kv_tok, bpt, kv_tok, ws,
                           str(self.device))
        if self.device.type == "cuda":
            rep.allocated = torch.cuda.memory_allocated(self.device)
            rep.reserved = torch.cuda.memory_reserved(self.device)
            rep.peak = torch.cuda.max_memory_allocated(self.device)
            free, source = torch.cuda.mem_get_info(self.device)[0], "free device memory"
        else:
            rep.rss, rep.peak = process_memory()
            free, source = available_ram(), "available RAM"
        if self.budget is not None:
            rep.budget, rep.budget_source = self.budget, "--budget"
        elif free is not None:
            rep.budget, rep.budget_source = nb.total + free, f"held + {source}"
        if rep.budget is not None:
            rep.tokens_left = max(0, int((rep.budget - nb.total) // max(bpt + ws, 1e-9)))
        return rep


def collect(steps: Iterator[Step]) -> dict[int, dict[str, Any]]:
    """Drain a step stream into {row: {"tokens", "text", "finish"}} (tests, scripts, `xq generate --json`)."""
    out: dict[int, dict[str, Any]] = {}
    for s in steps:
        row = out.setdefault(s.row, {"tokens": [], "text": "", "finish": None})
        row["tokens"].append(s.token)
        row["text"] += s.text
        row["finish"] = s.finish or row["finish"]
    return out


# ----------------------------------------------------------------------------------- session files

SESSION_FORMAT = "xq-session"
SESSION_SCHEMA = 1


def model_identity(model: Transformer, source: str, spec: CacheSpec | None = None) -> dict[str, str]:
    """What a saved cache depends on: the config, a hash of a few weight tensors, the dtype, and for
    latent caches the SVD projections in use (a bundle's stored ones or the ones computed at load)."""
    cfg = model.config
    conf = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    h = hashlib.sha256()
    layers = model.layers
    picks = [model.model.embed_tokens.weight[:8], model.model.norm.weight, layers[0].self_attn.k_proj.weight[:8],
             layers[-1].self_attn.v_proj.weight[:8], layers[-1].mlp.down_proj.weight[:8], model.output_weight()[-8:]]
    for t in picks:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    ident = {"source": source, "config_sha256": hashlib.sha256(conf.encode()).hexdigest(),
             "weights_sha256": h.hexdigest(), "dtype": str(model.dtype).removeprefix("torch.")}
    if spec is not None and spec.method in ("xquant", "xquant-cl") and uses_latents(cfg):
        from xqcli.bundle.projections import model_projections

        p = model_projections(model)[0]  # the factors the caches use (already cast and cached on the model)
        ph = hashlib.sha256()
        for t in (p.k.u[:8], p.v.u[:8], p.kv.u[:8]):
            ph.update(t.detach().double().cpu().contiguous().numpy().tobytes())
        ident["projections_sha256"] = ph.hexdigest()
    if spec is not None and spec.rotate:  # +rot: which rotation the stored codes were taken in
        ident["rotation"] = repr(getattr(model, "_xq_rotation", ("hadamard", 0)))
    return ident


def save_session(path: str | Path, engine: Engine, messages: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """Write the conversation and its cache (row 0) to a safetensors file; returns the metadata written."""
    from safetensors.torch import save_file

    from xqcli import __version__

    path = Path(path)
    state = engine.cache.state_dict()
    tensors = {f"cache.{k}": v.detach().contiguous().cpu() for k, v in state["tensors"].items()}
    tensors["ids"] = torch.tensor(engine.ids[0], dtype=torch.long)
    meta = {"xq_version": __version__, "model": model_identity(engine.model, source, engine.spec),
            "cache": state["meta"], "messages": messages, "ids": engine.ids[0]}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": SESSION_FORMAT, "schema": str(SESSION_SCHEMA),
                                               "session": json.dumps(meta)})
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write the session file {path}: {e}") from None
    return meta


def load_session(path: str | Path, engine: Engine, source: str) -> dict[str, Any]:
    """Read a session file into `engine` (cache row 0 and its ids); returns its metadata (with `messages`).

    Refuses, naming what differs, a file from another model (config, weights, dtype, projections) or
    cache kind/settings; the engine is left untouched then.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path} is not a session file: {e}") from None
    if header.get("format") != SESSION_FORMAT:
        raise InputError(f"{path} is not an xq session file (format {header.get('format')!r})")
    if header.get("schema") != str(SESSION_SCHEMA):
        raise InputError(f"{path} has session schema {header.get('schema')}, this xq reads {SESSION_SCHEMA}",
                         hint="load it with the xq version that wrote it")
    try:
        meta = json.loads(header["session"])
        saved_model, cache_meta, ids = meta["model"], meta["cache"], [int(i) for i in meta["ids"]]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: corrupt session metadata ({e})") from None
    here = model_identity(engine.model, source, engine.spec)
    labels = {"config_sha256": "model config", "weights_sha256": "model weights", "dtype": "dtype",
              "projections_sha256": "SVD projections", "rotation": "rotation"}
    diff = [f"{labels[k]} ({saved_model.get(k, 'none')[:12]} saved, {here.get(k, 'none')[:12]} here)"
            for k in labels if saved_model.get(k) != here.get(k)]
    if diff:
        raise InputError(f"{path} was saved with another model ({saved_model.get('source')}): "
                         f"{'; '.join(diff)} differ", hint="load it with the model it was saved with")
    saved_spec, mine = cache_meta.get("spec", {}), engine.cache.spec_settings()
    sdiff = [f"{k} {saved_spec.get(k)!r} saved vs {mine.get(k)!r} here" for k in sorted(set(saved_spec) | set(mine))
             if saved_spec.get(k) != mine.get(k)]
    if sdiff:
        raise InputError(f"{path} holds a {saved_spec.get('name')} cache, this session uses {mine.get('name')}: "
                         f"{'; '.join(sdiff)}", hint="start xq chat with the cache settings it was saved with")
    if not torch.equal(tensors.get("ids", torch.empty(0)), torch.tensor(ids, dtype=torch.long)):
        raise InputError(f"{path}: the token ids in the metadata and the tensors disagree (file edited?)")
    cache_tensors = {k.removeprefix("cache."): v for k, v in tensors.items() if k.startswith("cache.")}
    if len(cache_meta.get("lengths", [])) != 1 or cache_meta["lengths"][0] != len(ids):
        raise InputError(f"{path}: the cache holds {cache_meta.get('lengths')} tokens but {len(ids)} ids are saved")
    with torch.inference_mode():
        engine.reset()
        try:
            engine.cache.load_state_dict({"meta": cache_meta, "tensors": cache_tensors})
        except BaseException:
            engine.reset()
            raise
    engine.ids[0] = ids
    return meta
