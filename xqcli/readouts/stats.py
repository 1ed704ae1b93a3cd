"""How a generation's numbers read: `GenerationStats` and `MemoryReport` as rows, plain lines, rich tables.

The engine builds the data (`xqcli.engine.stats`); every view of it is laid out here, once:
`*_rows` are (label, value) pairs, `*_lines` the plain-text form (stdout when it is not a terminal),
`*_table` the rich form, `panel_rows` the live panel of `xq chat`, and `memory_summary` the one line chat
prints after each answer and `xq generate` on stderr. One set of phrases (`now_words`, `steady_words`,
`left_words`, ...) says every memory number, so all of these read the same.
"""

from __future__ import annotations

from xqcli.cache.spec import CacheSpec
from xqcli.engine.stats import GenerationStats, MemoryReport
from xqcli.readouts.render import key_value_table
from xqcli.units import format_bytes


def generation_rows(stats: GenerationStats) -> list[tuple[str, str]]:
    s = stats
    return [("prompt", f"{s.prompt_tokens:,} tokens prefilled, {s.reused_tokens:,} reused from the cache"),
            ("generated", f"{s.generated_tokens:,} tokens, finish {', '.join(s.finish) or '-'}"),
            ("prefill", f"{s.prefill_s:.3f} s, {s.prefill_tok_s:,.1f} tok/s"),
            ("decode", f"{s.decode_s:.3f} s, {s.decode_tok_s:,.1f} tok/s")]


def cache_words(spec: CacheSpec) -> str:
    """A cache kind in plain words: "xquant-4 (4-bit X cache, newest 128 tokens kept exact)"."""
    if spec.method == "kv":
        return "kv (plain K/V cache in the model dtype, no compression)"
    bits = f"{spec.bits}-bit" if spec.bits else "unquantized"
    what = {"kivi": "K/V cache", "xquant": "X cache", "xquant-cl": "cross-layer X cache"}[spec.method]
    kept = f"newest {spec.window:,} tokens kept exact" if spec.window else "no tokens kept exact"
    return f"{spec.name} ({bits} {what}, {kept})"


def tokens(n: int) -> str:
    """'1 token', '4,096 tokens'."""
    return f"{n:,} token{'' if n == 1 else 's'}"


def versus(a: float, b: float) -> str:
    """How `a` compares with `b`, with a direction a reader cannot misread: "2.0x larger than",
    "3.1x smaller than", "1.04x smaller than" (two decimals near 1), "the same size as"."""
    if a == b:
        return "the same size as"
    if min(a, b) <= 0:
        return "smaller than" if a < b else "larger than"
    r = max(a, b) / min(a, b)
    ratio = f"{r:.2f}" if r < 1.1 else f"{r:.1f}"
    if ratio == "1.00":
        return "about the same size as"
    return f"{ratio}x {'smaller' if a < b else 'larger'} than"


def now_words(r: MemoryReport) -> str:
    """What the held tokens take now against fp16 KV and against a KV cache in the model dtype (what this
    device would hold without xq; said once when that dtype is fp16)."""
    b = format_bytes
    if not r.context_tokens:
        return "empty (0 tokens)"
    words = (f"{b(r.stored)} for {tokens(r.context_tokens)}: {versus(r.stored, r.kv_fp16_bytes)} fp16 KV "
             f"({b(r.kv_fp16_bytes)})")
    if r.model_dtype != "float16":
        words += (f", {versus(r.stored, r.kv_model_bytes)} {r.model_dtype} KV ({b(r.kv_model_bytes)}, "
                  f"what this device would hold without xq)")
    return words


def steady_words(r: MemoryReport) -> str:
    """Where the compression starts and what one more token costs once it has."""
    if r.compression_from is None:
        start = "never smaller than fp16 KV"
    elif r.compression_from <= 1:
        start = "smaller than fp16 KV from the first token"
    else:
        start = f"smaller than fp16 KV from {r.compression_from:,} tokens on"
    where = "" if r.cache_kind == "kv" else f"past the {r.window:,}-token window "
    per, kv = r.bytes_per_token, r.kv_fp16_bytes_per_token
    return f"{start}; {where}{per:,.0f} B/token, {versus(per, kv)} fp16 KV ({kv:,} B/token)"


def left_words(r: MemoryReport) -> str:
    """The one "tokens left" figure and what caps it."""
    by = {"context": f"the {r.capacity_tokens:,}-token allocation",
          "trained length": f"the model's {r.trained_tokens:,} trained positions",
          "budget": f"the budget, {format_bytes(r.budget)} {r.budget_source}"}[r.tokens_left_limit]
    return f"{tokens(r.tokens_left)} left (capped by {by})"


def allocated_words(r: MemoryReport) -> str:
    return f"{format_bytes(r.cache_allocated)} for {tokens(r.capacity_tokens)}"


def device_words(r: MemoryReport) -> str:
    """Device memory; a peak is never shown below the current size it bounds."""
    b = format_bytes
    if r.allocated is not None:
        peak = max(r.peak or 0, r.allocated)
        return f"allocated {b(r.allocated)}, reserved {b(r.reserved)}, peak {b(peak)}"
    peak = r.peak if r.peak is None or r.rss is None else max(r.peak, r.rss)
    return f"RSS {b(r.rss)}, peak {b(peak)}"


def memory_rows(report: MemoryReport) -> list[tuple[str, str]]:
    r, c, b = report, report.cache, format_bytes
    parts = f"payload {b(c.payload)} + scales {b(c.scales)} + fp window {b(c.fp_window)}"
    if c.workspace:
        parts += f"; CL workspace {b(c.workspace)} during a step"
    rows = [
        ("context", f"{tokens(r.context_tokens)} held, {left_words(r)}"),
        (f"cache {r.cache_kind}", now_words(r)),
        ("made of", parts),
        ("compression", steady_words(r)),
        ("allocated", allocated_words(r)),
        (f"device {r.device}", device_words(r)),
    ]
    if r.budget is not None:
        rows.append(("budget", f"{b(r.budget)} ({r.budget_source})"))
    return rows


def memory_summary(report: MemoryReport) -> str:
    """One line: chat's note after each answer and `xq generate`'s stderr line (same words as `memory_rows`)."""
    r = report
    return f"cache {r.cache_kind} {now_words(r)} | {steady_words(r)} | allocated {allocated_words(r)}, {left_words(r)}"


def panel_rows(report: MemoryReport, stats: GenerationStats) -> list[tuple[str, str]]:
    """The live panel under a chat answer: `memory_rows`, plus the speed."""
    return memory_rows(report) + [
        ("speed", (f"prefill {stats.prefill_tok_s:,.1f} tok/s, decode {stats.decode_tok_s:,.1f} tok/s, "
                   f"{stats.generated_tokens} generated"))]


def lines(rows: list[tuple[str, str]]) -> list[str]:
    """Rows as plain `label: value` lines."""
    return [f"{label}: {value}" for label, value in rows]


def generation_lines(stats: GenerationStats) -> list[str]:
    return lines(generation_rows(stats))


def memory_lines(report: MemoryReport) -> list[str]:
    return lines(memory_rows(report))


def generation_table(stats: GenerationStats):
    """A rich table for `/stats` and `xq generate` on a terminal."""
    return key_value_table("generation", generation_rows(stats))


def memory_table(report: MemoryReport):
    """A rich table for `/mem` and `xq generate` on a terminal."""
    return key_value_table("memory", memory_rows(report))
