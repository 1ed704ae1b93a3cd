"""Continuous batching (`xqcli.engine.batcher`): batch results equal solo results, rows joining and
leaving between steps, chunked prefill mixed with decode steps, cancellation, prefix reuse, memory
admission and LRU eviction. Tiny models, float32, CPU."""

from __future__ import annotations

import itertools

import pytest
import torch

from xqcli.cache.spec import CacheSpec
from xqcli.engine import Engine, SamplingParams, collect
from xqcli.engine.batcher import Batcher, PromptTooLong, QueueFull, Request
from xqcli.errors import ResourceError
from xqcli.readouts.plan import plan

KINDS = ["kv", "kivi-4", "xquant-4", "xquant-cl-3"]


class Recorder:
    """One request's emitted events, with the logits each of its tokens was sampled from."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher, self.tokens, self.logits, self.done = batcher, [], [], None
        self.req: Request | None = None

    def __call__(self, event) -> None:
        if event.kind == "token":
            b = self.batcher
            row = next(r.index for r in b.rows if r.req is self.req)
            self.logits.append(b.last_logits[b.last_rows.index(row)].clone())
            self.tokens.append(event.token)
        else:
            self.done = event


def submit(batcher: Batcher, ids: list[int], **params) -> Recorder:
    rec = Recorder(batcher)
    rec.req = Request(list(ids), SamplingParams(**params), rec)
    batcher.submit(rec.req)
    return rec


def drain(batcher: Batcher, limit: int = 500) -> int:
    """Step until idle; the number of steps."""
    for n in range(limit):
        if not batcher.step():
            return n
    raise AssertionError("the batcher never went idle")


def solo(model, spec, ids: list[int], context: int, **params) -> Recorder:
    """`ids` alone, in a one-row batcher over a fresh engine."""
    b = Batcher(Engine(model, None, spec, context=context, batch=1, prefill_chunk=16))
    rec = submit(b, ids, **params)
    drain(b)
    return rec


@pytest.mark.parametrize("name", KINDS)
def test_rows_joining_mid_run_equal_solo(tiny_models, name):
    """Requests joining a running batch between steps, long ones prefilled in chunks beside decode steps:
    each row's logits equal its solo logits within 1e-4 and its tokens are the solo tokens."""
    model = tiny_models["qwen2"]
    spec = CacheSpec.parse(name, window=6, group_size=8)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (21, 5, 150, 33)]
    b = Batcher(Engine(model, None, spec, context=200, batch=4, prefill_chunk=16))
    recs = [submit(b, prompts[0], max_tokens=12), submit(b, prompts[1], max_tokens=20)]
    for _ in range(3):
        b.step()
    recs.append(submit(b, prompts[2], max_tokens=10))  # 150 tokens: chunks of 16 while rows 0 and 1 decode
    b.step()
    recs.append(submit(b, prompts[3], max_tokens=8))
    drain(b)
    for p, rec, n in zip(prompts, recs, (12, 20, 10, 8)):
        ref = solo(model, spec, p, 200, max_tokens=n)
        assert rec.tokens == ref.tokens and len(rec.tokens) == n
        assert max((a - c).abs().max().item() for a, c in zip(rec.logits, ref.logits)) <= 1e-4
        assert rec.done.finish == "max_tokens" and rec.done.generated_tokens == n


@pytest.mark.parametrize("name", KINDS)
def test_sixteen_concurrent_greedy_requests_give_generate_tokens(tiny_models, name):
    """16 requests over 8 rows (half of them wait for a row, then take one a finished request held: its old
    codes, scales and ring slots are written over) give exactly what `Engine.generate` (`xq generate`)
    gives each prompt alone. Window 8: tokens are sealed during prefill and decode."""
    model = tiny_models["llama"]
    spec = CacheSpec.parse(name, window=8, group_size=8)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in range(4, 68, 4)]
    b = Batcher(Engine(model, None, spec, context=96, batch=8))
    recs = [submit(b, p, max_tokens=10) for p in prompts]
    drain(b)
    alone = Engine(model, None, spec, context=96)
    for p, rec in zip(prompts, recs):
        assert rec.tokens == collect(alone.generate(p, max_tokens=10))[0]["tokens"]


def test_seeded_sampling_equals_solo(tiny_models):
    """A seeded request draws the same tokens beside others as alone (each request has its own generator)."""
    model = tiny_models["llama"]
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (9, 17)]
    b = Batcher(Engine(model, None, "kv", context=64, batch=2))
    recs = [submit(b, p, max_tokens=8, temperature=1.0, top_p=0.9, seed=7) for p in prompts]
    drain(b)
    alone = Engine(model, None, "kv", context=64)
    for p, rec in zip(prompts, recs):
        ref = collect(alone.generate(p, max_tokens=8, temperature=1.0, top_p=0.9, seed=7))[0]["tokens"]
        assert rec.tokens == ref


def test_cancel_frees_the_row_before_the_next_step(tiny_models):
    model = tiny_models["llama"]
    b = Batcher(Engine(model, None, "kv", context=64, batch=2))
    long_one = submit(b, [5, 6, 7], max_tokens=50)
    other = submit(b, [8, 9], max_tokens=6)
    for _ in range(3):
        b.step()
    b.cancel(long_one.req)
    b.step()
    row = next(r for r in b.rows if r.index == 0)
    assert row.req is None and b.engine.ids[0] == [] and b.engine.cache.host_lengths[0] == 0
    assert long_one.done.finish == "cancelled" and len(long_one.tokens) == 3
    drain(b)
    assert other.done.finish == "max_tokens"
    assert b.snapshot["active_rows"] == 0 and b.snapshot["cache_bytes_reserved"] == 0


@pytest.mark.parametrize("name", ["kv", "xquant-cl-fp"])
def test_a_conversation_held_in_a_row_is_continued_not_prefilled(tiny_models, name):
    """A request extending a finished one reuses its row's tokens, and its logits equal a fresh prefill's.
    (Quantized kinds seal tokens by row length, so a prompt past the window quantizes differently when it
    is fed in other pieces: there the claim is equality with the same schedule run alone, tested above.)"""
    model = tiny_models["qwen2"]
    spec = CacheSpec.parse(name, window=6, group_size=8)
    b = Batcher(Engine(model, None, spec, context=128, batch=2, prefill_chunk=16))
    first = submit(b, list(range(10, 40)), max_tokens=6)
    drain(b)
    held = list(b.engine.ids[0])
    assert held == list(range(10, 40)) + first.tokens[:-1]  # the last sampled token is never fed
    turn = held + [first.tokens[-1], 50, 51, 52]
    second = submit(b, turn, max_tokens=5)
    drain(b)
    assert second.done.reused_tokens == len(held) and second.done.prompt_tokens == len(turn)
    assert b.totals["reused_tokens"] == len(held)
    ref = solo(model, spec, turn, 128, max_tokens=5)
    assert second.tokens == ref.tokens
    assert max((a - c).abs().max().item() for a, c in zip(second.logits, ref.logits)) <= 1e-4


def test_idle_conversations_are_evicted_lru_when_memory_is_needed(tiny_models):
    model = tiny_models["llama"]
    eng = Engine(model, None, "kv", context=64, batch=4)
    probe = Batcher(eng)
    b = Batcher(eng, budget=2 * probe.row_bytes(40))  # room for two conversations of 40 tokens
    a = submit(b, list(range(3, 33)), max_tokens=5)
    drain(b)
    c = submit(b, list(range(40, 70)), max_tokens=5)
    drain(b)
    assert [len(ids) > 0 for ids in eng.ids] == [True, True, False, False]
    b.rows[1].last_used, b.rows[0].last_used = 2.0, 1.0  # row 0 is the least recently used
    d = submit(b, list(range(100, 130)), max_tokens=5)
    drain(b)
    assert eng.ids[0] == [] and len(eng.ids[1]) == 34 and len(eng.ids[2]) == 34
    assert a.done and c.done and d.done.finish == "max_tokens"
    assert b.held_bytes() <= b.budget and b.snapshot["idle_rows"] == 2


def test_admission_by_memory_waits_for_room(tiny_models):
    """With room for one request's reservation, the second waits until the first is done."""
    model = tiny_models["llama"]
    eng = Engine(model, None, "kv", context=64, batch=4)
    b = Batcher(eng, budget=Batcher(eng).row_bytes(40))
    first = submit(b, list(range(3, 23)), max_tokens=20)
    second = submit(b, list(range(30, 50)), max_tokens=20)
    b.step()
    assert b.snapshot["active_rows"] == 1 and b.snapshot["queue_depth"] == 1
    drain(b)
    assert first.done.finish == second.done.finish == "max_tokens"
    assert b.held_bytes() <= b.budget


def test_row_bytes_follow_the_kinds_bytes_per_token(smollm2):
    """A full row of each kind holds `xq plan`'s bytes per token (at the model's dtype, within 5%). Window 0:
    a row's full-precision tokens (the window, and a per-channel stream's unsealed block) cost more per
    token, and `RowBytes` counts them; 2048 tokens seal whole groups, and the budget's tokens are counted
    at the peak a row reaches on its way there (test_row_bytes_is_the_peak_on_the_way), so fewer."""
    budget = 64 << 20
    full, held = {}, {}
    for name in ("kv", "xquant-4"):
        spec = CacheSpec.parse(name, window=0)
        b = Batcher(Engine(smollm2, None, spec, context=2048, batch=1), budget=budget)
        full[name], held[name] = b.row_bytes._held(2048), b.budget_tokens()
    rows = {r.kind: r for r in plan(smollm2.config, ["kv", "xquant-4"], dtype=smollm2.dtype,
                                    include_weights=False)}
    expect = rows["kv"].bytes_per_token / rows["xquant-4"].bytes_per_token
    assert abs(full["kv"] / full["xquant-4"] / expect - 1) < 0.05
    assert held["kv"] == budget // full["kv"] * 2048 + budget % full["kv"] // (full["kv"] // 2048)
    assert 4 * held["kv"] < held["xquant-4"] < budget // full["xquant-4"] * 2048


def test_refusals(tiny_models):
    model = tiny_models["llama"]
    b = Batcher(Engine(model, None, "kv", context=64, batch=1), max_queue=2)
    with pytest.raises(ResourceError, match="65 tokens, more than the context of 64"):
        b.check(list(range(55)), SamplingParams(max_tokens=10))
    small = Batcher(b.engine, budget=b.row_bytes(8))
    with pytest.raises(ResourceError, match="more than the budget"):
        small.check(list(range(5)), SamplingParams(max_tokens=10))
    submit(b, [3, 4], max_tokens=2)
    submit(b, [3, 4], max_tokens=2)
    with pytest.raises(QueueFull):
        submit(b, [3, 4], max_tokens=2)
    drain(b)
    assert b.queued() == 0


def test_a_long_idle_row_beside_a_wide_prefill_step():
    """Padded queries of a row holding many tokens sit past the step's longest row: the RoPE table must
    reach them (a fresh model, so no earlier test has grown its table)."""
    import assets

    from xqcli.load import load_hf_folder

    model = load_hf_folder(assets.tiny_hf("llama"))
    b = Batcher(Engine(model, None, "kv", context=512, batch=2))
    first = submit(b, torch.randint(3, 256, (200,)).tolist(), max_tokens=4)
    drain(b)
    second = submit(b, torch.randint(3, 256, (200,)).tolist(), max_tokens=4)
    drain(b)
    assert first.done.finish == second.done.finish == "max_tokens"
    assert [len(ids) for ids in b.engine.ids] == [203, 203]


@pytest.mark.parametrize("name", ["kv", "kivi-4", "xquant-4", "xquant-4+ch0", "xquant-cl-3"])
def test_row_bytes_is_the_peak_on_the_way(tiny_models, name):
    """A per-channel stream's bytes drop when a group seals (its full-precision tail shrinks), so
    `row_bytes(n)` is the most a row holds at any length up to n: it never decreases, and with the default
    budget (every row full) a request of any length up to the context fits."""
    model = tiny_models["latent"]  # per-channel X·U_k
    spec = CacheSpec.parse(name, window=4, group_size=8)
    eng = Engine(model, None, spec, context=60, batch=2)
    b = Batcher(eng)
    sizes = [b.row_bytes._held(n) for n in range(61)]
    if name != "kv":
        assert any(later < earlier for earlier, later in itertools.pairwise(sizes))  # the saw the peak must cover
    assert [b.row_bytes(n) for n in range(61)] == [max(sizes[:n + 1]) for n in range(61)]
    for n in range(2, 61):
        b.check(list(range(1, n)), SamplingParams(max_tokens=61 - n))  # prompt + max_tokens = the context + 1


def test_without_max_tokens_a_request_gets_what_the_budget_holds(tiny_models):
    """A budget smaller than one full row: the default max_tokens is what it holds beside the prompt (the
    request then fits exactly), and a prompt the budget cannot hold is refused as the prompt's fault."""
    eng = Engine(tiny_models["llama"], None, "kv", context=64, batch=2)
    b = Batcher(eng, budget=Batcher(eng).row_bytes(40))
    assert b.max_new_tokens(20) == 21  # 20 + 21 - 1 = 40 tokens held at most
    b.check(list(range(3, 23)), SamplingParams(max_tokens=21))
    with pytest.raises(ResourceError, match="more than the budget"):
        b.check(list(range(3, 23)), SamplingParams(max_tokens=22))
    assert Batcher(eng).max_new_tokens(20) == 44  # no budget limit: the rest of the context
    with pytest.raises(PromptTooLong, match="the prompt alone needs"):
        b.check(list(range(3, 44)), SamplingParams(max_tokens=1))
    with pytest.raises(PromptTooLong, match="the prompt has 64 tokens"):
        b.check(list(range(64)), SamplingParams(max_tokens=1))


def test_the_decode_rate_falls_to_zero_when_idle(tiny_models, monkeypatch):
    import time

    b = Batcher(Engine(tiny_models["llama"], None, "kv", context=64, batch=1))
    submit(b, [3, 4, 5], max_tokens=20)
    drain(b)
    assert b.snapshot["decode_tokens_per_second"] > 0
    later = time.perf_counter() + 10  # past the 5 s window, with no step since
    monkeypatch.setattr(time, "perf_counter", lambda: later)
    assert not b.step()
    assert b.snapshot["decode_tokens_per_second"] == 0
