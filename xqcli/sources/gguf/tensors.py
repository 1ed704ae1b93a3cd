"""GGUF metadata and tensors in Hugging Face terms: the config dict, HF tensor names and shapes,
float32 weights with llama.cpp's Q/K row permutation undone, llama3 rope scaling recovered."""

from __future__ import annotations

import math
import mmap
import re
from pathlib import Path
from typing import Any

import torch

from xqcli.errors import GGUFError, UnsupportedModelError
from xqcli.sources.gguf.reader import TensorInfo, short_float32

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# llama.cpp tensor names -> HF names ("blk.N." becomes "model.layers.N.").
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, baked into per-frequency factors by llama.cpp


def plan_model(kv: dict[str, Any], infos: list[TensorInfo], path: Path
               ) -> tuple[dict[str, Any], list[tuple[TensorInfo, str]]]:
    """The HF config, and each tensor paired with its HF name, after checking every name and shape."""
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: required metadata 'general.architecture' is missing or not a string")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def meta(key: str, kind: type, default: Any = None) -> Any:
        v = kv.get(f"{arch}.{key}", default)
        if v is None:
            raise GGUFError(f"{path}: required metadata '{arch}.{key}' is missing")
        ok = (isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 31) if kind is int else (
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf)
        if not ok:
            raise GGUFError(f"{path}: metadata '{arch}.{key}' has an invalid value {v!r}")
        return v

    if kv.get(f"{arch}.expert_count", 0):
        raise UnsupportedModelError(f"{path}: mixture-of-experts GGUF models are not supported")
    hidden, layers = meta("embedding_length", int), meta("block_count", int)
    heads = meta("attention.head_count", int)
    kv_heads = meta("attention.head_count_kv", int, heads)
    rope_dims = meta("rope.dimension_count", int, hidden // heads or 1)
    head_dim = meta("attention.key_length", int, rope_dims)
    if meta("attention.value_length", int, head_dim) != head_dim:
        raise UnsupportedModelError(f"{path}: key and value head sizes differ")
    if rope_dims != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings ({rope_dims} of {head_dim} dims) "
                                    "are not supported")
    if heads % kv_heads or head_dim % 2:
        raise GGUFError(f"{path}: inconsistent attention shape: {heads} heads, {kv_heads} kv heads, "
                        f"head size {head_dim}")
    if layers > len(infos):  # also bounds the per-layer loops below
        raise GGUFError(f"{path}: metadata says {layers} layers but the file has only {len(infos)} tensors")
    by_name = {t.name: t for t in infos}
    embed = by_name.get("token_embd.weight")
    if embed is None or len(embed.dims) != 2:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' is missing or not 2-D")
    vocab = embed.dims[1]
    has_bias = "blk.0.attn_q.bias" in by_name
    config: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length", int),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rope_theta": meta("rope.freq_base", float, 10000.0),
        "rope_scaling": _rope_scaling(kv, arch, path),
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon", float),
        "max_position_embeddings": meta("context_length", int),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in by_name,
        "attention_bias": has_bias,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "float32",
    }
    want = _expected_shapes(config)
    plan, unexpected, misshaped = [], [], []
    for t in infos:
        if t.name == ROPE_FREQS and arch == "llama":
            continue  # folded into config["rope_scaling"] once its values are read
        hf = _hf_name(t.name, layers)
        if hf is None or hf not in want:
            unexpected.append(repr(t.name))
        elif t.hf_shape != want[hf]:
            misshaped.append(f"{t.name!r} {list(t.hf_shape)} (expected {list(want[hf])})")
        else:
            plan.append((t, hf))
    missing = [m for m in sorted(set(want) - {hf for _, hf in plan})
               if not (m == "lm_head.weight" and config["tie_word_embeddings"])]
    for label, items in (("unexpected tensors", unexpected), ("tensors with wrong shapes", misshaped),
                         ("missing tensors", missing)):
        if items:
            shown = ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")
            raise GGUFError(f"{path}: {label} for a {arch} model: {shown}")
    if ROPE_FREQS in by_name and arch == "llama":
        plan.append((by_name[ROPE_FREQS], ROPE_FREQS))
    return config, plan


def _hf_name(name: str, layers: int) -> str | None:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(0|[1-9][0-9]*)\.(\w+\.\w+)", name)
    if m and int(m[1]) < layers and m[2] in _BLOCK_NAMES:
        return f"model.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}"
    return None


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kvd = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kvd, h),
                   p + "self_attn.v_proj.weight": (kvd, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i)}
        if cfg["attention_bias"]:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kvd,),
                       p + "self_attn.v_proj.bias": (kvd,)}
    return shapes


def _rope_scaling(kv: dict[str, Any], arch: str, path: Path) -> dict[str, Any] | None:
    kind = kv.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = kv.get(f"{arch}.rope.scaling.factor")
    if kind == "linear" and isinstance(factor, (int, float)) and 0 < factor < math.inf:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "linear":
        raise GGUFError(f"{path}: metadata '{arch}.rope.scaling.factor' is missing or invalid")
    raise UnsupportedModelError(f"{path}: rope scaling {kind!r} is not supported (supported: none, linear, "
                                "llama3)")


def read_tensors(buf: mmap.mmap, data_start: int, plan: list[tuple[TensorInfo, str]], config: dict[str, Any],
                 path: Path) -> dict[str, torch.Tensor]:
    """Dequantize to float32 and undo llama.cpp's Q/K row permutation (llama arch only)."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    for qtype in {GGMLQuantizationType(t.type_id) for t, _ in plan}:  # fail before the slow part
        try:
            dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except NotImplementedError:
            names = [t.name for t, _ in plan if t.type_id == qtype]
            raise GGUFError(f"{path}: tensor type {qtype.name} (of {names[0]}) is not supported") from None
    permute = config["model_type"] == "llama"
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors: dict[str, torch.Tensor] = {}
    for t, hf in plan:
        qtype = GGMLQuantizationType(t.type_id)
        block, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = t.dims[0] // block * type_size
        shape = t.hf_shape
        raw = np.frombuffer(buf, np.uint8, math.prod(shape[:-1]) * row_bytes, data_start + t.offset)
        with np.errstate(all="ignore"):  # garbage data is reported below, not as numpy warnings
            w = dequantize(raw.reshape(*shape[:-1], row_bytes), qtype).reshape(shape)
            total = w.sum(dtype=np.float64)  # float64 cannot overflow on finite float32 inputs
        if permute and ".q_proj." in hf:
            w = _unpermute(w, heads)
        elif permute and ".k_proj." in hf:
            w = _unpermute(w, kv_heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        if np.may_share_memory(w, raw):
            w = w.copy()  # F32 tensors come back as views of the mapped file
        del raw
        if not math.isfinite(total):
            raise GGUFError(f"{path}: tensor {t.name!r} contains NaN or infinite values")
        tensors[hf] = torch.from_numpy(w)
    if ROPE_FREQS in tensors:
        config["rope_scaling"] = _llama3_from_factors(tensors.pop(ROPE_FREQS), config, path)
    return tensors


def _unpermute(w: Any, n_heads: int) -> Any:
    """Inverse of llama.cpp's `LlamaModel.permute`: interleaved rotary pairs back to HF's rotate-half halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int) -> list[float]:
    """The per-frequency divisors llama.cpp stores as `rope_freqs` for HF's llama3 rope scaling."""
    old = original_max_position_embeddings
    low_wavelen, high_wavelen = old / low_freq_factor, old / high_freq_factor
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _llama3_from_factors(freqs: torch.Tensor, config: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """Recover HF's llama3 `rope_scaling` from llama.cpp's baked factors, checking it reproduces them.

    With low_freq_factor fixed at 1 the smoothing ramp is `a / wavelen - b`, linear in two unknowns, so
    two ramp points determine it; Llama 3.x's own values (8192, 1, 4) are tried first.
    """
    theta, head_dim = config["rope_theta"], config["head_dim"]
    f = [float(x) for x in freqs.flatten()]
    if len(f) != head_dim // 2:
        raise GGUFError(f"{path}: tensor 'rope_freqs.weight' has {len(f)} values, expected {head_dim // 2}")
    factor = short_float32(max(f))
    if all(abs(x - 1) < 1e-6 for x in f):
        return None
    candidates = [(1.0, 4.0, 8192)]
    ramp = [(2 * math.pi * theta ** (2 * i / head_dim), (factor / x - 1) / (factor - 1))
            for i, x in enumerate(f) if 1 + 1e-6 < x < factor * (1 - 1e-6)]
    if len(ramp) >= 2:
        (w1, s1), (w2, s2) = ramp[0], ramp[-1]
        if w1 != w2:
            a = (s1 - s2) / (1 / w1 - 1 / w2)
            b = a / w1 - s1
            if a > 0 and b > 0:
                candidates.append((1.0, round(1 + 1 / b, 4), round(a / b)))
    for low, high, old in candidates:
        want = llama3_rope_factors(theta, head_dim, factor, low, high, old)
        if all(math.isclose(x, y, rel_tol=1e-4) for x, y in zip(f, want)):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": old}
    raise UnsupportedModelError(f"{path}: tensor 'rope_freqs.weight' is not a llama3 rope scaling xq can express")

