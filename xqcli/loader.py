"""Open any model source xq accepts (HF folder, `.gguf`, HF id) as a ready model plus tokenizer."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from xqcli.config import ModelConfig
from xqcli.hub import Source, resolve
from xqcli.model import Transformer
from xqcli.weights import build_model, load_hf_folder, parse_dtype

if TYPE_CHECKING:
    from xqcli.bundle import Bundle


@dataclass
class Loaded:
    model: Transformer
    tokenizer_dir: Path  # folder holding tokenizer.json and friends
    source: Source  # kind "bundle" for an xq bundle folder
    bundle: Bundle | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def tokenizer(self):  # -> xqcli.tokenizer.Tokenizer
        from xqcli.tokenizer import Tokenizer

        return Tokenizer.from_folder(self.tokenizer_dir)


def pick_device(device: str | None) -> torch.device:
    """`auto` (or None) means the first CUDA GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from xqcli.errors import InputError

        raise InputError(f"--device {device}: no CUDA device is available here", hint="use --device cpu")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 matmuls are ~5x slower than fp32 on CPUs; GPUs want bf16.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load(src: str | Path, *, dtype: str | torch.dtype | None = None, device: str | None = None,
         revision: str | None = None, token: str | None = None, offline: bool | None = None) -> Loaded:
    dev = pick_device(device)
    dt = parse_dtype(dtype) if dtype is not None else default_dtype(dev)
    source = resolve(str(src), revision=revision, token=token, offline=offline)
    if source.kind == "gguf":
        from xqcli.gguf import load_gguf, write_tokenizer_files

        g = load_gguf(source.path)
        cfg = ModelConfig.from_dict(g.config, source=str(source.path))
        model = build_model(cfg, g.tensors, dtype=dt, device=dev, source=str(source.path))
        tok_dir = Path(tempfile.mkdtemp(prefix="xq-gguf-tok-"))
        write_tokenizer_files(g, tok_dir)
        return Loaded(model, tok_dir, source)
    if source.kind == "folder":
        from xqcli.bundle import is_bundle, open_bundle

        if is_bundle(source.path):  # weights as any HF folder, plus the stored projections (no SVD)
            bundle = open_bundle(source.path)
            model = load_hf_folder(source.path, dtype=dt, device=dev)
            bundle.install(model)
            return Loaded(model, source.path, replace(source, kind="bundle"), bundle)
    return Loaded(load_hf_folder(source.path, dtype=dt, device=dev), source.path, source)
