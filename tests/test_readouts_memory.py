"""Memory readouts say the truth at every length: the cache now against fp16 KV and the model dtype's KV
with a direction, where compression starts (exact, against a brute-force scan), the allocated size, one
"tokens left", and a peak never shown below the current size. Terminal behaviour is in test_chat.py."""

from __future__ import annotations

import pytest
import torch

from xqcli.cache.base import CacheBytes
from xqcli.cache.spec import CacheSpec, kv_bytes_per_token
from xqcli.engine import Engine, MemoryReport
from xqcli.engine.loop import compression_start
from xqcli.load import make_cache
from xqcli.readouts.stats import (
    allocated_words,
    cache_words,
    device_words,
    memory_lines,
    memory_summary,
    now_words,
    panel_rows,
    steady_words,
    versus,
)


def test_versus_words_carry_a_direction():
    assert versus(2.0, 1.0) == "2.0x larger than" and versus(1.0, 3.1) == "3.1x smaller than"
    assert versus(100, 104) == "1.04x smaller than" and versus(104, 100) == "1.04x larger than"
    assert versus(1000, 1001) == "about the same size as" and versus(5, 5) == "the same size as"
    assert versus(0, 5) == "smaller than"


def stored_minus_fp16(cache, kv_tok: int, n: int) -> int:
    cache.set_lengths(torch.full((1,), n, device=cache.device), [n])
    b = cache.nbytes()
    return b.payload + b.scales + b.fp_window - n * kv_tok


@pytest.mark.parametrize("model_kind", ["llama", "qwen2", "mha"])
@pytest.mark.parametrize("kind", ["kv", "kivi-4", "xquant-4", "xquant-cl-3", "xquant-8", "kivi-2"])
@pytest.mark.parametrize("window,group", [(128, 128), (4, 32), (0, 64), (17, 7)])
def test_compression_start_matches_a_scan(tiny_models, model_kind, kind, window, group):
    """The first length from which the cache stays below fp16 KV, found from a few sizes, equals a scan of
    every length (per-channel streams seal whole blocks: the difference is a sawtooth, not a line)."""
    model = tiny_models[model_kind]
    kv_tok = kv_bytes_per_token(model.config)
    cache = make_cache(model, CacheSpec.parse(kind, window=window, group_size=group), 1, 4096,
                       device=torch.device("meta"))
    start = compression_start(cache, window, group, kv_tok)
    horizon = 2000
    above = [n for n in range(horizon) if stored_minus_fp16(cache, kv_tok, n) >= 0]
    if kind == "kv":  # a float32 KV cache is never smaller than fp16 KV
        assert start is None and above == list(range(horizon))
    else:
        assert start is not None and start == above[-1] + 1 < horizon - group


@pytest.mark.parametrize("kind,window,group", [("xquant-4", 128, 128), ("kivi-4", 4, 32), ("xquant-cl-3", 16, 128)])
def test_memory_words_at_every_length(tiny_models, kind, window, group):
    """A float32 model on the CPU: the cache starts larger than fp16 KV (its window is float32), says so
    with the word "larger", and reads "smaller" from `compression_from` on, as the bytes are."""
    model = tiny_models["llama"]
    e = Engine(model, None, CacheSpec.parse(kind, window=window, group_size=group), context=512)
    start = e.memory().compression_from
    assert start is not None and 1 < start < 512
    for n in sorted({1, window, start - 1, start, start + 1, start + group, 500}):
        e.logits([[(7 * i) % 200 + 3 for i in range(n)]])
        m = e.memory()
        assert m.context_tokens == n and m.kv_fp16_bytes == n * m.kv_fp16_bytes_per_token
        assert m.kv_model_bytes == 2 * m.kv_fp16_bytes and m.model_dtype == "float32"
        words = now_words(m)
        assert f"for {n:,} token{'s' * (n > 1)}: " in words and "float32 KV" in words
        if n < start:
            assert m.stored >= m.kv_fp16_bytes and m.ratio_now <= 1
            assert "larger than fp16 KV" in words or "the same size as fp16 KV" in words
        else:
            assert m.stored < m.kv_fp16_bytes and m.ratio_now > 1
            assert "smaller than fp16 KV" in words or "about the same size as fp16 KV" in words
        assert f"smaller than fp16 KV from {start:,} tokens on" in steady_words(m)
        assert (m.tokens_left, m.tokens_left_limit) == (512 - n, "context")
    e.logits([[(7 * i) % 200 + 3 for i in range(511)]])
    assert "1 token left (capped by the 512-token allocation)" in memory_summary(e.memory())
    m = e.memory()
    assert allocated_words(m) == f"{m.cache_allocated / 1024:,.2f} KiB for 512 tokens"
    text = "\n".join(memory_lines(m))
    for phrase in (now_words(m), steady_words(m), allocated_words(m),
                   "1 token left (capped by the 512-token allocation)"):
        assert phrase in text and phrase in memory_summary(m)
    assert panel_rows(m, e.stats)[:-1] == [(k, v) for k, v in (line.split(": ", 1) for line in memory_lines(m))]


def test_tokens_left_is_capped_by_the_trained_length(tiny_models):
    """A context beyond the trained positions (--allow-long-context): tokens left stops at the trained length."""
    model = tiny_models["llama"]
    trained = model.config.max_position_embeddings
    e = Engine(model, None, "xquant-4", context=trained + 100, allow_long_context=True)
    e.logits([list(range(3, 43))])
    m = e.memory()
    assert (m.tokens_left, m.tokens_left_limit, m.trained_tokens) == (trained - 40, "trained length", trained)
    assert f"{trained - 40:,} tokens left (capped by the model's {trained:,} trained positions)" in memory_summary(m)


def report(**changes) -> MemoryReport:
    base = {"cache_kind": "xquant-4", "context_tokens": 100, "capacity_tokens": 4096,
            "cache": CacheBytes(fp_window=25_600), "cache_allocated": 1 << 20, "kv_fp16_bytes": 12_800,
            "model_dtype": "float16", "kv_model_bytes": 12_800, "bytes_per_token": 30.0,
            "kv_fp16_bytes_per_token": 128, "workspace_bytes_per_token": 0.0, "window": 128,
            "compression_from": 300, "tokens_left": 3996, "tokens_left_limit": "context", "trained_tokens": 8192,
            "device": "cpu", "rss": 2000, "peak": 1000}
    return MemoryReport(**(base | changes))


def test_words_for_an_fp16_model_and_the_peak():
    """An fp16 model: the model dtype's KV is fp16 KV, said once. A peak below the current RSS (two readings
    taken apart) is shown as the current RSS."""
    m = report()
    assert now_words(m) == "25.00 KiB for 100 tokens: 2.0x larger than fp16 KV (12.50 KiB)"
    assert device_words(m) == "RSS 1.95 KiB, peak 1.95 KiB"
    cuda = report(rss=None, peak=10, allocated=20, reserved=40)
    assert device_words(cuda) == "allocated 20 B, reserved 40 B, peak 20 B"
    assert now_words(report(model_dtype="bfloat16")).endswith(
        ", 2.0x larger than bfloat16 KV (12.50 KiB, what this device would hold without xq)")
    assert now_words(report(context_tokens=0, cache=CacheBytes(), kv_fp16_bytes=0)) == "empty (0 tokens)"
    assert steady_words(report(compression_from=None, cache_kind="kv", bytes_per_token=128.0)) == (
        "never smaller than fp16 KV; 128 B/token, the same size as fp16 KV (128 B/token)")


def test_cache_words():
    assert cache_words(CacheSpec.parse("xquant-4")) == "xquant-4 (4-bit X cache, newest 128 tokens kept exact)"
    assert cache_words(CacheSpec.parse("kivi-2", window=0)) == "kivi-2 (2-bit K/V cache, no tokens kept exact)"
    assert cache_words(CacheSpec.parse("xquant-cl-3")).startswith("xquant-cl-3 (3-bit cross-layer X cache")
    assert cache_words(CacheSpec.parse("kv")) == "kv (plain K/V cache in the model dtype, no compression)"
