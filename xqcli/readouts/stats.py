"""How a generation's numbers read: `GenerationStats` and `MemoryReport` as rows, plain lines, rich tables.

The engine builds the data (`xqcli.engine.stats`); every view of it is laid out here, once:
`*_rows` are (label, value) pairs, `*_lines` the plain-text form (stdout when it is not a terminal),
`*_table` the rich form, and `panel_rows` the compact live panel of `xq chat`.
"""

from __future__ import annotations

from xqcli.engine.stats import GenerationStats, MemoryReport
from xqcli.readouts.render import key_value_table
from xqcli.units import format_bytes


def generation_rows(stats: GenerationStats) -> list[tuple[str, str]]:
    s = stats
    return [("prompt", f"{s.prompt_tokens:,} tokens prefilled, {s.reused_tokens:,} reused from the cache"),
            ("generated", f"{s.generated_tokens:,} tokens, finish {', '.join(s.finish) or '-'}"),
            ("prefill", f"{s.prefill_s:.3f} s, {s.prefill_tok_s:,.1f} tok/s"),
            ("decode", f"{s.decode_s:.3f} s, {s.decode_tok_s:,.1f} tok/s")]


def memory_rows(report: MemoryReport) -> list[tuple[str, str]]:
    r, c, b = report, report.cache, format_bytes
    now = f", {r.ratio_now:.2f}x this cache now" if r.ratio_now else ""
    rows = [
        ("context", f"{r.context_tokens:,} tokens held, {r.context_left:,} of {r.capacity_tokens:,} left"),
        (f"cache {r.cache_kind}", (f"{b(c.total)} = payload {b(c.payload)} + scales {b(c.scales)} "
                                   f"+ fp window {b(c.fp_window)} + CL workspace {b(c.workspace)}")),
        ("fp16 KV for the same tokens", f"{b(r.kv_fp16_bytes)}{now}"),
        ("per token past the window", (f"{r.bytes_per_token:,.0f} B/token (payload+scales) vs fp16 KV "
                                       f"{r.kv_fp16_bytes_per_token:,} B/token: ratio {r.ratio:.2f}x")),
    ]
    if r.allocated is not None:
        rows.append((f"device {r.device}",
                     f"allocated {b(r.allocated)}, reserved {b(r.reserved)}, peak {b(r.peak)}"))
    else:
        rows.append((f"device {r.device}", f"RSS {b(r.rss)}, peak {b(r.peak)}"))
    if r.budget is not None:
        per = r.bytes_per_token + r.workspace_bytes_per_token
        rows.append(("budget", f"{b(r.budget)} ({r.budget_source}) -> {r.tokens_left:,} more tokens at "
                               f"{per:,.0f} B/token"))
    return rows


def panel_rows(report: MemoryReport, stats: GenerationStats) -> list[tuple[str, str]]:
    """The live panel under a chat answer: the same numbers as `memory_rows`, shorter, plus the speed."""
    r, c, b = report, report.cache, format_bytes
    rows = [
        ("context", f"{r.context_tokens:,} tokens ({r.context_left:,} of {r.capacity_tokens:,} left)"),
        ("cache", (f"{b(c.total)} = payload {b(c.payload)} + scales {b(c.scales)} + fp window "
                   f"{b(c.fp_window)} + CL workspace {b(c.workspace)}")),
        ("fp16 KV", (f"{b(r.kv_fp16_bytes)} for these tokens"
                     + (f" ({r.ratio_now:.2f}x now)" if r.ratio_now else "")
                     + f"; {r.bytes_per_token:,.0f} B/token past the window: {r.ratio:.2f}x")),
    ]
    if r.allocated is not None:
        rows.append(("device", f"allocated {b(r.allocated)} / reserved {b(r.reserved)} / peak {b(r.peak)}"))
    else:
        rows.append(("device", f"{r.device}: RSS {b(r.rss)} (peak {b(r.peak)})"))
    if r.tokens_left is not None:
        rows.append(("budget", f"{r.tokens_left:,} more tokens in {b(r.budget)} ({r.budget_source})"))
    rows.append(("speed", (f"prefill {stats.prefill_tok_s:,.1f} tok/s, "
                           f"decode {stats.decode_tok_s:,.1f} tok/s, {stats.generated_tokens} generated")))
    return rows


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
