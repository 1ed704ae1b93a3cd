"""Passkey retrieval (`xq eval --task passkey`): prompts, the two protocols, the table and JSON."""

from __future__ import annotations

import json

import assets
import pytest
import torch
from schemas import assert_valid

from xqcli.cache.spec import CacheSpec
from xqcli.cli import main
from xqcli.errors import InputError
from xqcli.load import load
from xqcli.readouts.retrieval import ANSWER_ROOM, build_prompts, fact_sealed, parse_depths, passkey
from xqcli.texts import builtin_text


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny():
    return load(str(assets.tiny_gguf("llama")))


def test_prompts_have_their_length_and_the_fact_at_its_depth(tiny):
    tok = tiny.tokenizer()
    prompts = build_prompts(tok, builtin_text(), [256, 400], [0.0, 0.5, 1.0], 2, seed=3)
    assert len(prompts) == 2 * 3 * 2
    for p in prompts:
        assert len(p.ids) == p.length - ANSWER_ROOM and len(p.key) == 5
        before = tok.decode(p.ids[:p.fact_end])
        assert before.rstrip().endswith(f"{p.key} is the pass key.") and tok.decode(p.ids[p.fact_end:]).count(p.key) == 0
        assert tok.decode(p.answer).strip() == p.key
    shallow = next(p for p in prompts if p.length == 400 and p.depth == 0.0)
    deep = next(p for p in prompts if p.length == 400 and p.depth == 1.0)
    assert shallow.fact_end < deep.fact_end
    again = build_prompts(tok, builtin_text(), [256, 400], [0.0, 0.5, 1.0], 2, seed=3)
    assert [p.ids for p in again] == [p.ids for p in prompts]  # seeded
    assert len({p.key for p in prompts}) > 1


def test_prompt_problems_are_input_errors(tiny):
    tok = tiny.tokenizer()
    with pytest.raises(InputError, match="too short"):
        build_prompts(tok, builtin_text(), [40], [0.5], 1)
    with pytest.raises(InputError, match="filler text has"):
        build_prompts(tok, "only a few words of filler", [256], [0.5], 1)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        build_prompts(tok, builtin_text(), [256], [1.5], 1)
    with pytest.raises(InputError, match="cannot read"):
        parse_depths("0,half")
    assert parse_depths("0, 0.5,0.5,1") == [0.0, 0.5, 1.0]


def test_fact_sealed_follows_window_and_groups(tiny):
    tok = tiny.tokenizer()
    early, late = build_prompts(tok, builtin_text(), [512], [0.0, 1.0], 1)
    assert fact_sealed(CacheSpec.parse("kv"), early) is None
    spec = CacheSpec.parse("xquant-4", window=128, group_size=128)  # 496 tokens: 256 sealed in every stream
    assert fact_sealed(spec, early) is True and fact_sealed(spec, late) is False
    assert fact_sealed(CacheSpec.parse("xquant-4", window=0, group_size=16), late) is True


def test_score_protocol_is_greedy_match_through_the_cache(tiny):
    """kv: the score protocol's verdict is exactly the greedy check of one plain forward."""
    tok = tiny.tokenizer()
    prompts = build_prompts(tok, builtin_text(), [256], [0.0, 0.5], 2)
    cells = passkey(tiny.model, tok, [CacheSpec.parse("kv")], prompts, protocols=("score",), batch_size=3)
    want = {}
    for p in prompts:
        logits = tiny.model(torch.tensor([p.ids + p.answer[:-1]]))[0, len(p.ids) - 1:]
        want[p.depth] = want.get(p.depth, 0) + int(bool((logits.argmax(-1) == torch.tensor(p.answer)).all()))
    assert {c.depth: c.retrieved for c in cells} == want and all(c.samples == 2 for c in cells)


def test_eval_passkey_json_and_table(capsys, tiny):
    src = str(tiny.source.path)
    code, out, err = run(capsys, "eval", src, "--task", "passkey", "--text", "builtin", "--lengths", "256",
                         "--depths", "0,0.75", "--samples", "1", "-c", "kv,xquant-4,kivi-2", "--window", "32",
                         "--group-size", "32", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert_valid(obj, "eval")
    cells = {(c["cache"], c["protocol"], c["depth"]): c for c in obj["cells"]}
    assert len(cells) == 3 * 2 * 2
    # a 240-token prompt, window 32, groups of 32: 192 tokens sealed; the fact ends at 160 (depth 0) or 194
    assert cells[("xquant-4", "decode", 0.0)]["fact_quantized"] is True
    assert cells[("xquant-4", "decode", 0.75)]["fact_quantized"] is False
    assert cells[("kv", "decode", 0.0)]["fact_quantized"] is None
    assert cells[("kivi-2", "score", 0.0)]["bytes_per_token"] < cells[("kv", "score", 0.0)]["bytes_per_token"]
    code, out, err = run(capsys, "eval", src, "--task", "passkey", "--text", "builtin", "--lengths", "256",
                         "--depths", "0.5", "--samples", "1", "-c", "kv,xquant-4", "--protocol", "decode",
                         "--format", "md")
    assert code == 0, err
    assert "decode protocol" in out and "score protocol" not in out and "| cache | bytes/token | 256 @50% |" in out


@pytest.mark.parametrize("extra,code,needle", [
    (["--task", "needle"], 2, "the built-in task is passkey"),
    (["--task", "passkey", "--depths", "2"], 2, "[0, 1]"),
    (["--task", "passkey", "--lengths", "1k"], 7, "beyond the 512 positions"),
    (["--task", "passkey", "--protocol", "paper"], 2, "unknown passkey protocol"),
])
def test_eval_passkey_bad_input(capsys, tiny, extra, code, needle):
    got, _, err = run(capsys, "eval", str(tiny.source.path), "--text", "builtin", "-c", "kv", "--lengths", "256",
                      *extra)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert got == code and len(lines) == 1 and needle in lines[0], err


@pytest.mark.slow
def test_smollm2_retrieves_the_passkey_through_kv_and_xquant_4(smollm2_dir):
    loaded = load(smollm2_dir)
    tok = loaded.tokenizer()
    prompts = build_prompts(tok, builtin_text(), [512], [0.0, 0.5], 1)
    cells = passkey(loaded.model, tok, [CacheSpec.parse("kv"), CacheSpec.parse("xquant-4", window=64)], prompts,
                    artifacts=loaded.artifacts)
    by = {(c.cache, c.protocol, c.depth): c for c in cells}
    assert all(by[("kv", proto, d)].accuracy == 1 for proto in ("score", "decode") for d in (0.0, 0.5))
    assert by[("xquant-4", "decode", 0.0)].fact_quantized and by[("xquant-4", "decode", 0.0)].accuracy == 1
