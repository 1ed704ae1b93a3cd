"""Model configuration: the Llama-family facts xq needs, read from a Hugging Face `config.json`.

Only `llama`, `mistral` and `qwen2` are supported (SmolLM is `llama`). Everything is checked here,
before any weights are read, so an unsupported model fails fast and cheaply.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xqcli.errors import InputError, ModelError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DAMAGED_CONFIG = "the file is damaged: download the model again, or fix its JSON"


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as shipped by these families (`rope_scaling` in config.json)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of a Llama-family decoder (HF key names where they exist)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # Mistral: a query sees only the newest `sliding_window` keys

    @property
    def n_rep(self) -> int:
        """Query heads per kv head (the paper's g)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V) per token: d/g in the paper."""
        return self.num_key_value_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def is_gqa(self) -> bool:
        return self.num_key_value_heads < self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Build from an HF config dict, dropping keys we do not use and checking the rest."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
                hint="xq implements Llama-family decoders: Llama, Mistral, Qwen2, SmolLM",
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            kv_heads = int(raw.get("num_key_value_heads") or heads)
            head_dim = int(raw.get("head_dim") or hidden // heads)
            cfg = cls(
                model_type=model_type,
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                vocab_size=int(raw["vocab_size"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(raw, source)),
                rope_scaling=_rope_scaling(raw, source),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases; its configs do not say so.
                attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=_as_list(raw.get("eos_token_id")),
                sliding_window=_sliding_window(raw, model_type, source),
            )
        except KeyError as e:
            raise ModelError(f"{source}: required key {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            raise ModelError(f"{source}: bad value ({e})") from None
        cfg._check(source)
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: not a readable JSON config ({e})", hint=DAMAGED_CONFIG) from None
        if not isinstance(raw, dict):
            raise ModelError(f"{path}: expected a JSON object", hint=DAMAGED_CONFIG)
        return cls.from_dict(raw, source=str(path))

    def _check(self, source: str) -> None:
        positive = {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
        }
        bad = [k for k, v in positive.items() if v <= 0]
        if bad:
            raise ModelError(f"{source}: {', '.join(bad)} must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ModelError(f"{source}: head_dim {self.head_dim} must be even for RoPE")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ModelError(f"{source}: rms_norm_eps and rope_theta must be positive")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ModelError(f"{source}: sliding_window must be a positive number of tokens or null")

    def to_dict(self) -> dict[str, Any]:
        """HF-compatible dict (round-trips through `from_dict`)."""
        d = asdict(self)
        d["rope_scaling"] = None if self.rope_scaling.rope_type == "default" else asdict(self.rope_scaling)
        if self.sliding_window is None:  # absent, as in bundles written before the key existed
            del d["sliding_window"]
        return d


def _as_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _sliding_window(raw: dict[str, Any], model_type: str, source: str) -> int | None:
    """Mistral's attention window as HF applies it: every layer, when `sliding_window` is set.

    Llama has none. Qwen2 configs carry a `sliding_window` that HF ignores unless `use_sliding_window`
    is true, and then only for layers >= `max_window_layers`: that mixed form is refused."""
    if model_type == "mistral":
        w = raw.get("sliding_window")
        return None if w is None else int(w)
    if model_type == "qwen2" and raw.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: Qwen2 sliding-window attention (use_sliding_window: true) "
                                    "is not supported", hint="released Qwen2/2.5 models have it off")
    return None


def _section(raw: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    """An optional object-valued key (`rope_scaling`, `rope_parameters`); anything but an object is refused."""
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ModelError(f"{source}: {key} must be an object such as {{\"rope_type\": \"linear\", \"factor\": 2.0}} "
                         f"(got {value!r:.60})")
    return value


def _rope_theta(raw: dict[str, Any], source: str) -> float:
    # transformers 5.x writes `rope_parameters: {rope_theta, rope_type, ...}` instead of top-level keys.
    return raw.get("rope_theta", _section(raw, "rope_parameters", source).get("rope_theta", 10000.0))


def _rope_scaling(raw: dict[str, Any], source: str) -> RopeScaling:
    rs = _section(raw, "rope_scaling", source) or _section(raw, "rope_parameters", source)
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: rope scaling {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return RopeScaling()
    return RopeScaling(
        rope_type=rope_type,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )
