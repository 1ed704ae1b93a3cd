"""`XQLM`: an lm-evaluation-harness model backed by the xq runtime, with any cache kind (registered as `xq`).

- `loglikelihood`: lm-eval's own tokenization (`TemplateLM`: trailing context spaces move to the
  continuation, the pair is split from the encoding of the whole text), then `xqcli.readouts.scoring`:
  the context and the continuation go through a fresh cache, batched (docs/eval.md states the protocol).
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `max_length` tokens, each scored as above.
- `generate_until`: the xq engine with the cache kind at its generation settings (full-precision window
  `window`, default 128), greedy unless the task asks for a temperature; stops at EOS or a stop string.

Importing this module imports lm_eval (call `xqcli.lmeval.require_lm_eval` first for a clean exit 6).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from xqcli.cache.spec import CacheSpec
from xqcli.engine import Engine, collect
from xqcli.errors import InputError
from xqcli.load import Loaded, load
from xqcli.readouts.scoring import score

DEFAULT_MAX_GEN_TOKS = 256


@register_model("xq")
class XQLM(TemplateLM):
    """lm-eval model: `pretrained` (any source `xq` opens) or an already `loaded` model, one cache kind.

    `cache`: a kind name (`kv`, `xquant-4`, `kivi-2`, `xquant-cl-3+rot`, ...) or a `CacheSpec`; `group_size`
    its group (with a name);
    `window`: the full-precision window of `generate_until` (scoring always uses none, docs/eval.md);
    `batch_size`: requests per forward; `max_length`: positions (default: the model's trained positions)."""

    def __init__(self, pretrained: str | None = None, *, loaded: Loaded | None = None, cache: str | CacheSpec = "kv",
                 batch_size: int | str = 8, device: str | None = None, dtype: str | None = None,
                 group_size: int = 128, window: int = 128, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, **ignored: Any) -> None:
        super().__init__()
        if (pretrained is None) == (loaded is None):
            raise InputError("XQLM needs exactly one of pretrained= (a model source) or loaded= (a loaded model)")
        self.loaded = loaded if loaded is not None else load(pretrained, dtype=dtype, device=device)
        self.spec = cache if isinstance(cache, CacheSpec) else CacheSpec.parse(str(cache), group_size=int(group_size),
                                                                             window=int(window))
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1 (got {batch_size})")
        self.tokenizer = self.loaded.tokenizer()
        self.max_length = int(max_length) if max_length else self.loaded.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)

    # --- tokenization (TemplateLM) ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        if not self.tokenizer.eos_ids:
            raise InputError(f"{self.tokenizer.name}: the tokenizer names no end-of-text token, which lm-eval "
                             f"uses as the context of an empty prompt")
        return self.tokenizer.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        """As lm-eval's `hf` model: BOS when the tokenizer has one, else end-of-text."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokenizer's own special-token rule when unspecified (what `hf` does with add_bos_token unset)."""
        return self.tokenizer.encode(string, add_special_tokens=True if add_special_tokens is None
                                     else add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # --- scoring -------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        scored = score(self.loaded.model, self.spec, [(ctx, cont) for _, ctx, cont in requests],
                       artifacts=self.loaded.artifacts, batch_size=self.batch_size, max_length=self.max_length)
        out = []
        for (key, _, _), s in zip(requests, scored):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (s.logprob, s.greedy))
            out.append((s.logprob, s.greedy))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Sum over lm-eval's disjoint windows (context 1 token, the first one after the prefix token)."""
        per_request = [[make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
            context_len=1)] for (string,) in (r.args for r in requests)]
        flat = [(None, ctx, cont) for windows in per_request for ctx, cont in windows]
        logps = iter(lp for lp, _ in self._loglikelihood_tokens(flat))
        out = []
        for (string,), windows in zip((r.args for r in requests), per_request):
            total = sum(next(logps) for _ in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # --- generation --------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's temperature) through an `Engine` of this cache kind, batch by batch."""
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start:start + self.batch_size]]
            groups: dict[str, list[int]] = {}
            for i, (_, gen) in enumerate(chunk):
                groups.setdefault(repr(sorted(gen.items())), []).append(i)
            texts: dict[int, str] = {}
            for idx in groups.values():
                texts |= dict(zip(idx, self._generate([chunk[i][0] for i in idx], chunk[idx[0]][1])))
            for i, (ctx, gen) in enumerate(chunk):
                self.cache_hook.add_partial("generate_until", (ctx, gen), texts[i])
                out.append(texts[i])
        return out

    def _generate(self, contexts: list[str], gen: dict[str, Any]) -> list[str]:
        until = gen.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen.get("max_gen_toks", self.max_gen_toks))
        temperature = float(gen.get("temperature", 0.0)) if gen.get("do_sample", True) else 0.0
        if max_new >= self.max_length:
            raise InputError(f"max_gen_toks {max_new} leaves no room for a context in {self.max_length} positions")
        prompts = [self.tok_encode(c)[-(self.max_length - max_new):] or [self.prefix_token_id] for c in contexts]
        spec = replace(self.spec, window=min(self.spec.window, self.max_length))
        trained = self.loaded.config.max_position_embeddings
        engine = Engine(self.loaded.model, self.tokenizer, spec, batch=len(prompts), artifacts=self.loaded.artifacts,
                        context=min(max(map(len, prompts)) + max_new, self.max_length),
                        allow_long_context=self.max_length > trained)
        rows = collect(engine.generate_batch(prompts, temperature=temperature, max_tokens=max_new,
                                             stop=tuple(s for s in until if s)))
        return [rows[r]["text"] for r in range(len(prompts))]
