"""Our runtime is the same model as Transformers: logits, decode path, perplexity, on real and tiny weights."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from xqcli.config import ModelConfig
from xqcli.errors import UnsupportedModelError
from xqcli.load import load_hf_folder, make_cache

transformers = pytest.importorskip("transformers")


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def decode_logits(model, tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    cache = make_cache(model, "kv", tokens.shape[0], tokens.shape[1])
    outs = [model(tokens[:, :prefix], cache)]
    outs += [model(tokens[:, i:i + 1], cache) for i in range(prefix, tokens.shape[1])]
    return torch.cat(outs, 1)


def check_against_hf(folder, n_tokens: int = 300, batch: int = 1) -> None:
    ours = load_hf_folder(folder)
    ref_model = hf_model(folder)
    tokens = torch.randint(0, ours.config.vocab_size, (batch, n_tokens))
    with torch.no_grad():
        ref = ref_model(tokens).logits.float()
    prefill = ours(tokens)
    assert (prefill - ref).abs().max() <= 1e-4
    stepped = decode_logits(ours, tokens, prefix=1)
    assert (stepped - prefill).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "mha"])
def test_tiny_models_match_transformers(kind):
    import assets

    check_against_hf(assets.tiny_hf(kind), n_tokens=300, batch=2)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2_dir", "smollm2_mha_dir"])
def test_smollm2_matches_transformers(which, request):
    check_against_hf(request.getfixturevalue(which), n_tokens=300)


@pytest.mark.slow
def test_mha_variant_is_the_same_model(smollm2, smollm2_mha):
    tokens = torch.randint(0, 49152, (1, 64))
    assert (smollm2(tokens) - smollm2_mha(tokens)).abs().max() <= 1e-4


def _ppl(logits_fn, ids: list[int], window: int = 1024) -> float:
    nll, n = 0.0, 0
    for i in range(0, len(ids) - window + 1, window):
        w = torch.tensor([ids[i:i + window]])
        logp = torch.log_softmax(logits_fn(w)[0, :-1].float(), -1)
        nll -= float(logp.gather(-1, w[0, 1:, None]).sum())
        n += window - 1
    return math.exp(nll / n)


@pytest.mark.slow
def test_smollm2_wiki_perplexity_matches_transformers(smollm2, smollm2_dir):
    """First 16,384 tokens of the cleaned Wikipedia text, non-overlapping 1024-token windows, no BOS."""
    from xqcli.texts import wiki_text
    from xqcli.tokenizer import Tokenizer

    ids = Tokenizer.from_folder(smollm2_dir).encode(wiki_text()[:200_000], add_special_tokens=False)[:16384]
    assert len(ids) == 16384
    ref_model = hf_model(smollm2_dir)
    with torch.no_grad():
        ref = _ppl(lambda w: ref_model(w).logits, ids)
    ours = _ppl(smollm2, ids)
    assert abs(ours - ref) / ref <= 1e-3
    assert 10 < ours < 40  # a real language model on real English


@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template_match_transformers(smollm2_dir):
    from xqcli.texts import news_text
    from xqcli.tokenizer import Tokenizer

    ours = Tokenizer.from_folder(smollm2_dir)
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    text = news_text()
    assert ours.encode(text) == ref(text)["input_ids"]
    convo = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"},
             {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    assert ours.apply_chat_template(convo) == ref.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(convo, tokenize=True) == ref.apply_chat_template(
        convo, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_config_rejects_unknown_model_type():
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2"):
        ModelConfig.from_dict({"model_type": "gpt2", "hidden_size": 8})


def test_config_round_trip_and_rope_parameters():
    raw = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
           "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling.rope_type == "llama3" and cfg.head_dim == 16
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def mistral_with_window(tmp_path, window: int):
    """The tiny Mistral with a `sliding_window` in its config.json."""
    import assets

    folder = tmp_path / f"mistral-w{window}"
    shutil.copytree(assets.tiny_hf("mistral"), folder)
    cfg = json.loads((folder / "config.json").read_text()) | {"sliding_window": window}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_mistral_sliding_window_matches_transformers(tmp_path):
    """Mistral's window (8 tokens here) in prefill, token-by-token decode and rows of different lengths."""
    import assets

    folder = mistral_with_window(tmp_path, 8)
    ours, full = load_hf_folder(folder), load_hf_folder(assets.tiny_hf("mistral"))
    assert ours.config.sliding_window == 8 and full.config.sliding_window is None
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = hf_model(folder)(tokens).logits.float()
    prefill = ours(tokens)
    assert (prefill - ref).abs().max() <= 1e-4
    assert (full(tokens) - ref)[:, 8:].abs().amax(-1).min() > 1e-3  # the window changes every later position
    assert (decode_logits(ours, tokens, prefix=5) - prefill).abs().max() <= 1e-4
    cache = make_cache(ours, "kv", 2, 40)  # row 1 is 23 tokens long: right-padded prefill, then one step for both
    lens = torch.tensor([30, 23])
    first = ours(tokens[:, :30], cache, lens)
    step = ours(torch.stack([tokens[0, 30], tokens[1, 23]])[:, None], cache)
    assert (first[0] - ref[0, :30]).abs().max() <= 1e-4 and (step[0, 0] - ref[0, 30]).abs().max() <= 1e-4
    with torch.no_grad():
        ref1 = hf_model(folder)(tokens[1:, :24]).logits.float()[0]
    assert (first[1, :23] - ref1[:23]).abs().max() <= 1e-4 and (step[1, 0] - ref1[23]).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["xquant-fp", "xquant-cl-fp", "kivi-fp", "xquant-4"])
def test_sliding_window_through_the_caches(tmp_path, kind):
    """Every cache kind masks to the window; past it the fused kernels step aside for the masked path."""
    from xqcli.cache.spec import CacheSpec

    model = load_hf_folder(mistral_with_window(tmp_path, 8))
    tokens = torch.randint(0, 256, (1, 20))
    spec = CacheSpec.parse(kind, window=2, group_size=4)
    runs = {}
    for kernels in ("off", "triton"):
        cache = make_cache(model, spec, 1, 20, kernels=kernels)
        outs = [model(tokens[:, :4], cache)] + [model(tokens[:, i:i + 1], cache) for i in range(4, 20)]
        runs[kernels] = torch.cat(outs, 1)
    if kind.endswith("-fp"):  # quantization off: the same logits as the plain model
        assert (runs["off"] - model(tokens)).abs().max() <= 1e-4
    assert (runs["triton"] - runs["off"]).abs().max() <= 2e-3


@pytest.mark.parametrize("window", [None, 8])
def test_forward_without_a_cache_equals_an_empty_kv_cache(tmp_path, window):
    """No cache: the prompt attends to itself, with the very numbers of a `kv` cache (sliding window too)."""
    import assets

    model = load_hf_folder(mistral_with_window(tmp_path, window) if window else assets.tiny_hf("qwen2"))
    tokens = torch.randint(0, model.config.vocab_size, (2, 20))
    assert torch.equal(model(tokens), model(tokens, make_cache(model, "kv", 2, 20)))


def test_sliding_window_configs():
    base = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 128}
    assert ModelConfig.from_dict(base | {"model_type": "llama", "sliding_window": 8}).sliding_window is None
    assert ModelConfig.from_dict(base | {"model_type": "qwen2", "sliding_window": 8}).sliding_window is None
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        ModelConfig.from_dict(base | {"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": True})
    from xqcli.errors import ModelError

    with pytest.raises(ModelError, match="sliding_window"):
        ModelConfig.from_dict(base | {"model_type": "mistral", "sliding_window": 0})
    cfg = ModelConfig.from_dict(base | {"model_type": "mistral", "sliding_window": 8})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert "sliding_window" not in ModelConfig.from_dict(base | {"model_type": "mistral"}).to_dict()
