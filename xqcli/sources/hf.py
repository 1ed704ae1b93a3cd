"""Read a Hugging Face model folder: config.json and one or many safetensors shards.

Weights are only ever read with safetensors (no pickle). Every missing, unexpected and mis-shaped
key is collected and reported in one error, so a user fixes a broken checkpoint in one go.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from xqcli.errors import InputError, ModelError, WeightsError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise InputError(f"unknown dtype {name!r} (choose from float32, float16, bfloat16)") from None


def check_model_folder(folder: Path) -> Path:
    """The folder's config.json path, or a clear error when the folder is not a model folder."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder} does not exist", hint="pass a model folder, a .gguf file or an HF id org/name")
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder or a .gguf file")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelError(f"{folder} has no config.json", hint="point at a Hugging Face model folder")
    return cfg


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files named by the index, or the single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{index}: unreadable index ({e})") from None
        for n in names:
            if Path(n).name != n:
                raise WeightsError(f"{index}: shard name {n!r} must be a plain file name")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise WeightsError(f"{folder}: missing shard(s) {', '.join(missing)} named in {index.name}")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise WeightsError(f"{folder}: only pickle weights (.bin/.pt) found; xq reads safetensors only",
                           hint="convert the checkpoint to safetensors first")
    raise WeightsError(f"{folder}: no model.safetensors or model.safetensors.index.json",
                       hint="copy or download the model's *.safetensors weights into it too, or pass a .gguf file")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"{f}: cannot read safetensors ({e})", hint="the file is truncated or corrupt; "
                               "download or convert it again") from None
    return out
