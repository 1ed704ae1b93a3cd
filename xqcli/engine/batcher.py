"""Continuous batching over one `Engine`'s rows: the scheduler behind `xq serve`.

The engine's cache has a fixed set of rows (on CUDA, the rows its captured decode step replays). A
request is admitted into a free row between steps; every step is one forward in which each active row
brings what it needs: one token (decoding), a chunk of its prompt (prefilling), or nothing (free, idle or
waiting rows are masked by `n_new = 0`, never reshaped). A row that finishes or is cancelled is given
back before the next step.

Rows hold no state outside the cache's lengths (streams keep no per-row counters, `xqcli.cache.stream`;
the XQuant-CL accumulator is rebuilt from the base layer every step), so freeing a row is setting its
length to 0 (`Engine.free_row`), and a row that keeps its tokens after its request is a conversation
that the next request extending it continues without prefilling it again (prefix reuse, as
llama-server's prompt cache). Idle conversations are evicted least recently used when a row or memory
is needed.

Admission is by memory: `--budget` bytes, and the bytes a row of n tokens holds for this cache kind
(`RowBytes`: the same meta-device sizes `xq plan` reads), decide how many tokens may be held. A request
reserves its prompt plus its `max_tokens` when it is admitted; an idle conversation holds its tokens.

Threads: `submit` and `cancel` may be called from any thread (they only queue); `step` and `run` belong
to one engine thread. Each request's events go to its `emit` callback, called on the engine thread.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.spec import CacheSpec, kv_bytes_per_token
from xqcli.engine.sampling import SamplingParams, sample
from xqcli.engine.text import RowText
from xqcli.errors import InputError, ResourceError, XQError
from xqcli.load import make_cache, measured_bytes_per_token
from xqcli.units import format_bytes

if TYPE_CHECKING:
    from xqcli.engine.loop import Engine
    from xqcli.model import Transformer

# Prompt tokens a prefilling row brings to a step while other rows decode: the step is as wide as its
# widest row for every row, so a long chunk would stall the running streams (and pad them).
MIXED_CHUNK = 64
RATE_WINDOW_S = 5.0  # decode tokens/s is measured over this many seconds


@dataclass
class Event:
    """What a request hears from the engine thread: a piece of text, its end, or its failure."""

    kind: str  # "token" | "done" | "error"
    text: str = ""
    token: int | None = None
    finish: str | None = None  # on "done": eos | stop | max_tokens | context | cancelled
    prompt_tokens: int = 0  # on "done": the whole prompt, reused prefix included
    reused_tokens: int = 0  # on "done": prompt tokens found in the cache (not prefilled again)
    generated_tokens: int = 0
    error: XQError | None = None  # on "error"


@dataclass
class Request:
    """One completion: the prompt's token ids (a rendered conversation or a plain prompt) and its sampling."""

    ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False

    @property
    def reserve(self) -> int:
        """Tokens its row may hold at most: the prompt, then every generated token but the last (never fed)."""
        return len(self.ids) + self.params.max_tokens - 1


@dataclass
class Row:
    """One cache row: free, held by an idle conversation (`req` None, `ids` kept), or serving `req`."""

    index: int
    req: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    next_token: int | None = None  # sampled, fed at the next step
    generated: int = 0
    reused: int = 0
    text: RowText | None = None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # (1, V) for the repetition penalty
    last_used: float = 0.0


class RowBytes:
    """Bytes one row holds for a cache kind (payload, scales, full-precision window, workspace), from a
    one-row cache on the meta device: the storage code itself sizes it, nothing is allocated.

    `row_bytes(n)` is the most a row holds on its way to n tokens, not the bytes of n tokens alone: a
    per-channel stream keeps a growing full-precision tail until a whole group seals, so n tokens can take
    fewer bytes than n - 1 (SmolLM2 xquant-4, window 128: 512 tokens hold less than 511). A row reserved
    for n tokens must fit at every length before n, and admission needs sizes that only grow."""

    def __init__(self, model: Transformer, spec: CacheSpec, context: int, artifacts: Artifacts | None = None) -> None:
        self._meta = make_cache(model, spec, 1, context, artifacts=artifacts, device=torch.device("meta"))
        self._workspace = measured_bytes_per_token(model, spec, artifacts=artifacts)[2]
        # Between two seals a row's bytes only grow, and each seal point is higher than the one before (the
        # sealed group costs less than it did in full precision, but more than nothing), so the peak up to n
        # is among the last group_size + 1 lengths.
        self._period = spec.group_size
        self.context = context
        self._sizes: dict[int, int] = {}  # n -> bytes of n tokens; the scheduler asks for the same few lengths
        self._peaks: dict[int, int] = {}
        self._lock = threading.Lock()  # the request threads check sizes too

    def __call__(self, n: int) -> int:
        with self._lock:
            if n not in self._peaks:
                self._peaks[n] = max(self._held(m) for m in range(max(0, n - self._period), n + 1))
            return self._peaks[n]

    def _held(self, n: int) -> int:
        """Bytes a row of exactly n tokens holds."""
        if n not in self._sizes:
            self._meta.set_lengths(torch.full((1,), n, device=self._meta.device), [n])
            b = self._meta.nbytes()
            self._sizes[n] = b.payload + b.scales + b.fp_window + int(self._workspace * n)
        return self._sizes[n]

    def tokens_within(self, budget: int) -> int:
        """Tokens `budget` bytes hold in rows of the full context (the rest as one shorter row)."""
        full, rest = divmod(budget, self(self.context))
        lo, hi = 0, self.context
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self(mid) <= rest else (lo, mid - 1)
        return int(full) * self.context + lo


class Batcher:
    """Continuous batching of requests over an engine's rows, with memory admission and prefix reuse.

    Args:
        engine: the model and its cache; its `batch` rows are the batch.
        budget: bytes the rows may hold in total (default: what the allocated cache holds).
        max_queue: requests waiting for a row beyond which `submit` refuses (QueueFull).
    """

    def __init__(self, engine: Engine, *, budget: int | None = None, max_queue: int = 64) -> None:
        self.engine = engine
        self.rows = [Row(i) for i in range(engine.batch)]
        self.row_bytes = RowBytes(engine.model, engine.spec, engine.context, engine.artifacts)
        self.budget = budget if budget is not None else self.row_bytes(engine.context) * engine.batch
        self.max_queue = max_queue
        self.allocated = engine.cache.allocated().total
        self.waiting: deque[Request] = deque()
        self._inbox: queue.SimpleQueue[tuple[str, Request]] = queue.SimpleQueue()
        self._queued = 0  # submitted, not yet in a row (inbox + waiting), under _lock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.totals = {"prompt_tokens": 0, "reused_tokens": 0, "generated_tokens": 0, "steps": 0}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens decoded) per step, for the rate
        self.last_logits: torch.Tensor | None = None  # the latest step's logits (k rows, V), rows = last_rows
        self.last_rows: list[int] = []
        self.snapshot = self._snapshot()

    # --- any thread --------------------------------------------------------------------------------
    def check(self, ids: Sequence[int], params: SamplingParams) -> None:
        """Refuse a request that can never run here: beyond the context, or more memory than the budget
        (PromptTooLong when the prompt alone is, whatever max_tokens says)."""
        ctx = self.engine.context
        if not ids:
            raise InputError("the prompt is empty")
        if len(ids) >= ctx:
            raise PromptTooLong(f"the prompt has {len(ids):,} tokens: with one generated token, more than the "
                                f"context of {ctx:,}", hint="shorten the prompt")
        if self.row_bytes(len(ids)) > self.budget:
            raise PromptTooLong(f"the prompt alone needs {format_bytes(self.row_bytes(len(ids)))} of "
                                f"{self.engine.spec.name} cache, more than the budget of {format_bytes(self.budget)}",
                                hint="shorten the prompt")
        if len(ids) + params.max_tokens > ctx:
            raise ResourceError(f"the prompt has {len(ids):,} tokens and max_tokens is {params.max_tokens:,}: "
                                f"{len(ids) + params.max_tokens:,} tokens, more than the context of {ctx:,}",
                                hint="shorten the prompt or lower max_tokens")
        need = self.row_bytes(len(ids) + params.max_tokens - 1)
        if need > self.budget:
            raise ResourceError(f"the prompt and max_tokens need {format_bytes(need)} of {self.engine.spec.name} "
                                f"cache, more than the budget of {format_bytes(self.budget)}",
                                hint="shorten the prompt or lower max_tokens")

    def max_new_tokens(self, prompt: int) -> int:
        """The most tokens a request with a `prompt`-token prompt may generate: up to the end of the context, or
        as many as the budget holds for its row, whichever is less (below 1: the prompt alone does not fit)."""
        fits = min(self.engine.context, self.row_bytes.tokens_within(self.budget))  # a row's tokens
        return min(self.engine.context - prompt, fits - prompt + 1)  # the last token is never fed

    def submit(self, req: Request) -> None:
        """Queue a request for the engine thread; QueueFull when `max_queue` requests already wait."""
        self.check(req.ids, req.params)
        with self._lock:
            if self._stopping.is_set():
                raise ShuttingDown("the server is shutting down")
            if self._queued >= self.max_queue:
                raise QueueFull(f"{self._queued} request{'s are' if self._queued != 1 else ' is'} already waiting "
                                "for a row")
            self._queued += 1
        self._inbox.put(("submit", req))

    def cancel(self, req: Request) -> None:
        """Drop a request (its client went away): its row is freed before the next step."""
        req.cancelled = True
        self._inbox.put(("cancel", req))

    def queued(self) -> int:
        with self._lock:
            return self._queued

    # --- the engine thread -------------------------------------------------------------------------
    def run(self, idle_wait: float = 0.05) -> None:
        """Step until `stop`; a step that fails fails the requests in it and leaves the rows empty."""
        while not self._stopping.is_set():
            try:
                worked = self.step()
            except Exception as e:  # noqa: BLE001 - the server must outlive one bad step
                self._fail_all(e)
                worked = False
            if not worked:  # nothing to run (or nothing that fits yet): wait for a request or a cancel
                self._drain(block=True, timeout=idle_wait)
        self._drain(block=False)
        for r in self.rows:
            if r.req is not None:
                self._end(r, "cancelled")
        while self.waiting:
            self._reject(self.waiting.popleft(), ShuttingDown("the server shut down before this request ran"))

    def stop(self) -> None:
        """Ask `run` to return: in-flight requests end as cancelled, waiting ones with an error."""
        with self._lock:
            self._stopping.set()
        self._inbox.put(("wake", None))  # type: ignore[arg-type]

    def step(self) -> bool:
        """Admit what fits, run one forward over every active row, hand out tokens; False when idle."""
        self._drain(block=False)
        self._admit()
        plan = self._plan()
        if not any(plan):
            self.snapshot = self._snapshot()
            return False
        logits = self.engine.step_rows(plan)
        fed = [r for r in self.rows if plan[r.index]]
        self.last_logits, self.last_rows = logits, [r.index for r in fed]
        decoded = 0
        for k, row in enumerate(fed):
            row.next_token = None
            if row.pending:  # still prefilling
                continue
            self._sample(row, logits[k:k + 1])
            decoded += 1
        now = time.perf_counter()
        self.totals["steps"] += 1
        self.totals["generated_tokens"] += decoded
        self._recent.append((now, decoded))
        self.snapshot = self._snapshot()
        return True

    def _drain(self, *, block: bool, timeout: float = 0.0) -> None:
        try:
            item = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            what, req = item
            if what == "submit":
                self.waiting.append(req)
            elif what == "cancel":
                self._cancel(req)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _cancel(self, req: Request) -> None:
        for r in self.rows:
            if r.req is req:
                self._end(r, "cancelled")
                return
        if req in self.waiting:
            self.waiting.remove(req)
            with self._lock:
                self._queued -= 1

    # --- admission ---------------------------------------------------------------------------------
    def held_bytes(self) -> int:
        """Bytes the rows hold or have reserved: an active row its prompt plus max_tokens, an idle one its tokens."""
        return sum(self.row_bytes(r.req.reserve if r.req is not None else len(self.engine.ids[r.index]))
                   for r in self.rows)

    def _admit(self) -> None:
        """First come, first served: the head of the queue waits until a row and the memory are there."""
        while self.waiting:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                with self._lock:
                    self._queued -= 1
                continue
            row = self._place(req)
            if row is None:
                return
            self.waiting.popleft()
            with self._lock:
                self._queued -= 1
            self._start(row, req)

    def _place(self, req: Request) -> Row | None:
        """The row for `req`: an idle conversation it extends (longest first), else a free row, else the least
        recently used idle one; idle conversations are evicted while the budget is short. None: wait."""
        ids = self.engine.ids
        idle = [r for r in self.rows if r.req is None]
        if not idle:
            return None
        extends = [r for r in idle if 0 < len(ids[r.index]) < len(req.ids) and req.ids[:len(ids[r.index])] ==
                   ids[r.index]]
        free = [r for r in idle if not ids[r.index]]
        row = (max(extends, key=lambda r: len(ids[r.index])) if extends else free[0] if free
               else min(idle, key=lambda r: r.last_used))
        # The row's old tokens (kept when extended) become part of the request's reservation.
        held = self.held_bytes() - self.row_bytes(len(ids[row.index])) + self.row_bytes(req.reserve)
        victims = []
        for v in sorted((r for r in idle if r is not row and ids[r.index]), key=lambda r: r.last_used):
            if held <= self.budget:
                break
            victims.append(v)
            held -= self.row_bytes(len(ids[v.index]))
        if held > self.budget:
            return None
        for v in victims + ([] if row in extends else [row]):
            if ids[v.index]:
                self.engine.free_row(v.index)
        return row

    def _start(self, row: Row, req: Request) -> None:
        eng = self.engine
        held = len(eng.ids[row.index])
        row.req, row.pending, row.next_token = req, list(req.ids[held:]), None
        row.generated, row.reused = 0, held
        row.text = RowText(eng.tokenizer, req.params.stop)
        row.generator = torch.Generator(device=eng.device)
        if req.params.seed is not None:
            row.generator.manual_seed(req.params.seed)
        else:
            row.generator.manual_seed(int(torch.randint(2**62, (1,), generator=eng.generator, device=eng.device)))
        row.seen = None
        if req.params.repeat_penalty != 1.0:
            row.seen = torch.zeros(1, eng.model.config.vocab_size, dtype=torch.bool, device=eng.device)
            row.seen[0, torch.tensor(req.ids, device=eng.device)] = True
        self.totals["prompt_tokens"] += len(req.ids)
        self.totals["reused_tokens"] += held

    # --- one step ----------------------------------------------------------------------------------
    def _plan(self) -> list[list[int]]:
        """Each row's tokens for this step: its sampled token, a chunk of its prompt, or none."""
        decoding = any(r.next_token is not None for r in self.rows)
        chunk = min(MIXED_CHUNK, self.engine.prefill_chunk) if decoding else self.engine.prefill_chunk
        plan: list[list[int]] = []
        for r in self.rows:
            if r.req is None:
                plan.append([])
            elif r.next_token is not None:
                plan.append([r.next_token])
            else:
                plan.append(r.pending[:chunk])
                del r.pending[:chunk]
        return plan

    @torch.inference_mode()
    def _sample(self, row: Row, logits: torch.Tensor) -> None:
        req = row.req
        assert req is not None and row.text is not None
        p = req.params
        token = int(sample(logits, p, row.generator, row.seen)[0])
        if row.seen is not None:
            row.seen[0, token] = True
        row.generated += 1
        eos = self.engine.tokenizer.eos_ids if self.engine.tokenizer is not None else ()
        finish = None
        if token in eos:
            text, finish = row.text.finish(), "eos"
        else:
            text, stopped = row.text.feed(token)
            if stopped:
                finish = "stop"
            elif row.generated >= p.max_tokens:
                finish = "max_tokens"
            elif len(self.engine.ids[row.index]) >= self.engine.context:
                finish = "context"
            if finish not in (None, "stop"):
                text += row.text.finish()
        req.emit(Event("token", text=text, token=token))
        if finish is None:
            row.next_token = token
        else:
            self._end(row, finish)

    def _end(self, row: Row, finish: str) -> None:
        """The request of `row` is over: tell it, and keep its tokens as an idle conversation (a cancelled
        one's row is freed: a half-fed answer is no conversation anyone will continue)."""
        req = row.req
        assert req is not None
        if finish == "cancelled":
            self.engine.free_row(row.index)
        req.emit(Event("done", finish=finish, prompt_tokens=len(req.ids), reused_tokens=row.reused,
                       generated_tokens=row.generated))
        row.req, row.pending, row.next_token, row.text, row.generator, row.seen = None, [], None, None, None, None
        row.last_used = time.monotonic()

    def _reject(self, req: Request, error: XQError) -> None:
        with self._lock:
            self._queued -= 1
        req.emit(Event("error", error=error))

    def _fail_all(self, e: Exception) -> None:
        """A forward failed: the cache may be half-written, so every row is emptied and its request told."""
        err = e if isinstance(e, XQError) else XQError(f"internal error: {type(e).__name__}: {e}")
        for r in self.rows:
            req = r.req
            r.req, r.pending, r.next_token = None, [], None
            if req is not None:
                req.emit(Event("error", error=err))
        self.engine.reset()

    # --- readouts ----------------------------------------------------------------------------------
    def decode_rate(self) -> float:
        """Generated tokens per second over the last RATE_WINDOW_S seconds: steps older than that are dropped
        here, when read, so the rate falls to 0 once the server is idle (engine thread)."""
        now = time.perf_counter()
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()
        if len(self._recent) < 2:
            return 0.0
        span = now - self._recent[0][0]  # to now, not to the last step: a pause lowers the rate
        return sum(n for _, n in list(self._recent)[1:]) / span if span > 0 else 0.0

    def _snapshot(self) -> dict[str, float]:
        """The numbers `/metrics` shows, taken on the engine thread after each step (read from any thread)."""
        eng = self.engine
        lengths = [len(ids) for ids in eng.ids]
        nb = eng.cache.nbytes()
        tokens = sum(lengths)
        kv16 = tokens * kv_bytes_per_token(eng.model.config)
        active = sum(r.req is not None for r in self.rows)
        return {
            "active_rows": active, "idle_rows": sum(1 for r, n in zip(self.rows, lengths) if r.req is None and n),
            "rows": len(self.rows), "queue_depth": len(self.waiting),
            "tokens_held": tokens, "cache_bytes_held": nb.total, "cache_bytes_allocated": self.allocated,
            "cache_bytes_reserved": sum(self.row_bytes(r.req.reserve) for r in self.rows if r.req is not None),
            "cache_budget_bytes": self.budget, "budget_tokens": self.budget_tokens(),
            "kv_fp16_bytes_held": kv16, "compression_vs_fp16_kv": kv16 / nb.total if nb.total else 0.0,
            "decode_tokens_per_second": self.decode_rate(),
        } | {f"{k}_total": v for k, v in self.totals.items()}

    def budget_tokens(self) -> int:
        """Tokens the budget holds with this cache kind."""
        return self.row_bytes.tokens_within(self.budget)


class QueueFull(ResourceError):
    """Too many requests are waiting for a row (the server answers 429 with Retry-After)."""


class PromptTooLong(ResourceError):
    """The prompt alone is beyond the context or the budget (the server names `messages` or `prompt`)."""


class ShuttingDown(XQError):
    """The batcher is stopping and takes no more requests (the server answers 503)."""
