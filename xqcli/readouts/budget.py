"""From a memory budget to an average bit width: what `xq convert --budget --context` stores as a `+mix` plan."""

from __future__ import annotations

from xqcli.cache.spec import CacheSpec
from xqcli.config import ModelConfig
from xqcli.errors import InputError
from xqcli.readouts.plan import paper_bytes_per_token
from xqcli.sources.hub import resolve
from xqcli.units import format_bytes

MIN_BITS, MAX_BITS = 2, 8.0


def bits_for_budget(cfg: ModelConfig, budget: int, context: int) -> float:
    """The average xquant bits whose cache (payload + fp16 scale/zero per group) fits `budget` at `context`.

    The paper's accounting is linear in the bit width, so two points (2 and 3 bits) give the line.
    """
    at2 = paper_bytes_per_token(cfg, CacheSpec.parse("xquant-2"))
    per_bit = paper_bytes_per_token(cfg, CacheSpec.parse("xquant-3")) - at2
    bits = MIN_BITS + (budget / context - at2) / per_bit
    if bits < MIN_BITS:
        raise InputError(f"no plan fits {format_bytes(budget)} at {context} tokens: even 2 bits everywhere needs "
                         f"{format_bytes(at2 * context)}", hint="raise --budget or lower --context")
    return min(MAX_BITS, round(bits, 2))


def source_bits_for_budget(src: str, budget: int, context: int | None) -> float:
    """`bits_for_budget` for a convert source (an HF folder or id; a .gguf has no config.json to read)."""
    if not context or context < 1:
        raise InputError("--budget needs --context N (the context the budget must hold)")
    source = resolve(src)
    if source.kind == "gguf":
        raise InputError("--budget with a .gguf source: convert once, then use --budget-bits")
    return bits_for_budget(ModelConfig.from_file(source.path / "config.json"), budget, context)
