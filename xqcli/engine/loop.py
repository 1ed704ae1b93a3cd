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
- GPU only: with `cuda_graph=True` on a CUDA device and the `kv` cache, the decode step is captured in
  a CUDA graph (`xqcli.engine.graph`); everything else runs the same step eagerly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.base import ModelCache
from xqcli.cache.spec import CacheSpec, kv_bytes_per_token, uses_latents
from xqcli.engine.graph import GraphedDecode, static_kv_cache
from xqcli.engine.sampling import SamplingParams, sample
from xqcli.engine.stats import GenerationStats, MemoryReport
from xqcli.engine.text import RowText
from xqcli.errors import InputError, ResourceError
from xqcli.load import make_cache, measured_bytes_per_token, model_projections
from xqcli.system import available_memory, process_memory

if TYPE_CHECKING:
    from xqcli.model import Transformer
    from xqcli.tokenizer import Tokenizer

DEFAULT_CONTEXT = 4096
DEFAULT_PREFILL_CHUNK = 512
FINISH_REASONS = ("eos", "stop", "max_tokens", "context", "interrupted")


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
            now plus the free device memory, or the available RAM on CPU).
        artifacts: the model's bundle data (`Loaded.artifacts`: projections, calibration, rotation);
            None for a model without a bundle (SVD factors are then computed once, on first need).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, cache: CacheSpec | str = "kv",
                 *, context: int | None = None, device: str | torch.device | None = None, batch: int = 1,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, cuda_graph: bool = False,
                 sampling: SamplingParams | None = None, budget: int | None = None,
                 artifacts: Artifacts | None = None) -> None:
        if device is not None and torch.device(device) != model.device:
            model = model.to(torch.device(device))
        self.model, self.tokenizer = model, tokenizer
        self.artifacts = artifacts if artifacts is not None else Artifacts()
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
                self.cache: ModelCache = (
                    static_kv_cache(model, batch, self.context) if graph
                    else make_cache(model, self.spec, batch, self.context, artifacts=self.artifacts))
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError and the CPU allocator error are RuntimeErrors
            if "memory" not in str(e).lower():
                raise
            raise ResourceError(f"cannot allocate a {self.spec.name} cache for {batch} x {self.context:,} tokens: "
                                f"{str(e).splitlines()[0]}", hint="lower --context") from None
        if self.spec.method in ("xquant", "xquant-cl") and uses_latents(cfg):
            model_projections(model, self.artifacts)  # SVDs now, not inside the first timed prefill
        self._graph = GraphedDecode(model, self.cache) if graph else None
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
        """(payload+scales, workspace) bytes per token past the window, measured like `xq plan`: from the
        storage a window-less cache of the same kind allocates on the meta device (no memory)."""
        if self._per_token is None:
            bpt, _, ws = measured_bytes_per_token(self.model, self.spec, artifacts=self.artifacts)
            self._per_token = (bpt, ws)
        return self._per_token

    def memory(self) -> MemoryReport:
        held = sum(self.cache.host_lengths)
        kv_tok = kv_bytes_per_token(self.model.config)
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
            free, source = available_memory(), "available RAM"
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

