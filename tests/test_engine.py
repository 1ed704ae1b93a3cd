"""The decode engine: equality with a hand-stepped reference for every cache kind, sampling rules, stop
strings, batches, conversation reuse, cache state and session files, memory readouts."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.kv import KVCache
from xqcli.cache.spec import CacheSpec
from xqcli.engine import Engine, SamplingParams, collect, load_session, parse_setting, save_session
from xqcli.engine.sampling import apply_repeat_penalty, mask_min_p, mask_top_k, mask_top_p, sample
from xqcli.engine.text import RowText
from xqcli.errors import InputError, ResourceError
from xqcli.load import make_cache
from xqcli.readouts.plan import plan
from xqcli.readouts.stats import memory_lines

KINDS = ["kv", "kivi-4", "xquant-4", "xquant-cl-3", "xquant-8"]
NEG = float("-inf")


def reference_greedy(model, spec, prompt: list[int], steps: int, context: int) -> list[int]:
    """The model stepped token by token through a fresh cache of the same kind, argmax each step."""
    cache = make_cache(model, spec, 1, context)
    logits = model(torch.tensor([prompt]), cache)[:, -1]
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax(-1)))
        logits = model(torch.tensor([[out[-1]]]), cache)[:, -1]
    return out


@pytest.fixture(scope="module")
def tiny_chat():
    """The tiny llama as a GGUF: model plus a byte-level tokenizer with a ChatML template."""
    import assets

    from xqcli.load import load

    loaded = load(assets.tiny_gguf("llama"), device="cpu")
    return loaded.model, loaded.tokenizer()


# ----------------------------------------------------------------------------------------- sampling


def test_top_k_top_p_min_p_masks_on_handmade_logits():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    assert torch.equal(torch.isinf(mask_top_k(logits, 2)), torch.tensor([[False, False, True, True, True]]))
    assert torch.equal(mask_top_k(logits, 0), logits) and torch.equal(mask_top_k(logits, 5), logits)
    # top-p: keep the smallest prefix whose mass reaches p (0.5 + 0.25 = 0.75 >= 0.7)
    assert torch.isinf(mask_top_p(logits, 0.7)).tolist() == [[False, False, True, True, True]]
    assert torch.isinf(mask_top_p(logits, 0.76)).tolist() == [[False, False, False, True, True]]
    assert torch.isinf(mask_top_p(logits, 0.01)).tolist() == [[False, True, True, True, True]]  # at least one
    # min-p: keep p >= min_p * p_max (0.2 * 0.5 = 0.1)
    assert torch.isinf(mask_min_p(logits, 0.2)).tolist() == [[False, False, False, True, True]]
    assert torch.isinf(mask_min_p(logits, 0.6)).tolist() == [[False, True, True, True, True]]
    # order within the vocabulary does not matter
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert torch.equal(torch.isinf(mask_top_p(logits[:, perm], 0.7)), torch.isinf(mask_top_p(logits, 0.7))[:, perm])


def test_repeat_penalty_rule():
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.5]])
    seen = torch.tensor([[True, False, True, False]])
    out = apply_repeat_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, 1.5, -2.0, 0.5]]
    assert int(sample(logits, SamplingParams())) == 0
    assert int(sample(logits, SamplingParams(repeat_penalty=2.0), seen=seen)) == 1
    assert torch.equal(apply_repeat_penalty(logits, seen, 1.0), logits)


def test_sampling_follows_the_distribution_and_the_seed():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(20000, 3).contiguous()
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(sample(logits, SamplingParams(temperature=1.0), g), minlength=3).float() / 20000
    assert torch.allclose(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.015)
    a = sample(logits[:50], SamplingParams(temperature=1.0), torch.Generator().manual_seed(7))
    b = sample(logits[:50], SamplingParams(temperature=1.0), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad,needle", [
    ({"top_p": 1.5}, "top-p must be in (0, 1] (got 1.5)"), ({"top_p": 0.0}, "top-p"),
    ({"temperature": -1.0}, "temperature"), ({"min_p": 1.0}, "min-p"), ({"top_k": -1}, "top-k"),
    ({"repeat_penalty": 0.0}, "repeat penalty"), ({"max_tokens": 0}, "max tokens"), ({"stop": ("",)}, "stop"),
    ({"temperature": math.nan}, "temperature"),
])
def test_sampling_params_are_checked(bad, needle):
    with pytest.raises(InputError, match=None) as info:
        SamplingParams(**bad).check()
    assert needle in str(info.value)


def test_parse_setting():
    assert parse_setting("top-k", "5") == {"top_k": 5}
    assert parse_setting("temp", "0.3") == {"temperature": 0.3}
    assert parse_setting("seed", "none") == {"seed": None}
    with pytest.raises(InputError, match="unknown setting"):
        parse_setting("colour", "red")
    with pytest.raises(InputError, match="takes a number"):
        parse_setting("top_p", "lots")


def test_top_k_1_equals_greedy_and_seeds_repeat(tiny_models):
    model = tiny_models["qwen2"]
    e = Engine(model, None, "kv", context=64)
    prompt = torch.randint(0, 256, (12,)).tolist()
    greedy = collect(e.generate(prompt, max_tokens=20))[0]["tokens"]
    assert collect(e.generate(prompt, max_tokens=20, temperature=1.5, top_k=1))[0]["tokens"] == greedy
    a = collect(e.generate(prompt, max_tokens=20, temperature=1.5, seed=11))[0]["tokens"]
    b = collect(e.generate(prompt, max_tokens=20, temperature=1.5, seed=11))[0]["tokens"]
    c = collect(e.generate(prompt, max_tokens=20, temperature=1.5, seed=12))[0]["tokens"]
    assert a == b and a != c and a != greedy


def test_repeat_penalty_breaks_loops(tiny_chat):
    model, tok = tiny_chat
    e = Engine(model, tok, "kv", context=96)
    prompt = tok.encode("the cat")
    plain = collect(e.generate(prompt, max_tokens=24))[0]["tokens"]
    pen = collect(e.generate(prompt, max_tokens=24, repeat_penalty=3.0))[0]["tokens"]
    assert len(set(plain)) <= 2  # the tiny model loops on one or two tokens
    assert len(set(pen)) > 2 * len(set(plain))


# ------------------------------------------------------------------------------------- stop strings


class _Pieces:
    """A stand-in decoder: token i decodes to pieces[i]."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def feed(self, i: int) -> str:
        return self.pieces[i]

    def flush(self) -> str:
        return ""


def run_text(pieces: list[str], stop: tuple[str, ...]) -> tuple[list[str], bool]:
    rt = RowText(None, stop)
    rt.decoder = _Pieces(pieces)
    out = []
    for i in range(len(pieces)):
        piece, stopped = rt.feed(i)
        out.append(piece)
        if stopped:
            return out, True
    out.append(rt.finish())
    return out, False


def test_stop_strings_are_matched_across_pieces_and_never_printed():
    out, stopped = run_text(["He", "llo", " wo", "rld", "!"], ("o w",))
    assert stopped and out == ["He", "ll", ""]  # "o" was held back: it might start "o w"
    out, stopped = run_text(["ab", "c<", "|e", "nd|", ">x"], ("<|end|>",))
    assert stopped and "".join(out) == "abc"
    out, stopped = run_text(["ab", "c<", "x"], ("<|end|>",))  # a false start is released
    assert not stopped and out == ["ab", "c", "<x", ""]
    out, stopped = run_text(["abc", "<|"], ("<|end|>",))  # held text comes out at the end
    assert not stopped and "".join(out) == "abc<|"
    out, stopped = run_text(["one two"], ("two", "one"))  # the earliest match wins
    assert stopped and out == [""]


def test_engine_stop_string_eos_and_max_tokens(tiny_chat):
    model, tok = tiny_chat
    e = Engine(model, tok, "xquant-4", context=96)
    prompt = tok.encode("the cat")
    free = collect(e.generate(prompt, max_tokens=16))[0]
    assert free["finish"] == "max_tokens" and len(free["tokens"]) == 16
    assert free["text"] == tok.decode(free["tokens"])
    stop = free["text"][3:6]
    cut = collect(e.generate(prompt, max_tokens=16, stop=[stop]))[0]
    assert cut["finish"] == "stop" and cut["text"] == free["text"][:free["text"].index(stop)]
    assert e.stats.finish == ["stop"]
    # EOS: make the tokenizer treat one of the model's tokens as EOS
    eos = free["tokens"][2]
    k = free["tokens"].index(eos)
    tok.eos_ids, saved = [eos], tok.eos_ids
    try:
        ended = collect(e.generate(prompt, max_tokens=16))[0]
    finally:
        tok.eos_ids = saved
    assert ended["finish"] == "eos" and ended["tokens"] == free["tokens"][:k + 1]
    assert ended["text"] == tok.decode(free["tokens"][:k])


def test_context_full_and_too_long_prompt(tiny_models):
    model = tiny_models["llama"]
    e = Engine(model, None, "xquant-4", context=20)
    out = collect(e.generate(list(range(3, 15)), max_tokens=50))[0]
    assert out["finish"] == "context" and len(out["tokens"]) == 20 - 12 + 1
    assert int(e.cache.lengths[0]) == 20 and len(e.ids[0]) == 20
    with pytest.raises(ResourceError, match="context") as err:
        collect(e.generate(list(range(3, 23)), max_tokens=5))
    assert err.value.hint == "raise --context above 20, or shorten the prompt"  # nothing held: /reset would not help


def test_a_conversation_that_fills_the_context_suggests_reset(tiny_chat):
    """Only a row holding an earlier conversation gets chat's /reset in the hint."""
    model, tok = tiny_chat
    e = Engine(model, tok, "kv", context=64)
    msgs = [{"role": "user", "content": "the cat"}]
    msgs.append({"role": "assistant", "content": collect(e.chat_turn(msgs, max_tokens=3))[0]["text"]})
    with pytest.raises(ResourceError, match="leaves no room") as err:
        collect(e.chat_turn(msgs + [{"role": "user", "content": "the dog " * 40}], max_tokens=3))
    assert "(or /reset the conversation)" in err.value.hint


def test_request_stop_ends_after_the_current_step(tiny_models):
    model = tiny_models["llama"]
    e = Engine(model, None, "kivi-4", context=64)
    steps = []
    for s in e.generate([5, 6, 7], max_tokens=30):
        steps.append(s)
        if s.index == 4:
            e.request_stop()
    assert [s.finish for s in steps][-1] == "interrupted" and len(steps) == 6
    assert e.ids[0] == [5, 6, 7] + [s.token for s in steps[:-1]]  # the cache holds exactly what was fed
    assert int(e.cache.lengths[0]) == len(e.ids[0])


# -------------------------------------------------------------------- engine == stepped reference


@pytest.mark.parametrize(("kind", "name"), [(k, n) for n in KINDS for k in ("llama", "qwen2")]
                         + [("latent", "xquant-4+ch0")])  # +ch0 needs latents
def test_engine_greedy_equals_reference_tiny(tiny_models, kind, name):
    model = tiny_models[kind]
    spec = CacheSpec.parse(name, window=6, group_size=8)
    prompt = torch.randint(0, 256, (17,)).tolist()
    e = Engine(model, None, spec, context=64)
    out = collect(e.generate(prompt, max_tokens=24))[0]["tokens"]
    assert out == reference_greedy(model, spec, prompt, 24, 64)


def test_chunked_prefill_equals_one_pass_for_kv(tiny_models):
    model = tiny_models["mistral"]
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (45, 8, 30)]
    one = Engine(model, None, "kv", context=64, batch=3).logits(prompts)
    chunked = Engine(model, None, "kv", context=64, batch=3, prefill_chunk=7).logits(prompts)
    ref = torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts])
    assert (one - ref).abs().max() <= 1e-4 and (chunked - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("name", KINDS)
def test_batch_equals_single_prompts(tiny_models, name):
    """Right-padded rows of different lengths give each prompt's own result (kv: logits within 1e-4)."""
    model = tiny_models["qwen2"]
    spec = CacheSpec.parse(name, window=6, group_size=8)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (21, 5, 33)]
    batch = Engine(model, None, spec, context=80, batch=4, prefill_chunk=16)  # row 3 stays empty
    single = Engine(model, None, spec, context=80, prefill_chunk=16)
    if name == "kv":
        lb = batch.logits(prompts)
        ls = torch.cat([single.logits([p]) for p in prompts])
        assert (lb - ls).abs().max() <= 1e-4
    rows = collect(batch.generate_batch(prompts, max_tokens=12))
    for i, p in enumerate(prompts):
        assert rows[i]["tokens"] == collect(single.generate(p, max_tokens=12))[0]["tokens"], i
    assert batch.stats.generated_tokens == 3 * 12 and batch.stats.rows == 3


def test_batch_rows_finish_independently(tiny_chat):
    model, tok = tiny_chat
    e = Engine(model, tok, "kv", context=64, batch=2)
    prompts = [tok.encode("the cat"), tok.encode("in the water")]
    free = collect(e.generate_batch(prompts, max_tokens=12))
    stop = free[0]["text"][2:4]
    assert stop not in free[1]["text"]
    rows = collect(e.generate_batch(prompts, max_tokens=12, stop=[stop]))
    assert rows[0]["finish"] == "stop" and rows[1]["finish"] == "max_tokens"
    assert rows[1]["tokens"] == free[1]["tokens"]
    assert int(e.cache.lengths[0]) < int(e.cache.lengths[1])  # the finished row stopped growing


# --------------------------------------------------------------------------------- conversations


def test_chat_turn_prefills_only_new_tokens(tiny_chat):
    model, tok = tiny_chat
    e = Engine(model, tok, "xquant-4", context=256)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    first = collect(e.chat_turn(msgs, max_tokens=6))[0]
    held = list(e.ids[0])
    assert held == tok.apply_chat_template(msgs, tokenize=True) + first["tokens"][:-1]
    msgs += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": "and the dog"}]
    second = collect(e.chat_turn(msgs, max_tokens=6))[0]
    full = tok.apply_chat_template(msgs, tokenize=True)
    assert e.stats.reused_tokens == len(held) and e.stats.prompt_tokens == len(full) - len(held)
    assert e.ids[0][:len(full)] == full
    # the same conversation from an empty cache gives the same answer
    fresh = Engine(model, tok, "xquant-4", context=256)
    assert collect(fresh.chat_turn(msgs, max_tokens=6))[0]["tokens"] == second["tokens"]
    assert fresh.stats.reused_tokens == 0
    # an edited history no longer matches the cache: everything is prefilled again
    msgs[0]["content"] = "be verbose"
    collect(e.chat_turn(msgs, max_tokens=2))
    assert e.stats.reused_tokens == 0 and e.stats.prompt_tokens == len(tok.apply_chat_template(msgs, tokenize=True))


# -------------------------------------------------------------------------------- state and sessions


@pytest.mark.parametrize(("kind", "name"), [(k, n) for n in KINDS + ["kivi-fp", "xquant-cl-fp"] for k in ("llama", "qwen2")]
                         + [("latent", "xquant-4+ch0")])  # +ch0 needs latents
def test_state_dict_round_trip_continues_identically(tiny_models, kind, name):
    model = tiny_models[kind]
    spec = CacheSpec.parse(name, window=5, group_size=8)
    prompt = torch.randint(0, 256, (29,)).tolist()
    a = Engine(model, None, spec, context=96)
    collect(a.generate(prompt, max_tokens=9))
    state = a.cache.state_dict()
    n = len(a.ids[0])
    assert state["meta"]["lengths"] == [n]
    b = make_cache(model, spec, 1, 96)
    b.load_state_dict(state)
    again = b.state_dict()
    assert again["meta"] == state["meta"] and again["tensors"].keys() == state["tensors"].keys()
    assert all(torch.equal(again["tensors"][k], v) for k, v in state["tensors"].items())
    assert a.cache.nbytes() == b.nbytes()
    nxt = torch.tensor([[7]])
    assert torch.equal(model(nxt, a.cache), model(nxt, b))


def test_state_is_cut_at_the_lengths(tiny_models):
    model = tiny_models["llama"]
    c = make_cache(model, CacheSpec.parse("xquant-4", window=4, group_size=8), 2, 128)
    model(torch.randint(0, 256, (2, 11)), c, torch.tensor([11, 6]))
    t = c.state_dict()["tensors"]
    assert t["L0.S0.r0.codes"].shape[0] == 7 and t["L0.S0.r0.tail"].shape[0] == 4
    assert t["L0.S0.r1.codes"].shape[0] == 2 and t["L0.S0.r1.tail"].shape[0] == 4
    kv = make_cache(model, "kv", 2, 128)
    model(torch.randint(0, 256, (2, 11)), kv, torch.tensor([11, 6]))
    t = kv.state_dict()["tensors"]
    assert t["k.r0"].shape[2] == 11 and t["v.r1"].shape[2] == 6


def test_load_state_refuses_other_settings(tiny_models):
    model = tiny_models["llama"]
    a = make_cache(model, CacheSpec.parse("xquant-4", window=4), 1, 64)
    model(torch.randint(0, 256, (1, 9)), a)
    with pytest.raises(InputError, match="window 4 .saved. vs 8 .here."):
        make_cache(model, CacheSpec.parse("xquant-4", window=8), 1, 64).load_state_dict(a.state_dict())
    with pytest.raises(InputError, match="name 'xquant-4'"):
        make_cache(model, "kv", 1, 64).load_state_dict(a.state_dict())
    with pytest.raises(ResourceError, match="more than this cache.s capacity"):
        make_cache(model, CacheSpec.parse("xquant-4", window=4), 1, 8).load_state_dict(a.state_dict())


def test_session_file_round_trip_and_mismatches(tmp_path, tiny_chat, tiny_models):
    model, tok = tiny_chat
    e = Engine(model, tok, CacheSpec.parse("xquant-cl-3", window=6, group_size=8), context=128)
    msgs = [{"role": "user", "content": "the cat"}]
    ans = collect(e.chat_turn(msgs, max_tokens=5))[0]
    msgs.append({"role": "assistant", "content": ans["text"]})
    f = tmp_path / "s.safetensors"
    save_session(f, e, msgs, "tiny")
    msgs2 = msgs + [{"role": "user", "content": "and the dog"}]
    want = collect(e.chat_turn(msgs2, max_tokens=5))[0]["tokens"]

    e2 = Engine(model, tok, CacheSpec.parse("xquant-cl-3", window=6, group_size=8), context=128)
    meta = load_session(f, e2, "tiny")
    assert meta["messages"] == msgs and e2.ids[0] == meta["ids"]
    assert collect(e2.chat_turn(msgs2, max_tokens=5))[0]["tokens"] == want
    assert e2.stats.reused_tokens == len(meta["ids"])

    spec = CacheSpec.parse("xquant-cl-3", window=6, group_size=8)
    with pytest.raises(InputError, match="window 6 saved vs 128 here"):
        load_session(f, Engine(model, tok, CacheSpec.parse("xquant-cl-3", group_size=8), context=128), "tiny")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].self_attn.k_proj.weight[0, 0] += 1
    with pytest.raises(InputError, match="saved with another model.*model weights"):
        load_session(f, Engine(other, tok, spec, context=128), "tiny")
    with pytest.raises(InputError, match="dtype .float32 saved, float64 here"):
        load_session(f, Engine(copy.deepcopy(model).to(torch.float64), tok, spec, context=128), "tiny")
    with pytest.raises(InputError, match="model config"):
        load_session(f, Engine(tiny_models["mha"], tok, spec, context=128), "tiny")
    with pytest.raises(ResourceError, match="more than this cache.s capacity") as err:
        load_session(f, Engine(model, tok, spec, context=8), "tiny")  # the window (6 > 8?) is not what is named
    assert err.value.hint == f"start xq chat with --context {len(meta['ids'])} or more"
    wide = Engine(model, tok, CacheSpec.parse("xquant-cl-3", group_size=8), context=128)  # window 128
    collect(wide.chat_turn(msgs, max_tokens=5))
    save_session(tmp_path / "wide.safetensors", wide, msgs, "tiny")
    held = len(wide.ids[0])  # a context that holds the tokens but cuts the window: the hint names the context
    with pytest.raises(InputError, match=f"window 128 saved vs {held} here") as err:
        load_session(tmp_path / "wide.safetensors",
                     Engine(model, tok, CacheSpec.parse("xquant-cl-3", group_size=8), context=held), "tiny")
    assert err.value.hint == f"this chat's --context {held} cuts the window to {held} tokens: start xq chat with " \
        "--context 128 or more"
    assert e2.ids[0] and int(e2.cache.lengths[0]) == len(e2.ids[0])  # refused loads left e2 alone
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a session file"):
        load_session(tmp_path / "junk.safetensors", e2, "tiny")


def test_session_of_a_rotated_cache_names_the_rotation_of_the_artifacts(tmp_path, tiny_chat):
    """`+rot` codes are taken in the rotation the model's artifacts carry (a bundle's choice): a session
    saved under one rotation is refused under another, and loads under the same one."""
    model, tok = tiny_chat
    spec = CacheSpec.parse("xquant-4+rot", window=4, group_size=8)
    e = Engine(model, tok, spec, context=64, artifacts=Artifacts(rotation=("random", 7)))
    msgs = [{"role": "user", "content": "the cat"}]
    collect(e.chat_turn(msgs, max_tokens=3))
    f = tmp_path / "rot.safetensors"
    assert save_session(f, e, msgs, "tiny")["model"]["rotation"] == repr(("random", 7))
    with pytest.raises(InputError, match="rotation"):
        load_session(f, Engine(model, tok, spec, context=64), "tiny")  # no bundle: the default Hadamard
    same = Engine(model, tok, spec, context=64, artifacts=Artifacts(rotation=("random", 7)))
    assert load_session(f, same, "tiny")["ids"] == e.ids[0] == same.ids[0]


# -------------------------------------------------------------------- the GPU-only static decode path


def test_cpu_never_takes_the_cuda_graph_path(tiny_models):
    e = Engine(tiny_models["llama"], None, "kv", context=32, cuda_graph=True)
    assert e.decode_mode == "eager" and e._graph is None and type(e.cache) is KVCache
    assert Engine(tiny_models["llama"], None, "xquant-4", context=32, cuda_graph=True).decode_mode == "eager"


# ------------------------------------------------------------------------------------------- readouts


@pytest.mark.parametrize("kind", ["qwen2", "mha"])
def test_memory_report_agrees_with_plan(tiny_models, kind):
    model = tiny_models[kind]
    cfg = model.config
    kv_tok = cfg.num_hidden_layers * 2 * cfg.kv_dim * 2
    rows = {r.kind: r for r in plan(cfg, ["kivi-4", "xquant-4", "xquant-cl-3"], include_weights=False)}
    for name, row in rows.items():
        e = Engine(model, None, CacheSpec.parse(name, window=4), context=256)
        collect(e.generate(list(range(100, 140)), max_tokens=2))
        m = e.memory()
        assert m.bytes_per_token == row.bytes_per_token and m.ratio == pytest.approx(row.ratio)
        assert m.kv_fp16_bytes_per_token == kv_tok and m.kv_fp16_bytes == 41 * kv_tok
        assert m.model_dtype == "float32" and m.kv_model_bytes == 2 * m.kv_fp16_bytes
        assert m.context_tokens == 41 and m.cache == e.cache.nbytes() and m.cache.fp_window > 0
        assert m.cache_allocated == e.cache.allocated().total
        assert m.cache.payload > 0 and m.ratio_now == pytest.approx(41 * kv_tok / m.stored)
        assert m.rss and m.allocated is None and m.peak >= m.rss
        assert (m.tokens_left, m.tokens_left_limit) == (256 - 41, "context")
        text = "\n".join(memory_lines(m))
        assert f"past the 4-token window {row.bytes_per_token:,.0f} B/token, {row.ratio:.1f}x smaller than fp16 KV" in text
    budgeted = Engine(model, None, "xquant-4", context=64, budget=100_000)  # more than the allocated storage
    collect(budgeted.generate([1, 2, 3], max_tokens=2))
    m = budgeted.memory()
    assert m.budget_source == "--budget" and m.tokens_left_limit == "context" and m.tokens_left == 64 - 4


def test_tokens_left_is_capped_by_free_memory(tiny_models, monkeypatch):
    """Default budget: what the cache holds plus the available RAM. When RAM runs short after the cache was
    allocated, the one "tokens left" figure says so, and names the limit."""
    e = Engine(tiny_models["mha"], None, "xquant-4", context=64)
    collect(e.generate([1, 2, 3], max_tokens=2))
    per = e.memory().bytes_per_token
    monkeypatch.setattr("xqcli.engine.loop.available_memory", lambda: int(10.5 * per))
    m = e.memory()
    assert (m.tokens_left, m.tokens_left_limit) == (10, "budget") and m.budget == m.cache.total + int(10.5 * per)
    assert "10 tokens left (capped by the budget" in "\n".join(memory_lines(m))


# ------------------------------------------------------------------------------------ SmolLM2 (slow)

SMOL_PROMPT = ("The old lighthouse keeper climbed the stairs every night to light the lamp, and one evening "
               "he noticed")


@pytest.fixture(scope="module")
def smol_runs(smollm2_dir, smollm2):
    """64 greedy engine tokens per cache kind (window 16, group 32: quantization is active)."""
    from xqcli.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(smollm2_dir)
    prompt = tok.encode(SMOL_PROMPT)
    runs = {}
    for name in KINDS:
        spec = CacheSpec.parse(name, window=16, group_size=32)
        runs[name] = collect(Engine(smollm2, tok, spec, context=128).generate(prompt, max_tokens=64))[0]
    return tok, prompt, runs


@pytest.mark.slow
@pytest.mark.parametrize("name", KINDS)
def test_engine_greedy_equals_reference_smollm2(smol_runs, smollm2, name):
    _, prompt, runs = smol_runs
    spec = CacheSpec.parse(name, window=16, group_size=32)
    assert runs[name]["tokens"] == reference_greedy(smollm2, spec, prompt, 64, 128)


@pytest.mark.slow
def test_xquant8_text_equals_kv_text_smollm2(smol_runs):
    tok, _, runs = smol_runs
    kv, x8 = runs["kv"]["tokens"][:32], runs["xquant-8"]["tokens"][:32]
    first_diff = next((i for i, (a, b) in enumerate(zip(kv, x8)) if a != b), None)
    assert first_diff is None, f"xquant-8 diverges from kv at generated token {first_diff}"
    assert tok.decode(x8) == tok.decode(kv)
