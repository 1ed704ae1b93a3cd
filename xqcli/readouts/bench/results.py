"""What `xq bench` records: one `Row` per cache kind and context, the device peaks, the verdicts, the run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from xqcli.units import format_tokens

SCHEMA_VERSION = 1  # of docs/bench.schema.json
HF_KIND = "hf"  # rows measured through transformers' generate (its default dynamic cache)


@dataclass
class Peaks:
    """Peak rates measured at bench start."""

    bandwidth_gb_s: float  # device copy: (read + write bytes) / time, best of reps
    tflop_s: float  # square matmul: 2·n³ / time, best of reps
    copy_bytes: int
    matmul_n: int
    dtype: str
    seconds: float  # what the calibration took


@dataclass
class Row:
    """One cache kind at one context."""

    kind: str
    engine: str  # "xq" (our model and caches) or "transformers" (--hf)
    context: int
    batch: int
    bytes_per_token: float | None = None  # measured: (payload + scales) per quantized token, per sequence
    plan_bytes_per_token: float | None = None  # `xq plan` (meta-device cache, window 0)
    paper_bytes_per_token: float | None = None  # the paper's formula (bits + 32/g per element)
    ratio: float | None = None  # fp16 KV bytes per token / bytes_per_token
    plan_ratio: float | None = None
    cache_bytes: dict[str, int] | None = None  # held at the context (CacheBytes.as_dict: payload, scales,
    # fp_window, workspace, total)
    prefill_s: float | None = None
    prefill_tok_s: float | None = None
    decode_ms: float | None = None  # median per token over reps
    decode_ms_p90: float | None = None
    decode_ms_reps: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    max_context: int | None = None  # per sequence at this batch, for the cache budget
    step_bytes: int | None = None  # weights + stored cache read per decode step
    step_flops: int | None = None  # 2·matmul params·B + attention + rebuild
    rebuild_flops: int | None = None
    achieved_gb_s: float | None = None
    achieved_tflop_s: float | None = None
    roofline_ms: float | None = None  # memory term + rebuild compute term
    roofline_mem_ms: float | None = None
    roofline_compute_ms: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Verdict:
    context: int
    fastest: str | None
    fits_longest: str | None
    text: str


@dataclass
class BenchResult:
    target: str
    model: dict[str, Any]
    settings: dict[str, Any]
    environment: dict[str, Any]
    peaks: Peaks
    memory: dict[str, Any]
    estimate: dict[str, Any]
    rows: list[Row]
    verdicts: list[Verdict]
    notes: list[str]
    elapsed_s: float

    def as_dict(self) -> dict[str, Any]:
        """The `--format json` body (the renderer puts the envelope in front)."""
        return {"target": self.target, "model": self.model, "settings": self.settings,
                "environment": self.environment, "peaks": asdict(self.peaks), "memory": self.memory,
                "estimate": self.estimate, "rows": [r.as_dict() for r in self.rows],
                "verdicts": [asdict(v) for v in self.verdicts], "notes": self.notes,
                "elapsed_s": round(self.elapsed_s, 3)}


def _ms(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def verdicts(rows: list[Row], contexts: list[int]) -> list[Verdict]:
    """Per context: the fastest kind and the kind that fits the longest context (or the smallest cache)."""
    out = []
    for n in contexts:
        at = [r for r in rows if r.context == n and r.error is None]
        timed = [r for r in at if r.decode_ms is not None]
        fits = [r for r in at if r.max_context is not None]
        fastest = min(timed, key=lambda r: r.decode_ms) if timed else None
        longest = max(fits, key=lambda r: r.max_context) if fits else None
        parts = []
        if fastest:
            kv = next((r for r in timed if r.kind == "kv"), None)
            vs = f", kv {_ms(kv.decode_ms)}" if kv and kv is not fastest else ""
            parts.append(f"fastest {fastest.kind} ({_ms(fastest.decode_ms)} ms/token{vs})")
        if longest:
            kv = next((r for r in fits if r.kind == "kv"), None)
            vs = f", kv {kv.max_context:,}" if kv and kv is not longest else ""
            parts.append(f"fits longest {longest.kind} ({longest.max_context:,} tokens{vs})")
        else:
            small = min((r for r in at if r.bytes_per_token), key=lambda r: r.bytes_per_token, default=None)
            if small:
                parts.append(f"smallest cache {small.kind} ({small.bytes_per_token:,.0f} B/token; "
                             "no memory budget known)")
        text = f"context {format_tokens(n)}: " + ("; ".join(parts) if parts else "nothing measured")
        out.append(Verdict(n, fastest.kind if fastest else None, longest.kind if longest else None, text))
    return out
