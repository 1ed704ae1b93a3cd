"""xqcli.sources.gguf: exact loading of llama/qwen2 GGUFs, and a clean GGUFError for every kind of broken file.

Fast tests use tiny GGUFs written by gguf's own writer (so the Q/K permutation and the tensor layout
come from the reference implementation); `slow` ones use the real SmolLM2 file and compare against
transformers' GGUF loader and tokenizer.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import assets
import numpy as np
import pytest
import torch

from xqcli.errors import GGUFError, MissingDependencyError, UnsupportedModelError
from xqcli.sources.gguf import load_gguf, write_hf_folder, write_tokenizer_files

TEXT = ("The quick brown fox jumps over the lazy dog. In the end, an interesting thing was seen at the "
        "station;\n\tthen 42 cats ran (fast) & sang: 'hello world!'")


def _tiny_tensors(kind: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(assets.tiny_hf(kind) / "model.safetensors"))


def _expect_error(path: Path, error: type[Exception] = GGUFError, match: str | None = None) -> str:
    """Load must fail with `error` quickly, with a one-line message naming the file."""
    start = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        load_gguf(path)
    assert time.perf_counter() - start < 3
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


# ---------------------------------------------------------------- tiny GGUFs: exact loading


def test_tiny_llama_loads_exactly() -> None:
    """F32 llama GGUF: Q/K permutation undone, tied head, llama3 rope scaling recovered from rope_freqs."""
    m = load_gguf(assets.tiny_gguf("llama"))
    ref = _tiny_tensors("llama")
    assert set(m.tensors) == set(ref)  # tied: no lm_head
    for name, t in ref.items():
        assert m.tensors[name].dtype == torch.float32
        assert torch.equal(m.tensors[name], t), name
    cfg, want = m.config, assets.tiny_config("llama")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == want[key], key
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["attention_bias"] is False and cfg["torch_dtype"] == "float32"
    rs = cfg["rope_scaling"]
    assert rs["rope_type"] == "llama3" and rs["original_max_position_embeddings"] == 64
    assert (rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]) == (8.0, 1.0, 4.0)
    assert m.tokenizer_config["add_bos_token"] is False
    assert m.tokenizer_config["chat_template"] == assets.CHATML_TEMPLATE
    assert (m.tokenizer_config["bos_token"], m.tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert m.generation_config == {"bos_token_id": 1, "eos_token_id": 2}
    assert len(m.sha256) == 64


def test_tiny_qwen2_loads_biases_and_quantized_types() -> None:
    """qwen2: q/k/v biases, untied head, no permutation; F16 and Q8_0 dequantize as gguf does."""
    import gguf

    m = load_gguf(assets.tiny_gguf("qwen2"))
    ref = _tiny_tensors("qwen2")
    assert set(m.tensors) == set(ref) and "lm_head.weight" in m.tensors
    assert m.config["attention_bias"] is True and m.config["tie_word_embeddings"] is False
    assert m.config["model_type"] == "qwen2" and m.config["rope_scaling"] is None
    for name, t in ref.items():
        if ".mlp." in name:
            q8 = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0)
            want = torch.from_numpy(gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0))
        elif ".self_attn." in name and name.endswith(".weight"):
            want = t.half().float()
        else:
            want = t
        assert torch.equal(m.tensors[name], want), name


def test_write_hf_folder(tmp_path: Path) -> None:
    from safetensors import safe_open
    from tokenizers import Tokenizer

    m = load_gguf(assets.tiny_gguf("qwen2"))
    write_hf_folder(m, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text()) == m.config | {"torch_dtype": "bfloat16"}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = f.keys()
        assert set(names) == set(m.tensors)
        for name in names:
            assert torch.equal(f.get_tensor(name), m.tensors[name].bfloat16()), name
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("the end").ids == \
        Tokenizer.from_str(m.tokenizer_json).encode("the end").ids
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == m.tokenizer_config
    assert json.loads((tmp_path / "generation_config.json").read_text()) == m.generation_config


def test_byte_level_tokenizer_matches_transformers(tmp_path: Path) -> None:
    from xqcli.tokenizer import Tokenizer

    auto = _transformers_tokenizer(assets.tiny_gguf("llama"), tmp_path)
    m = load_gguf(assets.tiny_gguf("llama"))
    write_tokenizer_files(m, tmp_path / "tok")
    ours = Tokenizer.from_folder(tmp_path / "tok")
    text = TEXT + "<|im_start|>user\nhi<|im_end|>"
    assert ours.encode(text) == auto.encode(text)
    assert ours.encode(text, add_special_tokens=False) == auto.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text


def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path) -> None:
    """A Llama-2 style vocab (scores, no merges, byte fallback, BOS added by default)."""
    from xqcli.tokenizer import Tokenizer

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    singles = sorted(set("▁" + "abcdefghijklmnopqrstuvwxyzTIH.,;:!?()&'0123456789"))
    pieces = ["▁t", "he", "▁the", "in", "▁a", "er", "on", "▁s", "an", "▁w", "or", "en", "▁o", "ing", "▁c",
              "es", "at", "▁an", "▁in", "▁th", "ll", "▁f", "ou", "▁h"]
    scores = [0.0] * len(tokens) + [-1000.0 - i for i in range(len(singles))] + [-float(i) for i in range(len(pieces))]
    tokens += singles + pieces
    types += [1] * (len(singles) + len(pieces))
    cfg = assets.tiny_config("llama") | {"vocab_size": 384}
    tensors = _tiny_tensors("llama")
    tensors["model.embed_tokens.weight"] = torch.randn(384, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    tokenizer = {"tokenizer.ggml.model": ("string", "llama"), "tokenizer.ggml.tokens": ("array", tokens),
                 "tokenizer.ggml.scores": ("array", scores), "tokenizer.ggml.token_type": ("int32s", types),
                 "tokenizer.ggml.bos_token_id": ("uint32", 1), "tokenizer.ggml.eos_token_id": ("uint32", 2),
                 "tokenizer.ggml.unknown_token_id": ("uint32", 0)}
    path = assets.write_gguf(tmp_path / "spm.gguf", cfg, tensors, tokenizer=tokenizer)
    m = load_gguf(path)
    assert m.tokenizer_config["add_bos_token"] is True and m.tokenizer_config["unk_token"] == "<unk>"
    auto = _transformers_tokenizer(path, tmp_path)
    write_tokenizer_files(m, tmp_path / "tok")
    ours = Tokenizer.from_folder(tmp_path / "tok")
    for text in (TEXT, " leading space", "ünïcødé 日本 ok", "the the then"):
        assert ours.encode(text) == auto.encode(text), text
        assert ours.encode(text)[0] == 1
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == auto.decode(ids) == text.removeprefix(" ")  # SentencePiece drops one space


def _transformers_tokenizer(path: Path, tmp_path: Path):  # -> transformers tokenizer
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    shutil.copy(path, folder / path.name)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
    except (ImportError, ValueError) as e:  # e.g. a transformers build without GGUF tokenizer support
        pytest.skip(f"transformers cannot read this GGUF tokenizer: {e}")


# ---------------------------------------------------------------- unsupported or inconsistent models


def _write(tmp_path: Path, kind: str = "llama", name: str = "m.gguf", **kw) -> Path:
    cfg = assets.tiny_config(kind)
    tensors = kw.pop("tensors", None) or _tiny_tensors(kind)
    return assets.write_gguf(tmp_path / name, cfg, tensors, **kw)


def test_unsupported_architecture(tmp_path: Path) -> None:
    message = _expect_error(_write(tmp_path, arch="gemma"), UnsupportedModelError, "'gemma'")
    assert "llama, qwen2" in message


def test_missing_metadata_key(tmp_path: Path) -> None:
    _expect_error(_write(tmp_path, skip_keys=("llama.block_count",)), match="'llama.block_count' is missing")
    _expect_error(_write(tmp_path, "qwen2", "q.gguf", skip_keys=("tokenizer.ggml.tokens",)),
                  match="tokenizer.ggml.tokens")


def test_wrong_shape_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    tensors = _tiny_tensors("llama")
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:16]
    _expect_error(_write(tmp_path, tensors=tensors), match="wrong shapes.*blk.1.attn_k.weight")
    tensors = _tiny_tensors("llama")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    _expect_error(_write(tmp_path, name="b.gguf", tensors=tensors), match="missing tensors.*up_proj")
    data = bytearray(_write(tmp_path, name="c.gguf").read_bytes())
    i = data.index(b"blk.0.ffn_up.weight")
    data[i:i + 19] = b"blk.0.ffn_xx.weight"
    (tmp_path / "c.gguf").write_bytes(data)
    _expect_error(tmp_path / "c.gguf", match="unexpected tensors.*blk.0.ffn_xx.weight")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    """An F32 tensor relabelled I32 (same size): gguf cannot dequantize integers."""
    data = bytearray(assets.tiny_gguf("llama").read_bytes())
    type_at = _tensor_info_offset(data, "output_norm.weight") + 4 + 8
    assert struct.unpack_from("<I", data, type_at)[0] == 0
    struct.pack_into("<I", data, type_at, 26)  # GGML_TYPE_I32
    (tmp_path / "i32.gguf").write_bytes(data)
    _expect_error(tmp_path / "i32.gguf", match="tensor type I32.*not supported")


def test_nan_weights(tmp_path: Path) -> None:
    data = bytearray(assets.tiny_gguf("llama").read_bytes())
    struct.pack_into("<f", data, len(data) - 64, math.nan)
    (tmp_path / "nan.gguf").write_bytes(data)
    _expect_error(tmp_path / "nan.gguf", match="NaN")


def test_missing_gguf_package(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "gguf" or n.startswith("gguf.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingDependencyError, match=r"xqcli\[gguf\]"):
        load_gguf(assets.tiny_gguf("llama"))


# ---------------------------------------------------------------- corrupt files


def _tensor_info_offset(data: bytes | bytearray, name: str) -> int:
    """Offset of a tensor record's n_dims field (just after its name)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return data.index(key) + len(key)


def _array_count_offset(data: bytes | bytearray, key: str) -> int:
    """Offset of the element count of a metadata array (after key, value type and item type)."""
    return data.index(key.encode()) + len(key) + 8


def _patched(offset: Callable[[bytes], int], fmt: str, value: int) -> Callable[[bytes], bytes]:
    def patch(data: bytes) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, offset(data), value)
        return bytes(out)

    return patch


def _tokens(data: bytes) -> int:
    return _array_count_offset(data, "tokenizer.ggml.tokens")


def _embd(data: bytes) -> int:  # then: n_dims u32, 2 dims u64, type u32, data offset u64
    return _tensor_info_offset(data, "token_embd.weight")


def _garbage(seed: int, keep: int) -> Callable[[bytes], bytes]:
    rng = random.Random(seed)
    noise = bytes(rng.randrange(256) for _ in range(4096))
    return lambda data: data[:keep] + noise


# name -> (how to break the tiny llama GGUF, fragment of the expected message)
CORRUPTIONS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda d: b"", "not a GGUF file"),
    "three bytes": (lambda d: b"GGU", "not a GGUF file"),
    "header only": (lambda d: d[:24], "metadata entries cannot fit"),
    "wrong magic": (lambda d: b"GGML" + d[4:], "not a GGUF file"),
    "flipped magic bit": (lambda d: bytes([d[0] ^ 1]) + d[1:], "not a GGUF file"),
    "zip file": (lambda d: b"PK\x03\x04" + d[4:], "not a GGUF file"),
    "version 1": (_patched(lambda d: 4, "<I", 1), "version 1"),
    "version 4": (_patched(lambda d: 4, "<I", 4), "version 4"),
    "big endian": (_patched(lambda d: 4, ">I", 3), "big-endian"),
    "huge tensor count": (_patched(lambda d: 8, "<Q", 2**63), "tensors cannot fit"),
    "huge kv count": (_patched(lambda d: 16, "<Q", 2**40), "metadata entries cannot fit"),
    "kv count one too many": (lambda d: _patched(lambda _: 16, "<Q", struct.unpack_from("<Q", d, 16)[0] + 1)(d), ""),
    "huge key length": (_patched(lambda d: 24, "<Q", 2**62), "runs past the end"),
    "huge token count": (_patched(_tokens, "<Q", 2**62), "runs past the end"),
    "huge token length": (_patched(lambda d: _tokens(d) + 8, "<Q", 2**40), "runs past the end"),
    "token not utf-8": (_patched(lambda d: _tokens(d) + 16, "<B", 0xFF), "not UTF-8"),
    "bad value type": (_patched(lambda d: d.index(b"llama.block_count") + 17, "<I", 77), "unknown value type"),
    "nine dims": (_patched(_embd, "<I", 9), "9 dimensions"),
    "huge dim": (_patched(lambda d: _embd(d) + 12, "<Q", 2**40), "runs past the end"),
    "zero dim": (_patched(lambda d: _embd(d) + 12, "<Q", 0), "impossible"),
    "unknown tensor type": (_patched(lambda d: _embd(d) + 20, "<I", 999), "unknown tensor type 999"),
    "misaligned data": (_patched(lambda d: _embd(d) + 24, "<Q", 4), "aligned"),
    "data offset past end": (_patched(lambda d: _embd(d) + 24, "<Q", 2**60), "runs past the end"),
    "truncated data": (lambda d: d[:-100], "runs past the end"),
    "truncated metadata": (lambda d: d[:_tokens(d) + 1000], "runs past the end"),
    "truncated tensor records": (lambda d: d[:_embd(d) + 10], "runs past the end"),
    **{f"garbage after magic {seed}": (_garbage(seed, 4), "") for seed in range(5)},
    **{f"garbage after counts {seed}": (_garbage(seed, 24), "") for seed in range(5)},
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_file(case: str, tmp_path: Path) -> None:
    corrupt, fragment = CORRUPTIONS[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(corrupt(assets.tiny_gguf("llama").read_bytes()))
    _expect_error(path, match=fragment or None)


def test_not_a_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "absent.gguf", match="cannot read")
    (tmp_path / "dir.gguf").mkdir()
    _expect_error(tmp_path / "dir.gguf", match="cannot read")


def _fuzz(base: bytes, path: Path, cases: int, span: int, seed: int) -> dict[str, int]:
    """Mutate 1-8 random bytes in `base[:span]` per case: each load succeeds or raises GGUFError."""
    rng = random.Random(seed)
    outcomes = {"ok": 0, "GGUFError": 0, "UnsupportedModelError": 0}
    for _ in range(cases):
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(span)] = rng.randrange(256)
        path.write_bytes(data)
        start = time.perf_counter()
        try:
            load_gguf(path)
            outcomes["ok"] += 1
        except (GGUFError, UnsupportedModelError) as e:  # a mutated architecture name is unsupported
            assert str(path) in str(e) and "\n" not in str(e)
            outcomes[type(e).__name__] += 1
        assert time.perf_counter() - start < 5
    return outcomes


def test_fuzz_tiny(tmp_path: Path) -> None:
    """Whole-file mutations of a tiny GGUF, tensor data included (some load fine, some hit NaN checks)."""
    base = assets.tiny_gguf("qwen2").read_bytes()
    outcomes = _fuzz(base, tmp_path / "fuzz.gguf", 300, len(base), seed=11)
    assert outcomes["GGUFError"] > 0 and outcomes["ok"] > 0


# ---------------------------------------------------------------- SmolLM2 (real weights)

SMOLLM2_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "rope_theta": 100000.0, "rope_scaling": None, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192, "hidden_act": "silu", "tie_word_embeddings": True, "attention_bias": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}


@pytest.fixture(scope="module")
def smollm2():
    return load_gguf(assets.smollm2_gguf())


@pytest.mark.slow
def test_smollm2_config(smollm2) -> None:
    assert smollm2.config == SMOLLM2_CONFIG
    assert smollm2.sha256 == assets.SMOLLM2_SHA256
    assert len(smollm2.tensors) == 272 and "lm_head.weight" not in smollm2.tensors
    assert sum(t.numel() for t in smollm2.tensors.values()) == 134_515_008
    tc = smollm2.tokenizer_config
    assert (tc["bos_token"], tc["eos_token"], tc["unk_token"], tc["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    assert tc["add_bos_token"] is False and "<|im_start|>" in tc["chat_template"]


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2) -> None:
    """Bit-identical to transformers' own GGUF dequantization and Q/K un-permutation, all 272 tensors.

    `from_pretrained(gguf_file=...)` needs accelerate; its loader function does not, given a meta model.
    """
    pytest.importorskip("transformers")
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError:
        _compare_with_plain_dequantize(smollm2)
        return
    skip = ("architectures", "model_type", "torch_dtype")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in smollm2.config.items() if k not in skip}))
    ref = load_gguf_checkpoint(str(assets.smollm2_gguf()), return_tensors=True, model_to_load=model)["tensors"]
    assert set(ref) == set(smollm2.tensors)
    different = [k for k, t in ref.items() if not torch.equal(t, smollm2.tensors[k])]
    assert not different


def _compare_with_plain_dequantize(smollm2) -> None:
    """Fallback: GGUFReader + gguf.quants.dequantize + an independent reverse permutation."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(assets.smollm2_gguf()))
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name, heads in (("token_embd.weight", "model.embed_tokens.weight", 0),
                                      ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight", 0),
                                      ("blk.7.attn_norm.weight", "model.layers.7.input_layernorm.weight", 0),
                                      ("blk.5.attn_q.weight", "model.layers.5.self_attn.q_proj.weight", 9),
                                      ("blk.5.attn_k.weight", "model.layers.5.self_attn.k_proj.weight", 3)):
        t = tensors[gguf_name]
        w = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        if heads:  # rows are [head][pair][2]; HF wants [head][2][pair]
            w = np.concatenate([np.concatenate([h[0::2], h[1::2]]) for h in np.split(w, heads)])
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(w, np.float32)), smollm2.tensors[hf_name])


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    auto = _transformers_tokenizer(assets.smollm2_gguf(), tmp_path)
    ours = Tokenizer.from_str(smollm2.tokenizer_json)
    text = assets.news_text()[:20000] + "\n<|im_start|>user\nünïcødé 日本語 🙂 x=1234;<|im_end|>\n"
    ids = ours.encode(text, add_special_tokens=False).ids
    assert len(ids) > 4000
    assert ids == auto.encode(text, add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_smollm2_fuzz_headers(tmp_path: Path) -> None:
    """500 seeded mutations of the first 64 KiB of a 2 MiB truncated copy: GGUFError (or a clean load), fast."""
    with open(assets.smollm2_gguf(), "rb") as f:
        base = f.read(2 << 20)
    outcomes = _fuzz(base, tmp_path / "fuzz.gguf", 500, 64 << 10, seed=1234)
    assert outcomes["GGUFError"] > 0


@pytest.mark.slow
def test_smollm2_hf_assets(smollm2) -> None:
    """The cached HF folders: the f32 conversion round-trips, and the MHA variant repeats each kv head 3x."""
    from safetensors import safe_open

    gqa, mha = assets.smollm2_hf(), assets.smollm2_mha_hf()
    assert json.loads((gqa / "config.json").read_text()) == SMOLLM2_CONFIG
    assert json.loads((mha / "config.json").read_text()) == SMOLLM2_CONFIG | {"num_key_value_heads": 9}
    name = "model.layers.4.self_attn.k_proj.weight"
    with safe_open(str(gqa / "model.safetensors"), "pt") as f:
        k = f.get_tensor(name)
        assert torch.equal(k, smollm2.tensors[name])
    with safe_open(str(mha / "model.safetensors"), "pt") as f:
        k9 = f.get_tensor(name)
    assert k9.shape == (576, 576)
    heads = k.reshape(3, 64, 576)
    assert torch.equal(k9.reshape(9, 64, 576), heads.repeat_interleave(3, 0))
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (mha / file).read_bytes() == (gqa / file).read_bytes()
