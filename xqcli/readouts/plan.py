"""Memory planning: bytes per token of every cache kind, measured from real (meta-device) caches.

Caches are allocated on PyTorch's meta device, which records shapes and dtypes without memory, so
a 128k-token Llama-3.1-8B cache is "allocated" for free and its bytes come from the same code that
allocates real caches. The paper's formula (bits + 32/g bits per element, docs/design.md §7) is shown
beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from xqcli.cache.spec import CacheSpec, kv_bytes_per_token, uses_latents
from xqcli.config import ModelConfig
from xqcli.errors import InputError, ResourceError
from xqcli.load import measured_bytes_per_token
from xqcli.model import Transformer

SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5,
                       max_position_embeddings=4096),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-5, max_position_embeddings=32768),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                         tie_word_embeddings=True),
}
# Default kind lists: `xq plan` is free (meta-device caches), so it shows every method at every width;
# `xq bench` times each kind at each context, so it runs one representative per method and two xquant widths.
PLAN_KINDS = ("kv", "kivi-4", "kivi-3", "kivi-2", "xquant-8", "xquant-4", "xquant-3", "xquant-2",
              "xquant-cl-4", "xquant-cl-3", "xquant-cl-2")
BENCH_KINDS = ("kv", "kivi-4", "xquant-4", "xquant-2", "xquant-cl-3")


def shape_config(name: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(SHAPES[name.lower()], source=f"shape {name}")
    except KeyError:
        raise InputError(f"unknown shape {name!r} (known: {', '.join(SHAPES)})") from None


def parse_kinds(text: str | list[str] | tuple[str, ...], option: str = "--cache") -> list[str]:
    """Canonical cache kind names, in order, without duplicates ('kv, xquant-4' or a list)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for k in items:
        if k.strip():
            name = CacheSpec.parse(k).name
            if name not in out:
                out.append(name)
    if not out:
        raise InputError(f"{option} is empty", hint=f"e.g. {option} {','.join(BENCH_KINDS)}")
    return out


def meta_model(cfg: ModelConfig, dtype: torch.dtype = torch.float16) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg).to(dtype)


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype = torch.float16) -> int:
    return sum(p.numel() * p.element_size() for p in meta_model(cfg, dtype).parameters())


@dataclass
class PlanRow:
    kind: str
    bytes_per_token: float  # measured: payload + scales of a real (meta) cache, per token
    paper_bytes_per_token: float  # the paper's accounting: (bits + 32/g)/8 per cached element
    ratio: float  # fp16 KV bytes / this (compression factor)
    normalized: float  # this / fp16 KV (the paper's "KV" column)
    fixed_bytes: int  # per sequence, independent of length: fp window and per-channel residual
    workspace_bytes_per_token: float  # transient (XQuant-CL accumulator), not counted in the ratio
    max_context: int | None  # for the budget, if one was given


def paper_bytes_per_token(cfg: ModelConfig, spec: CacheSpec) -> float:
    """docs/design.md §7: e-bit payload plus one fp16 scale and zero per group (32/g bits per element)."""
    if spec.method == "kv":
        return kv_bytes_per_token(cfg)
    L, kv, d = cfg.num_hidden_layers, cfg.kv_dim, cfg.hidden_size
    g = spec.group_size
    per = lambda bits, width: width * (bits + 32 / g) / 8  # noqa: E731
    bits = spec.bits or 16
    if spec.method == "kivi":
        return L * per(bits, 2 * kv)
    width = 2 * kv if uses_latents(cfg) else d
    if spec.method == "xquant":
        return L * per(bits, width)
    base = min(spec.base_layers, L)
    return base * per(spec.base_bits, width) + (L - base) * per(bits, width)


def plan(cfg: ModelConfig, kinds: list[str], *, budget: int | None = None, include_weights: bool = True,
         dtype: torch.dtype = torch.float16, group_size: int = 128, base_layers: int = 3) -> list[PlanRow]:
    model = meta_model(cfg, dtype)
    kv_bpt = kv_bytes_per_token(cfg, torch.empty(0, dtype=dtype).element_size())
    weights = weight_bytes(cfg, dtype) if include_weights else 0
    if budget is not None and budget <= weights:
        raise ResourceError(f"the budget ({budget / 2**30:.2f} GiB) is not larger than the weights "
                            f"({weights / 2**30:.2f} GiB)", hint="raise --budget or pass --no-weights")
    rows = []
    for k in kinds:
        spec = CacheSpec.parse(k, group_size=group_size, base_layers=base_layers)
        bpt, fixed, ws = measured_bytes_per_token(model, spec)
        ctx = None
        if budget is not None:
            ctx = max(0, int((budget - weights - fixed) // (bpt + ws)))
        rows.append(PlanRow(spec.name, bpt, paper_bytes_per_token(cfg, spec), kv_bpt / bpt, bpt / kv_bpt,
                            fixed, ws, ctx))
    return rows


def config_for(target: str) -> tuple[ModelConfig, str]:
    """A named shape, a model folder or a bundle folder (its config.json)."""
    if target.lower() in SHAPES:
        return shape_config(target), f"shape {target.lower()}"
    p = Path(target)
    if p.is_dir() and (p / "config.json").is_file():
        return ModelConfig.from_file(p / "config.json"), str(p)
    if p.is_file() and p.suffix == ".json":
        return ModelConfig.from_dict(json.loads(p.read_text()), source=str(p)), str(p)
    raise InputError(f"{target}: not a named shape ({', '.join(SHAPES)}) nor a folder with config.json")
