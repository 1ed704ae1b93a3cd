"""`GET /metrics`: Prometheus text exposition of the server's counters and the scheduler's snapshot.

The scheduler publishes its numbers after every step (`Batcher.snapshot`, taken on the engine thread), so a
scrape never touches the cache while a step runs. Request counts by endpoint and status are kept here, on the
event loop.
"""

from __future__ import annotations

from collections import Counter

# name -> (type, help, snapshot key); every gauge and counter the scheduler feeds.
SERIES: list[tuple[str, str, str, str]] = [
    ("xq_prompt_tokens_total", "counter", "Prompt tokens of admitted requests (reused prefixes included).",
     "prompt_tokens_total"),
    ("xq_reused_prompt_tokens_total", "counter", "Prompt tokens found in the cache instead of prefilled.",
     "reused_tokens_total"),
    ("xq_generated_tokens_total", "counter", "Generated tokens.", "generated_tokens_total"),
    ("xq_steps_total", "counter", "Forward steps of the batch.", "steps_total"),
    ("xq_decode_tokens_per_second", "gauge", "Generated tokens per second over the last 5 s of steps.",
     "decode_tokens_per_second"),
    ("xq_queue_depth", "gauge", "Requests waiting for a row or for memory.", "queue_depth"),
    ("xq_active_rows", "gauge", "Rows serving a request.", "active_rows"),
    ("xq_idle_rows", "gauge", "Rows holding a finished conversation for prefix reuse (evicted LRU).", "idle_rows"),
    ("xq_rows", "gauge", "Rows of the cache (the batch).", "rows"),
    ("xq_cache_tokens_held", "gauge", "Tokens the cache holds now, all rows.", "tokens_held"),
    ("xq_cache_bytes_held", "gauge", "Bytes the cache holds now (payload, scales, fp window, workspace).",
     "cache_bytes_held"),
    ("xq_cache_bytes_reserved", "gauge", "Bytes reserved by running requests (prompt plus max_tokens).",
     "cache_bytes_reserved"),
    ("xq_cache_bytes_allocated", "gauge", "Bytes of the preallocated cache storage.", "cache_bytes_allocated"),
    ("xq_cache_budget_bytes", "gauge", "The memory budget admission counts against (--budget).", "cache_budget_bytes"),
    ("xq_cache_budget_tokens", "gauge", "Tokens the budget holds with this cache kind.", "budget_tokens"),
    ("xq_kv_fp16_bytes_held", "gauge", "What an fp16 KV cache would hold for the same tokens.", "kv_fp16_bytes_held"),
    ("xq_cache_compression_vs_fp16_kv", "gauge", "fp16 KV bytes / bytes held, for the tokens held now.",
     "compression_vs_fp16_kv"),
]


class RequestCounts:
    """Finished HTTP requests by endpoint and status (the event loop is the only writer)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, int]] = Counter()

    def add(self, endpoint: str, status: int) -> None:
        self.counts[(endpoint, status)] += 1


def render(requests: RequestCounts, snapshot: dict[str, float], info: dict[str, str]) -> str:
    """The exposition text (version 0.0.4)."""
    lines = ["# HELP xq_info The model and cache kind served.", "# TYPE xq_info gauge",
             "xq_info{" + ",".join(f'{k}="{_escape(v)}"' for k, v in info.items()) + "} 1",
             "# HELP xq_requests_total Finished HTTP requests by endpoint and status.",
             "# TYPE xq_requests_total counter"]
    for (endpoint, status), n in sorted(requests.counts.items()):
        lines.append(f'xq_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
    for name, kind, text, key in SERIES:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {_value(snapshot[key])}"]
    return "\n".join(lines) + "\n"


def _value(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
