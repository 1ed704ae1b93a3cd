"""Passkey retrieval (`xq eval --task passkey`): can the model find one fact far back in real text through a
cache of each kind? Needs no download: the filler is an `xqcli.texts` text, the prompts are seeded.

Each prompt is `length` − 16 tokens (room for the answer within `length` positions): an instruction,
filler, the fact ("The pass key is 68142. Remember it. 68142 is the pass key.") placed after `depth` of the
filler, more filler, then "What is the pass key? The pass key is". The answer is the key's tokens. Two protocols (docs/eval.md):

- `score`: the prompt and the answer go through a scoring cache (`xqcli.readouts.scoring`: no
  full-precision window, every cached token quantized); a sample counts as retrieved when every answer
  token is the argmax (lm-eval's `is_greedy`).
- `decode`: the xq engine prefills the prompt through the cache at its generation settings (window
  `spec.window`, default 128) and decodes greedily; retrieved when the key appears in the first
  len(answer) + 2 tokens. The fact lies outside the window: `fact_quantized` says whether every stream
  had sealed (quantized) it when the answer started.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.spec import CacheSpec
from xqcli.engine import Engine, collect
from xqcli.errors import InputError, ResourceError
from xqcli.load import measured_bytes_per_token
from xqcli.model import Transformer
from xqcli.readouts.plan import meta_model
from xqcli.readouts.render import BYTES_PER_TOKEN, Column, TableData, fraction, table
from xqcli.readouts.scoring import score
from xqcli.units import format_tokens

LENGTHS = (1024, 2048, 4096, 8192)
DEPTHS = (0.0, 0.25, 0.5, 0.75)
PROTOCOLS = ("score", "decode")
INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
FACT = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER_ROOM = 16  # positions left after the prompt, so prompt + answer fit in `length`


@dataclass(frozen=True)
class PasskeyPrompt:
    length: int
    depth: float
    key: str
    ids: list[int]  # length − ANSWER_ROOM tokens
    answer: list[int]
    fact_end: int  # tokens up to and including the fact


@dataclass
class PasskeyCell:
    """Accuracy of one cache kind and protocol at one length and depth."""

    cache: str
    protocol: str
    length: int
    depth: float
    retrieved: int
    samples: int
    fact_quantized: bool | None  # decode: every stream had sealed the fact (None for kv and score)
    bytes_per_token: float

    @property
    def accuracy(self) -> float:
        return self.retrieved / self.samples

    def as_dict(self) -> dict:
        return asdict(self) | {"accuracy": self.accuracy}


def build_prompts(tokenizer, filler: str, lengths: Sequence[int], depths: Sequence[float], samples: int,
                  seed: int = 0) -> list[PasskeyPrompt]:
    """`samples` prompts per (length, depth), each with its own 5-digit key and filler offset (seeded)."""
    if samples < 1:
        raise InputError(f"--samples must be >= 1 (got {samples})")
    bad = [d for d in depths if not 0 <= d <= 1]
    if bad:
        raise InputError(f"--depths must lie in [0, 1] (got {bad[0]})")
    def enc(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False)

    intro, question, text = enc(INTRO), enc(QUESTION), enc(filler)
    rng = random.Random(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(samples):
                key = str(rng.randrange(10_000, 100_000))
                fact, answer = enc(FACT.format(key=key)), enc(" " + key)
                hay = length - ANSWER_ROOM - len(intro) - len(fact) - len(question)
                if hay < 1 or hay > len(text):
                    raise InputError(f"passkey length {length}: the filler text has {len(text):,} tokens, the prompt "
                                     f"needs {max(hay, 1):,} of them" if hay >= 1 else
                                     f"passkey length {length} is too short for the instruction and the fact",
                                     hint="use lengths from 256 up to the filler's size (or a longer --text)")
                start = rng.randrange(0, len(text) - hay + 1)
                cut = round(depth * hay)
                ids = intro + text[start:start + cut] + fact + text[start + cut:start + hay] + question
                out.append(PasskeyPrompt(length, depth, key, ids, answer, len(intro) + cut + len(fact)))
    return out


def fact_sealed(spec: CacheSpec, prompt: PasskeyPrompt) -> bool | None:
    """Whether every stream of a `spec` cache holding the prompt has quantized the fact: tokens past the
    window seal per token or, per channel, in whole groups, so group-aligned sealing bounds both."""
    if spec.method == "kv":
        return None
    sealed = max(0, len(prompt.ids) - spec.window) // spec.group_size * spec.group_size
    return prompt.fact_end <= sealed


def _retrieved_decode(model: Transformer, tokenizer, spec: CacheSpec, prompts: Sequence[PasskeyPrompt],
                      artifacts: Artifacts, batch_size: int, allow_long_context: bool) -> list[bool]:
    """Greedy answers from the engine (real prefill and decode through the cache), key found or not."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        engine = Engine(model, tokenizer, spec, context=max(p.length for p in chunk), batch=len(chunk),
                        artifacts=artifacts, allow_long_context=allow_long_context)
        new = min(ANSWER_ROOM, max(len(p.answer) for p in chunk) + 2)
        rows = collect(engine.generate_batch([p.ids for p in chunk], temperature=0.0, max_tokens=new))
        out += [p.key in rows[r]["text"] for r, p in enumerate(chunk)]
    return out


def passkey(model: Transformer, tokenizer, specs: Sequence[CacheSpec], prompts: Sequence[PasskeyPrompt], *,
            protocols: Sequence[str] = PROTOCOLS, artifacts: Artifacts | None = None, batch_size: int = 4,
            progress: Callable[[int, int, str], None] | None = None,
            allow_long_context: bool = False) -> list[PasskeyCell]:
    """One cell per (cache kind, protocol, length, depth), in that order, pooling the samples."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise InputError(f"unknown passkey protocol {unknown[0]!r} (score or decode)")
    trained = model.config.max_position_embeddings
    longest = max(p.length for p in prompts)
    if longest > trained and not allow_long_context:
        raise ResourceError(f"passkey length {longest:,} is beyond the {trained:,} positions the model was "
                            f"trained on", hint="use shorter --lengths, or pass --allow-long-context")
    artifacts = artifacts if artifacts is not None else Artifacts()
    meta = meta_model(model.config, torch.float16)
    cells: list[PasskeyCell] = []
    total, done = len(specs) * len(protocols), 0
    for spec in specs:
        bpt = measured_bytes_per_token(meta, spec)[0]
        for protocol in protocols:
            if progress:
                progress(done, total, f"{spec.name} {protocol}")
            if protocol == "score":
                hits = [s.greedy for s in score(model, spec, [(p.ids, p.answer) for p in prompts],
                                                 artifacts=artifacts, batch_size=batch_size, max_length=longest)]
            else:
                hits = _retrieved_decode(model, tokenizer, spec, prompts, artifacts, batch_size, allow_long_context)
            by_cell: dict[tuple[int, float], PasskeyCell] = {}
            for p, hit in zip(prompts, hits):
                sealed = fact_sealed(spec, p) if protocol == "decode" else None
                cell = by_cell.setdefault((p.length, p.depth), PasskeyCell(
                    spec.name, protocol, p.length, p.depth, 0, 0, sealed, bpt))
                cell.retrieved += int(hit)
                cell.samples += 1
                if sealed is not None:
                    cell.fact_quantized = bool(cell.fact_quantized) and sealed
            cells += by_cell.values()
            done += 1
    if progress:
        progress(total, total, "")
    return cells


def passkey_tables(cells: Sequence[PasskeyCell], title: str) -> list[TableData]:
    """One table per protocol: a row per cache kind (bytes/token beside it), a column per length and depth.
    A decode cell whose fact was not yet quantized in every stream (inside the window) is marked `*` (not in
    CSV, whose cells are the accuracies alone, as fractions: `--json` has `fact_quantized`)."""
    tables = []
    for protocol in dict.fromkeys(c.protocol for c in cells):
        mine = [c for c in cells if c.protocol == protocol]
        points = list(dict.fromkeys((c.length, c.depth) for c in mine))
        rows: dict[str, list] = {}
        for c in mine:
            row = rows.setdefault(c.cache, [c.cache, c.bytes_per_token] + [None] * len(points))
            row[2 + points.index((c.length, c.depth))] = c
        names = [f"{format_tokens(n)} @{100 * d:.0f}%" for n, d in points]
        columns = [Column("cache", numeric=False), BYTES_PER_TOKEN] + [
            Column(name, _shown_accuracy, fraction(name), to_csv=lambda c: c.accuracy) for name in names]
        tables.append(table(columns, list(rows.values()), title=f"{title} | {protocol} protocol"))
    return tables


def _shown_accuracy(cell: PasskeyCell) -> str:
    """A cell as displayed: "80%", "80%*" where the fact was not yet quantized in every stream."""
    return f"{100 * cell.accuracy:.0f}%" + ("*" if cell.fact_quantized is False else "")


def parse_depths(text: str) -> list[float]:
    """'0,0.25,0.5' -> [0.0, 0.25, 0.5] (fractions of the filler before the fact), in order, duplicates dropped."""
    out: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            d = float(part)
        except ValueError:
            raise InputError(f"--depths: cannot read {part!r} as a fraction",
                             hint="e.g. --depths 0,0.25,0.5,0.75") from None
        if d not in out:
            out.append(d)
    if not out:
        raise InputError("--depths is empty", hint="e.g. --depths 0,0.25,0.5,0.75")
    return out
