"""The decode engine: chunked prefill, one decode step, on-device sampling, stop handling, readouts.

Library first: `Engine.generate`, `generate_batch` and
`chat_turn` are generators of `Step` records. Printing, live panels and JSON are consumers of that
stream; the numbers they show come from the plain dataclasses `GenerationStats` and `MemoryReport`
(`xqcli.engine.stats`), laid out by `xqcli.readouts.stats`.

    engine = Engine(model, tokenizer, cache="xquant-4", context=4096)
    for step in engine.generate(tokenizer.encode("The capital of France is"), max_tokens=16):
        print(step.text, end="")
    print(engine.stats.decode_tok_s, engine.memory().ratio)

Shapes and rules:
- Caches are allocated once, for `batch` rows of `context` tokens, when the engine is built.
- Prompts longer than `prefill_chunk` are prefilled chunk by chunk; a batch is right-padded and each
  row's valid length is passed to the model (`n_new`), so rows of different lengths never mix.
- Sampling (`xqcli.engine.sampling`) runs on the model's device; the only host sync per step is
  reading the sampled ids back for streaming and stop checks (`xqcli.engine.text`).
- On CUDA, decode steps of every cache kind run through one static step (`xqcli.engine.step`) that is
  captured once in a CUDA graph and replayed (`xqcli.engine.graph`; XQ_GRAPH=off or `cuda_graph=False`
  runs it eagerly). CPU keeps the pure-torch reference path; prefill always runs through the model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.base import ModelCache
from xqcli.cache.factory import kernels_setting
from xqcli.cache.spec import CacheSpec, kv_bytes_per_token, uses_latents
from xqcli.engine.fused import DecodeWeights
from xqcli.engine.graph import StepDecoder, graph_setting
from xqcli.engine.sampling import SamplingParams, sample
from xqcli.engine.stats import GenerationStats, MemoryReport
from xqcli.engine.step import DecodeStep, StepUnsupported
from xqcli.engine.text import RowText
from xqcli.errors import InputError, ModelError, ResourceError
from xqcli.load import make_cache, measured_bytes_per_token, model_projections
from xqcli.system import available_memory, process_memory
from xqcli.units import format_bytes

if TYPE_CHECKING:
    from xqcli.model import Transformer
    from xqcli.tokenizer import Tokenizer

DEFAULT_CONTEXT = 4096
DEFAULT_PREFILL_CHUNK = 512
FINISH_REASONS = ("eos", "stop", "max_tokens", "context", "interrupted")
LONG_CONTEXT_HINT = ("pass --allow-long-context to run past the trained positions anyway (RoPE positions the model "
                     "never saw: expect garbage)")


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


class RowSubset:
    """The `StepCache` of a forward over some rows of a cache: the model's layers and the cache's K/V
    work see only `rows` (k of the cache's B, `ModelCache.begin(rows=...)`); the other rows get no
    tokens. What a step costs then follows the rows that have tokens, not the rows allocated."""

    def __init__(self, cache: ModelCache, rows: list[int]) -> None:
        self.cache, self.rows = cache, rows

    def begin(self, n_new: torch.Tensor | list[int], width: int) -> torch.Tensor:
        return self.cache.begin(n_new, width, rows=self.rows)

    def __getattr__(self, name: str) -> Any:  # the rest of the protocol is the cache's own
        return getattr(self.cache, name)


class Engine:
    """A model, its tokenizer and a preallocated cache of any kind, with generation and conversation state.

    Args:
        model: a loaded `Transformer` (moved to `device` if one is given).
        tokenizer: needed for text pieces, stop strings and `chat_turn`; None for token ids only.
        cache: a `CacheSpec` or a kind name (`kv`, `kivi-4`, `xquant-4`, `xquant-cl-3`, ...).
        context: tokens per row the cache holds (default: min(model max, 4096)); beyond the model's trained
            positions (`max_position_embeddings`) only with `allow_long_context`. A full-precision window
            longer than the context is clamped to it (it can never hold more).
        batch: rows of the cache (`generate_batch` takes up to this many prompts).
        prefill_chunk: prompt tokens per forward pass during prefill.
        cuda_graph: on CUDA, capture the decode step (`xqcli.engine.step.DecodeStep`, every cache kind) in a
            CUDA graph once and replay it every step (default; XQ_GRAPH=off also turns it off: the same
            step then runs eagerly). See `decode_mode` and `decode_note`.
        budget: bytes the cache may hold in total: a cache estimated (on the meta device, before anything is
            allocated) to need more is refused, and `MemoryReport.tokens_left` counts against it (default:
            the free device memory, or the available RAM on CPU).
        artifacts: the model's bundle data (`Loaded.artifacts`: projections, calibration, rotation);
            None for a model without a bundle (SVD factors are then computed once, on first need).
        kernels: "auto" (default): on CUDA, decode through `DecodeStep` and its Triton kernels; on CPU the
            pure-torch reference path (XQ_KERNELS=off: the reference path everywhere). "triton": the step
            on any device (the CPU tests, under TRITON_INTERPRET=1). "off": the reference path.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, cache: CacheSpec | str = "kv",
                 *, context: int | None = None, device: str | torch.device | None = None, batch: int = 1,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, cuda_graph: bool = True,
                 sampling: SamplingParams | None = None, budget: int | None = None,
                 artifacts: Artifacts | None = None, allow_long_context: bool = False,
                 kernels: str = "auto") -> None:
        if device is not None and torch.device(device) != model.device:
            model = model.to(torch.device(device))
        self.model, self.tokenizer = model, tokenizer
        self.artifacts = artifacts if artifacts is not None else Artifacts()
        self.spec = CacheSpec.parse(cache) if isinstance(cache, str) else cache
        cfg = model.config
        self.context = int(context) if context is not None else min(cfg.max_position_embeddings, DEFAULT_CONTEXT)
        if self.context < 2:
            raise InputError(f"context must be at least 2 tokens (got {self.context})")
        self.allow_long_context = allow_long_context
        if self.context > cfg.max_position_embeddings and not allow_long_context:
            raise ResourceError(f"a context of {self.context:,} tokens is beyond the {cfg.max_position_embeddings:,} "
                                f"positions the model was trained on", hint=LONG_CONTEXT_HINT)
        if self.spec.window > self.context:  # the full-precision tail never holds more than the context
            self.spec = replace(self.spec, window=self.context)
        if batch < 1:
            raise InputError(f"batch must be >= 1 (got {batch})")
        if prefill_chunk < 1:
            raise InputError(f"prefill chunk must be >= 1 (got {prefill_chunk})")
        self.batch, self.prefill_chunk, self.budget = batch, prefill_chunk, budget
        self.sampling = (sampling or SamplingParams()).check()
        self.device = model.device
        self._refuse_oversized_cache()
        if kernels not in ("auto", "triton", "off"):
            raise InputError(f"kernels={kernels!r}: use auto, triton or off")
        kernels = kernels_setting() if kernels == "auto" else kernels
        use_step = kernels == "triton" or (kernels == "auto" and self.device.type == "cuda")
        try:
            with torch.inference_mode():
                # Before the cache: the model's q/k/v and gate/up weights become views of the concatenations.
                weights = DecodeWeights.build(model, self.spec, self.artifacts) if use_step else None
                self.cache: ModelCache = make_cache(model, self.spec, batch, self.context, artifacts=self.artifacts,
                                                    kernels=kernels)
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError and the CPU allocator error are RuntimeErrors
            if "memory" not in str(e).lower():
                raise
            raise ResourceError(f"cannot allocate a {self.spec.name} cache for {batch} x {self.context:,} tokens: "
                                f"{str(e).splitlines()[0]}", hint="lower --context") from None
        if self.spec.method in ("xquant", "xquant-cl") and uses_latents(cfg):
            model_projections(model, self.artifacts)  # SVDs now, not inside the first timed prefill
        self._graph, self.decode_mode, self.decode_note = None, "eager", None
        if weights is not None:
            self._graph_decoder(weights, kernels, cuda_graph)
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()
        self.ids: list[list[int]] = [[] for _ in range(batch)]  # token ids held by each cache row
        self.stats = GenerationStats()
        self._stop = False
        self._per_token: tuple[float, float] | None = None

    def _graph_decoder(self, weights: DecodeWeights, kernels: str, cuda_graph: bool) -> None:
        """Decode through `DecodeStep`, captured in a CUDA graph on CUDA unless `cuda_graph` is false or
        XQ_GRAPH=off; a cache the step refuses decodes on the reference path (`decode_note` says why)."""
        try:
            step = DecodeStep(self.model, self.cache, weights, backend="triton" if kernels == "triton" else "auto")
        except StepUnsupported as e:
            self.decode_note = f"eager decode: {e}"
            return
        graph = cuda_graph and self.device.type == "cuda" and graph_setting() == "on"
        self._graph = StepDecoder(step, graph=graph)
        self.decode_mode = "cuda-graph" if graph else "eager"

    def _refuse_oversized_cache(self) -> None:
        """Estimate the cache from its spec on the meta device (no memory, no SVD) and refuse it, with the
        numbers, when it exceeds --budget or the free memory: exit 7 instead of the OOM killer."""
        need = make_cache(self.model, self.spec, self.batch, self.context, artifacts=self.artifacts,
                          device=torch.device("meta")).allocated().total
        limit, source = (self.budget, "--budget") if self.budget is not None else free_memory(self.device)
        if limit is not None and need > limit:
            raise ResourceError(f"a {self.spec.name} cache for {self.batch} x {self.context:,} tokens needs "
                                f"{format_bytes(need)}, more than {source} {format_bytes(limit)}",
                                hint="lower --context (or --window), or choose a smaller cache kind")

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
        self._check_ids(prompts)
        self.reset()
        self._stop = False
        return self._prefill([list(p) for p in prompts])[:len(prompts)]

    def _check_ids(self, prompts: Sequence[Sequence[int]]) -> None:
        """Token ids must index the embedding: one beyond it (a tokenizer made for another model) would be an
        IndexError on the CPU and a device-side assert on a GPU."""
        vocab = self.model.config.vocab_size
        bad = next((t for p in prompts for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise ModelError(f"token id {bad} is outside the model's vocabulary of {vocab:,} ids",
                             hint="the tokenizer does not match the model's weights")

    def _params(self, sampling: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
        params = (sampling or self.sampling).with_(**overrides) if overrides else (sampling or self.sampling).check()
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer")
        return params

    # --- the loop ----------------------------------------------------------------------------------
    def _run(self, prompts: list[list[int]], params: SamplingParams, reused: int) -> Iterator[Step]:
        """Prefill `prompts` (appended to what each row holds) and decode until every row has finished."""
        n = len(prompts)
        self._check_ids(prompts)
        trained = self.model.config.max_position_embeddings
        for r, p in enumerate(prompts):
            need = len(self.ids[r]) + len(p)
            if need >= self.context:
                at_limit = self.context >= trained and not self.allow_long_context
                # /reset (chat) only helps when the row holds an earlier conversation
                forget = " (or /reset the conversation)" if self.ids[r] else ""
                raise ResourceError(f"the prompt needs {need:,} tokens of context and leaves no room to answer: the "
                                    f"context is {self.context:,}"
                                    + (f", the model's {trained:,} trained positions" if at_limit else ""),
                                    hint=(f"shorten the prompt{forget}, or {LONG_CONTEXT_HINT}" if at_limit
                                          else f"raise --context above {need:,}, or shorten the prompt{forget}"))
        stats = self.stats = GenerationStats(rows=n, prompt_tokens=sum(map(len, prompts)), reused_tokens=reused,
                                             finish=[""] * n)
        self._stop = False
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        texts = [RowText(self.tokenizer, params.stop) for _ in range(n)]
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
        chunk = self.prefill_chunk
        longest = max(map(len, prompts))
        last = None
        for start in range(0, longest, chunk):
            rows = [p[start:start + chunk] for p in prompts]
            ends = [r for r, p in enumerate(prompts) if rows[r] and start + len(rows[r]) == len(p)]
            lg = self._forward(rows, ends)
            if lg is not None:
                if last is None:
                    last = torch.zeros(self.batch, lg.shape[-1], device=self.device)
                last[ends] = lg
            if self._stop and start + chunk < longest:
                return None
        return last

    @torch.inference_mode()
    def step_rows(self, rows: Sequence[Sequence[int]]) -> torch.Tensor | None:
        """One forward of any mix of rows (`xqcli.engine.batcher`): row b appends `rows[b]` (0, 1 or a
        prompt chunk of tokens) after what it holds. Returns fp32 logits (k, V) at the last new token of
        each of the k rows that got tokens, in row order (None when none did). A step where every row has
        at most one token is a decode step: on the kernels path it runs the static (captured) step, with
        the rows that have none masked."""
        rows = [list(r) for r in rows] + [[] for _ in range(self.batch - len(rows))]
        want = [r for r, new in enumerate(rows) if new]
        if not want:
            return None
        self._check_ids(rows)
        width = max(map(len, rows))
        if self._graph is None or width > 1:
            return self._forward(rows, want)
        n_host = [len(new) for new in rows]
        tok = torch.tensor([new[0] if new else 0 for new in rows], device=self.device)
        logits = self._decode(tok, torch.tensor(n_host, device=self.device), n_host)
        for new, ids in zip(rows, self.ids):
            ids.extend(new)
        return logits[want]

    def free_row(self, row: int) -> None:
        """Forget what row `row` holds (its length becomes 0; its storage is written over by the next
        tokens: streams keep no per-row counters, `xqcli.cache.stream`). The other rows are untouched."""
        host = list(self.cache.host_lengths)
        host[row] = 0
        self.cache.set_lengths(torch.tensor(host, dtype=torch.long, device=self.device), host)
        self.ids[row] = []

    def _forward(self, rows: list[list[int]], want: list[int]) -> torch.Tensor | None:
        """One forward of each row's new tokens (right-padded; rows past `rows` get none), appended to the
        cache and to `ids`; fp32 logits (len(want), V) at the last new token of the rows in `want`.

        Only the rows with tokens go through the model's layers (`RowSubset`): a free or idle row of the
        cache costs no matmuls, and a lone request in a many-row engine costs one row of work."""
        n = [len(r) for r in rows] + [0] * (self.batch - len(rows))
        busy = [r for r in range(self.batch) if n[r]]
        if not busy:
            return None
        width = max(n)
        padded = [rows[r] + [0] * (width - n[r]) for r in busy]
        cache = self.cache if len(busy) == self.batch else RowSubset(self.cache, busy)
        h = self.model.hidden_states(torch.tensor(padded, device=self.device), cache, [n[r] for r in busy])
        for r, new in enumerate(rows):
            self.ids[r].extend(new)
        if not want:
            return None
        dev = self.device
        at = {r: i for i, r in enumerate(busy)}
        hl = h[torch.tensor([at[r] for r in want], device=dev), torch.tensor([n[r] - 1 for r in want], device=dev)]
        return F.linear(hl, self.model.output_weight()).float()  # only the rows' last positions

    @torch.inference_mode()
    def _decode(self, tok: torch.Tensor, n_new: torch.Tensor, n_host: list[int]) -> torch.Tensor:
        if self._graph is not None:
            return self._graph(tok, n_new, n_host)
        return self.model(tok[:, None], self.cache, n_host)[:, -1]  # host counts: nothing read back

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
        """(payload+scales, workspace) bytes per token past the window, measured like `xq plan`: from the
        storage a window-less cache of the same kind allocates on the meta device (no memory)."""
        if self._per_token is None:
            bpt, _, ws = measured_bytes_per_token(self.model, self.spec, artifacts=self.artifacts)
            self._per_token = (bpt, ws)
        return self._per_token

    @cached_property
    def _memory_layout(self) -> tuple[int, int | None]:
        """(bytes of the preallocated cache, tokens from which it stores less than fp16 KV): fixed for the
        engine's life, so the live panel reads them for free."""
        meta = make_cache(self.model, self.spec, 1, self.context, artifacts=self.artifacts,
                          device=torch.device("meta"))
        start = compression_start(meta, self.spec.window, self.spec.group_size,
                                  kv_bytes_per_token(self.model.config))
        return self.cache.allocated().total, start

    def memory(self) -> MemoryReport:
        """The memory readout: now, against KV caches for the same tokens, at steady state, and tokens left."""
        cfg = self.model.config
        lengths = self.cache.host_lengths
        held = sum(lengths)
        kv_tok = kv_bytes_per_token(cfg)
        dtype_bytes = torch.empty(0, dtype=self.model.dtype).element_size()
        bpt, ws = self.per_token_bytes()
        nb = self.cache.nbytes()
        allocated, start = self._memory_layout
        left = {"context": self.batch * self.context - held,
                "trained length": sum(max(0, cfg.max_position_embeddings - n) for n in lengths)}
        free, source = free_memory(self.device)
        budget, budget_source = ((self.budget, "--budget") if self.budget is not None else
                                 (nb.total + free, f"held + {source.removeprefix('the ')}") if free is not None else
                                 (None, ""))
        if budget is not None:
            left["budget"] = max(0, int((budget - nb.total) // max(bpt + ws, 1e-9)))
        limit = min(left, key=left.__getitem__)
        rep = MemoryReport(
            cache_kind=self.spec.name, context_tokens=held, capacity_tokens=self.batch * self.context, cache=nb,
            cache_allocated=allocated, kv_fp16_bytes=held * kv_tok,
            model_dtype=str(self.model.dtype).removeprefix("torch."),
            kv_model_bytes=held * kv_bytes_per_token(cfg, dtype_bytes), bytes_per_token=bpt,
            kv_fp16_bytes_per_token=kv_tok, workspace_bytes_per_token=ws, window=self.spec.window,
            compression_from=start, tokens_left=left[limit], tokens_left_limit=limit,
            trained_tokens=cfg.max_position_embeddings, device=str(self.device), budget=budget,
            budget_source=budget_source)
        if self.device.type == "cuda":
            rep.allocated = torch.cuda.memory_allocated(self.device)
            rep.reserved = torch.cuda.memory_reserved(self.device)
            rep.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            rep.rss, rep.peak = process_memory()
        return rep


def free_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes that can still be allocated, what they are): free CUDA memory on a GPU, available RAM otherwise."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "the free device memory"
    return available_memory(), "the available RAM"


def compression_start(cache: ModelCache, window: int, group: int, kv_tok: int) -> int | None:
    """The token count from which `cache` (a meta-device copy: only its sizes are read) stores less than
    an fp16 KV cache for every longer context; None when it never does.

    Stored bytes minus fp16 KV bytes, g(n), is linear on [0, window] and on each block of `group` tokens
    after it (per-channel streams seal whole blocks; per-token streams seal every token), and g at a fixed
    offset into the blocks is linear in the block index. So the last n with g(n) >= 0 is found from a few
    sizes, not a scan."""
    def g(n: int) -> int:
        cache.set_lengths(torch.full((1,), n, device=cache.device), [n])
        b = cache.nbytes()
        return b.payload + b.scales + b.fp_window - n * kv_tok

    ends = [(g(window + off), g(window + group + off)) for off in (0, group - 1)]
    if any(g1 >= g0 for g0, g1 in ends):  # a block of sealed tokens is no smaller than fp16 KV
        return None
    blocks = [g0 // (g0 - g1) for g0, g1 in ends if g0 >= 0]  # the last block whose end or start is >= 0
    if not blocks:  # g(window) < 0, and g is linear from g(0) = 0: smaller from the first token
        return 1
    lo = window + max(blocks) * group  # g(lo) >= 0; g is linear up to lo + group - 1
    hi = lo + group - 1
    if g(hi) >= 0:
        return hi + 1
    while hi - lo > 1:  # g(lo) >= 0 > g(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if g(mid) >= 0 else (lo, mid)
    return hi


def collect(steps: Iterator[Step]) -> dict[int, dict[str, Any]]:
    """Drain a step stream into {row: {"tokens", "text", "finish"}} (tests, scripts, `xq generate --json`)."""
    out: dict[int, dict[str, Any]] = {}
    for s in steps:
        row = out.setdefault(s.row, {"tokens": [], "text": "", "finish": None})
        row["tokens"].append(s.token)
        row["text"] += s.text
        row["finish"] = s.finish or row["finish"]
    return out

