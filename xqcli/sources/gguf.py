"""Read a llama.cpp `.gguf` file as a Hugging Face style model: config dict, float32 tensors, tokenizer.

The header is parsed here rather than with `gguf.GGUFReader`: that reader trusts every declared length
(a corrupt count can make it allocate or loop for a very long time) and builds one numpy array per
vocabulary entry (2 s for SmolLM2's header). This parser checks each count and length against the bytes
left in the file, so a corrupt or truncated file fails in milliseconds with a one-line `GGUFError`.
The `gguf` package still supplies the tensor type table and the dequantizers (an optional extra).
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xqcli.fileio import sha256_file
from xqcli.errors import GGUFError, MissingDependencyError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_TOKENIZERS = ("gpt2", "llama")

_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# GGUF metadata value types: scalar id -> (struct format, numpy dtype for arrays)
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
    6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4  # arrays of arrays; real files never nest

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
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, baked into per-frequency factors by llama.cpp

# Pre-tokenizer split patterns for `tokenizer.ggml.pre` values whose merges were learned on them
# (the patterns of the original tokenizer.json files); anything else uses GPT-2's, as transformers does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@dataclass
class GGUFModel:
    """A GGUF file in Hugging Face terms: what a model folder would hold, already in memory."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer_json: str
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]
    sha256: str


@dataclass
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the contiguous (input) axis
    type_id: int
    offset: int  # from the start of the data section

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


def load_gguf(path: str | Path) -> GGUFModel:
    """Parse, check and dequantize a llama/qwen2 GGUF; every problem with the file is a GGUFError."""
    try:
        import gguf.quants  # noqa: F401  (brings numpy)
    except ImportError:
        raise MissingDependencyError("reading .gguf files needs the 'gguf' extra: pip install 'xqcli[gguf]'") from None
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < _HEADER.size:
                raise GGUFError(f"{path}: not a GGUF file (only {size} bytes)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read the file ({e.strerror or e})") from None
    try:
        kv, infos, data_start = _read_header(buf, size, path)
        config, plan = _plan_model(kv, infos, path)
        tensors = _read_tensors(buf, data_start, plan, config, path)
        tokenizer_json, tokenizer_config, generation_config = _tokenizer(kv, config, path)
    except (struct.error, ValueError, IndexError, KeyError, TypeError, OverflowError, ZeroDivisionError,
            MemoryError) as e:
        # Every check above should come first; this keeps a missed one a clean error, not a traceback.
        raise GGUFError(f"{path}: malformed GGUF file ({type(e).__name__}: {_one_line(e)})") from None
    return GGUFModel(config, tensors, tokenizer_json, tokenizer_config, generation_config, sha256_file(path))


def write_hf_folder(model: GGUFModel, out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write config.json, model.safetensors and the tokenizer files: a folder transformers and xq both load."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(model.config, torch_dtype=str(dtype).removeprefix("torch."))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tensors = {k: v.to(dtype).contiguous() for k, v in model.tensors.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(model, out_dir)


def write_tokenizer_files(model: GGUFModel, out_dir: Path) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json, as an HF folder has them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(model.tokenizer_json, encoding="utf-8")
    for name, data in (("tokenizer_config.json", model.tokenizer_config),
                       ("generation_config.json", model.generation_config)):
        (out_dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- header


class _Cursor:
    """Bounds-checked reads from the mapped file: no declared length is trusted past the file's end."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path) -> None:
        self.buf, self.end, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: truncated or corrupt GGUF header: {what} at byte {self.pos} "
                         f"runs past the end of the {self.end}-byte file")

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise self.fail(what)

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        try:
            s = str(self.buf[self.pos:self.pos + n], "utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: corrupt GGUF header: {what} at byte {self.pos} is not UTF-8") from None
        self.pos += n
        return s

    def strings(self, count: int, what: str) -> list[str]:
        # The hot loop of the header (two ~50k-entry vocab arrays), hence the locals.
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        out = []
        append = out.append
        try:
            for _ in range(count):
                if pos + 8 > end:
                    break
                (n,) = unpack(buf, pos)
                pos += 8
                if n > end - pos:
                    break
                append(str(buf[pos:pos + n], "utf-8"))
                pos += n
        except UnicodeDecodeError:
            self.pos = pos
            raise GGUFError(f"{self.path}: corrupt GGUF header: entry {len(out)} of {what} at byte {pos} "
                            "is not UTF-8") from None
        self.pos = pos
        if len(out) < count:
            raise self.fail(f"entry {len(out)} of {what}")
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype][0]
            n = struct.calcsize(fmt)
            self.need(n, what)
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
            self.pos += n
            # float32 values read back as their shortest decimal (1e-05, not 9.999999747378752e-06)
            return _short_float32(v) if vtype == _FLOAT32 else v
        if vtype == _ARRAY and depth < _MAX_NESTING:
            itype, count = self.u32(what), self.u64(what)
            if itype in _SCALARS:
                import numpy as np

                dtype = np.dtype(_SCALARS[itype][1])
                self.need(count * dtype.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return arr.tolist()
            if itype == _STRING:
                self.need(count * 8, what)
                return self.strings(count, what)
            if itype == _ARRAY:
                self.need(count * 12, what)
                return [self.value(_ARRAY, what, depth + 1) for _ in range(count)]
            raise GGUFError(f"{self.path}: corrupt GGUF header: {what} has unknown array item type {itype}")
        raise GGUFError(f"{self.path}: corrupt GGUF header: {what} has unknown value type {vtype}")


def _short_float32(v: float) -> float:
    import numpy as np

    return float(str(np.float32(v)))  # numpy prints the shortest decimal that round-trips


def _read_header(buf: mmap.mmap, size: int, path: Path) -> tuple[dict[str, Any], list[_TensorInfo], int]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    magic, version, n_tensors, n_kv = _HEADER.unpack_from(buf, 0)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    if version not in (2, 3):
        if struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
            raise GGUFError(f"{path}: big-endian GGUF files are not supported")
        raise GGUFError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    # Every metadata entry takes at least 13 bytes, every tensor record at least 32.
    if n_kv > (size - _HEADER.size) // 13:
        raise GGUFError(f"{path}: corrupt GGUF header: {n_kv} metadata entries cannot fit in {size} bytes")
    if n_tensors > (size - _HEADER.size) // 32:
        raise GGUFError(f"{path}: corrupt GGUF header: {n_tensors} tensors cannot fit in {size} bytes")
    cur = _Cursor(buf, size, path)
    cur.pos = _HEADER.size
    kv: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in kv:
            raise GGUFError(f"{path}: corrupt GGUF header: metadata key {key!r} appears twice")
        kv[key] = cur.value(cur.u32(f"type of metadata {key!r}"), f"metadata {key!r}")
    infos: list[_TensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFError(f"{path}: corrupt GGUF header: tensor {name!r} has {n_dims} dimensions")
        dims = tuple(cur.u64(f"tensor {name!r}") for _ in range(n_dims))
        type_id, offset = cur.u32(f"tensor {name!r}"), cur.u64(f"tensor {name!r}")
        if name in names:
            raise GGUFError(f"{path}: corrupt GGUF header: tensor {name!r} appears twice")
        names.add(name)
        infos.append(_TensorInfo(name, dims, type_id, offset))
    alignment = kv.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: corrupt GGUF header: general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    for t in infos:
        try:
            qtype = GGMLQuantizationType(t.type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(f"{path}: tensor {t.name!r} has unknown tensor type {t.type_id}") from None
        if 0 in t.dims or t.dims[0] % block:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {list(t.dims)}, impossible for {qtype.name} "
                            f"(rows must be a positive multiple of {block})")
        if t.offset % alignment:
            raise GGUFError(f"{path}: tensor {t.name!r} data offset {t.offset} is not {alignment}-byte aligned")
        nbytes = math.prod(t.dims) // block * type_size
        if data_start + t.offset + nbytes > size:
            raise GGUFError(f"{path}: tensor {t.name!r} data ({nbytes} bytes at {data_start + t.offset}) runs past "
                            f"the end of the {size}-byte file (truncated download?)")
    return kv, infos, data_start


# ---------------------------------------------------------------- config and tensors


def _plan_model(kv: dict[str, Any], infos: list[_TensorInfo], path: Path
                ) -> tuple[dict[str, Any], list[tuple[_TensorInfo, str]]]:
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
        if t.name == _ROPE_FREQS and arch == "llama":
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
    if _ROPE_FREQS in by_name and arch == "llama":
        plan.append((by_name[_ROPE_FREQS], _ROPE_FREQS))
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


def _read_tensors(buf: mmap.mmap, data_start: int, plan: list[tuple[_TensorInfo, str]], config: dict[str, Any],
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
    if _ROPE_FREQS in tensors:
        config["rope_scaling"] = _llama3_from_factors(tensors.pop(_ROPE_FREQS), config, path)
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
    factor = _short_float32(max(f))
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


# ---------------------------------------------------------------- tokenizer


def _tokenizer(kv: dict[str, Any], config: dict[str, Any], path: Path
               ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """tokenizer.json text, tokenizer_config and generation_config; fills the config's bos/eos ids."""
    kind = kv.get("tokenizer.ggml.model")
    tokens = kv.get("tokenizer.ggml.tokens")
    if not isinstance(kind, str):
        raise GGUFError(f"{path}: required metadata 'tokenizer.ggml.model' is missing")
    if kind not in SUPPORTED_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer model {kind!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_TOKENIZERS)})")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{path}: required metadata 'tokenizer.ggml.tokens' is missing or not a string list")
    if len(tokens) > config["vocab_size"]:
        raise GGUFError(f"{path}: the tokenizer has {len(tokens)} tokens but the embedding only "
                        f"{config['vocab_size']} rows")
    types = kv.get("tokenizer.ggml.token_type", [])
    if not isinstance(types, list) or len(types) not in (0, len(tokens)):
        raise GGUFError(f"{path}: metadata 'tokenizer.ggml.token_type' does not match the token list")

    def token_id(key: str, strict: bool) -> int | None:
        v = kv.get(f"tokenizer.ggml.{key}")
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens):
            return v
        if v is not None and strict:
            raise GGUFError(f"{path}: metadata 'tokenizer.ggml.{key}' = {v!r} is not a token id")
        return None

    bos, eos = token_id("bos_token_id", True), token_id("eos_token_id", True)
    unk, pad = token_id("unknown_token_id", False), token_id("padding_token_id", False)
    eot = token_id("eot_token_id", False)
    if kind == "gpt2":
        backend = _byte_level_bpe(kv, tokens, types, path)
    else:
        backend = _sentencepiece_bpe(kv, tokens, types, unk, path)
    add_bos = kv.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default for SPM vocabs
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "unk_token": tokens[unk] if unk is not None else None,
        "pad_token": tokens[pad] if pad is not None else None,
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(kv.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = kv.get("tokenizer.chat_template")
    if isinstance(template, str):
        tokenizer_config["chat_template"] = template
    config["bos_token_id"], config["eos_token_id"] = bos, eos
    stops = list(dict.fromkeys(i for i in (eos, eot) if i is not None))  # chat models stop on either
    generation_config = {"bos_token_id": bos, "eos_token_id": stops[0] if len(stops) == 1 else stops or None}
    if pad is not None:
        generation_config["pad_token_id"] = pad
    return backend.to_str(), tokenizer_config, generation_config


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merge_pairs(merges: Any, path: Path) -> list[tuple[str, str]]:
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise GGUFError(f"{path}: metadata 'tokenizer.ggml.merges' is not a string list")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise GGUFError(f"{path}: metadata 'tokenizer.ggml.merges' has a malformed entry {bad!r}")
    return pairs  # type: ignore[return-value]


def _build(path: Path, make: Callable[[], Any]) -> Any:
    """Run a tokenizers constructor; its Rust errors (e.g. a merge of unknown tokens) become GGUFErrors."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception)
        raise GGUFError(f"{path}: the GGUF tokenizer is inconsistent ({_one_line(e)})") from None


def _byte_level_bpe(kv: dict[str, Any], tokens: list[str], types: list[int], path: Path) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    b2u = _bytes_to_unicode()
    alphabet = set(b2u.values())
    # A token stored in plain text rather than the byte alphabet is respelled, as transformers does.
    spelled = [t if set(t) <= alphabet else "".join(b2u[b] for b in t.encode("utf-8")) for t in tokens]
    merges = _merge_pairs(kv.get("tokenizer.ggml.merges"), path)
    tk = _build(path, lambda: Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges)))
    split = _PRE_SPLITS.get(kv.get("tokenizer.ggml.pre"))
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                             use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a llama.cpp mislabel; adding it would grow the vocab.
    _add_tokens(tk, tokens, types, keep=lambda t: set(t) <= alphabet)
    return tk


def _sentencepiece_bpe(kv: dict[str, Any], tokens: list[str], types: list[int], unk: int | None,
                       path: Path) -> Any:
    """Llama/Mistral-style SentencePiece BPE with byte fallback; merges come from the scores when absent."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in kv:
        merges = _merge_pairs(kv["tokenizer.ggml.merges"], path)
    else:
        scores = kv.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise GGUFError(f"{path}: a sentencepiece tokenizer needs 'tokenizer.ggml.scores' or merges")
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk_token = tokens[unk] if unk is not None else None
    tk = _build(path, lambda: Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk_token,
                                                   fuse_unk=True, byte_fallback=True)))
    prefix = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _add_tokens(tk, tokens, types, keep=lambda t: True)
    return tk


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocab pieces, best score first (what sentencepiece BPE merges)."""
    found = []
    for token, score in scores.items():
        if len(token) > 1024:  # no real piece is this long; splitting it would cost len**2
            continue
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        found += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _add_tokens(tk: Any, tokens: list[str], types: list[int], keep: Callable[[str], bool]) -> None:
    """Control tokens (e.g. <|im_start|>) become special; user-defined ones match whole but stay text."""
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
               if k == _CONTROL and keep(t)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
            if k == _USER_DEFINED and keep(t)]
    if control:
        tk.add_special_tokens(control)
    if user:
        tk.add_tokens(user)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())

