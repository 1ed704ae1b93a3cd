"""Read a llama.cpp `.gguf` file as a Hugging Face style model: config dict, float32 tensors, tokenizer.

The stages: `reader` parses and bounds-checks the header, `tensors` maps metadata and tensors to HF
names, config and float32 weights, `tokenizer` rebuilds tokenizer.json. The `gguf` package supplies
only the tensor type table and the dequantizers (an optional extra).
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xqcli.errors import GGUFError, MissingDependencyError
from xqcli.fileio import sha256_file
from xqcli.sources.gguf.reader import DAMAGED_HINT, HEADER, NOT_GGUF_HINT, one_line, read_header
from xqcli.sources.gguf.tensors import (
    HF_ARCHITECTURES,
    SUPPORTED_ARCHITECTURES,
    llama3_rope_factors,
    plan_model,
    read_tensors,
)
from xqcli.sources.gguf.tokenizer import SUPPORTED_TOKENIZERS, build_tokenizer

__all__ = [
    "HF_ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TOKENIZERS",
    "GGUFModel",
    "llama3_rope_factors",
    "load_gguf",
    "write_hf_folder",
    "write_tokenizer_files",
]


@dataclass
class GGUFModel:
    """A GGUF file in Hugging Face terms: what a model folder would hold, already in memory."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer_json: str
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]
    sha256: str


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
            if size < HEADER.size:
                raise GGUFError(f"{path}: not a GGUF file (only {size} bytes)", hint=NOT_GGUF_HINT)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read the file ({e.strerror or e})") from None
    try:
        kv, infos, data_start = read_header(buf, size, path)
        config, plan = plan_model(kv, infos, path)
        tensors = read_tensors(buf, data_start, plan, config, path)
        tokenizer_json, tokenizer_config, generation_config = build_tokenizer(kv, config, path)
    except (struct.error, ValueError, IndexError, KeyError, TypeError, OverflowError, ZeroDivisionError,
            MemoryError) as e:
        # Every check above should come first; this keeps a missed one a clean error, not a traceback.
        raise GGUFError(f"{path}: malformed GGUF file ({type(e).__name__}: {one_line(e)})",
                        hint=DAMAGED_HINT) from None
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
