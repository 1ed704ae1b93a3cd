"""Open any model source xq accepts (HF folder, `.gguf`, HF id, xq bundle) as a ready model, tokenizer
and artifacts, and build caches for it: the one place a source becomes runtime objects."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.bundle.projections import LayerProjections
from xqcli.cache.base import LayerWeights, ModelCache, ModelParts
from xqcli.cache.factory import build_cache
from xqcli.cache.spec import CacheSpec
from xqcli.config import ModelConfig
from xqcli.errors import BundleError, ModelError, WeightsError, XQError
from xqcli.model import Transformer
from xqcli.sources.hf import IGNORED_SUFFIXES, check_model_folder, parse_dtype, read_safetensors, shard_files
from xqcli.sources.hub import Source, resolve

if TYPE_CHECKING:
    from xqcli.bundle.format import Bundle
    from xqcli.tokenizer import Tokenizer


@dataclass
class Loaded:
    """A loaded model with its tokenizer folder and artifacts; pass `artifacts` to every cache built on it."""

    model: Transformer
    tokenizer_dir: Path  # folder holding tokenizer.json and friends
    source: Source  # kind "bundle" for an xq bundle folder
    bundle: Bundle | None = None
    artifacts: Artifacts = field(default_factory=Artifacts)  # a bundle's, else SVD factors computed on demand

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def make_cache(self, spec: CacheSpec | str, batch: int, max_len: int, *, device: torch.device | None = None,
                   kernels: str = "auto") -> ModelCache:
        """`make_cache` with this model's artifacts."""
        return make_cache(self.model, spec, batch, max_len, artifacts=self.artifacts, device=device,
                          kernels=kernels)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer, checked against the weights; a damaged tokenizer file of a bundle is a bundle problem
        (exit 4), not a source's."""
        from xqcli.tokenizer import Tokenizer

        error = BundleError if self.bundle is not None else ModelError
        tok = Tokenizer.from_folder(self.tokenizer_dir, error=error)
        check_vocab(tok, self.config, self.source.describe(), error)
        return tok


def check_vocab(tok: Tokenizer, cfg: ModelConfig, source: str, error: type[XQError] = ModelError) -> None:
    """A tokenizer whose vocabulary is larger than the embedding belongs to another model: refused when the source
    is opened, before its ids fail deep in a forward pass (an IndexError on the CPU, a device-side assert on a GPU).
    Added special tokens are not counted: some models add one past their embedding (a pad token) and run fine as
    long as it is never fed; an id beyond the vocabulary in a prompt is refused when it is encoded."""
    if tok.base_vocab_size > cfg.vocab_size:
        raise error(f"{source}: the tokenizer has {tok.base_vocab_size:,} tokens but the model's vocab_size is "
                    f"{cfg.vocab_size:,}: the tokenizer does not match the weights",
                    hint="use the tokenizer.json and tokenizer_config.json of the model the weights come from")


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
        from xqcli.sources.gguf import load_gguf, write_tokenizer_files

        g = load_gguf(source.path)
        cfg = ModelConfig.from_dict(g.config, source=str(source.path))
        model = build_model(cfg, g.tensors, dtype=dt, device=dev, source=str(source.path))
        tok_dir = Path(tempfile.mkdtemp(prefix="xq-gguf-tok-"))
        write_tokenizer_files(g, tok_dir)
        return Loaded(model, tok_dir, source)
    if source.kind == "folder":
        from xqcli.bundle.format import is_bundle, open_bundle

        if is_bundle(source.path):  # weights as any HF folder, plus the stored projections (no SVD)
            bundle = open_bundle(source.path)
            try:
                model = load_hf_folder(source.path, dtype=dt, device=dev)
            except ModelError as e:  # the bundle's weights: a bundle problem
                raise BundleError(str(e), hint=e.hint) from None
            return Loaded(model, source.path, replace(source, kind="bundle"), bundle, Artifacts.from_bundle(bundle))
    return Loaded(load_hf_folder(source.path, dtype=dt, device=dev), source.path, source)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", source: str = "weights") -> Transformer:
    """Check every key and shape, then assign the tensors (cast to `dtype`) into a fresh model."""
    want = expected_shapes(cfg)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints carry a copy
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    misshaped = sorted(f"{k} {tuple(tensors[k].shape)} != {want[k]}" for k in set(want) & set(tensors)
                       if tuple(tensors[k].shape) != want[k])
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise WeightsError(f"{source}: weights do not match config.json: " + "; ".join(parts))
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    _check_finite(state, tensors, source)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def _check_finite(state: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str) -> None:
    """NaN or Inf in a weight (or a value the dtype cast overflowed) would only ever produce garbage text."""
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return

    def where(k: str) -> str:
        was, now = (str(t.dtype).removeprefix("torch.") for t in (given[k], state[k]))
        return k if was == now else f"{k} ({was} -> {now})"

    shown = ", ".join(map(where, bad[:4])) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
    raise WeightsError(f"{source}: weights hold NaN or Inf values (not finite): {shown}",
                       hint="the checkpoint is damaged, or its values overflow this dtype (try float32 or bfloat16)")


def load_hf_folder(folder: Path, *, dtype: str | torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Transformer:
    """Config first (fails before reading weights), then the shards."""
    folder = Path(folder)
    cfg = ModelConfig.from_file(check_model_folder(folder))
    tensors = read_safetensors(shard_files(folder))
    return build_model(cfg, tensors, dtype=parse_dtype(dtype), device=device, source=str(folder))


def model_parts(model: Transformer) -> ModelParts:
    """What a cache needs from `model`: its config, each layer's K/V weights (the model's own tensors), RoPE, dtype."""
    attns = [layer.self_attn for layer in model.layers]
    weights = [LayerWeights(a.k_proj.weight, a.k_proj.bias, a.v_proj.weight, a.v_proj.bias) for a in attns]
    return ModelParts(model.config, weights, model.rope, model.dtype)


def model_projections(model: Transformer, artifacts: Artifacts) -> list[LayerProjections]:
    """The SVD factors the caches of `model` use, in its dtype (computed now if `artifacts` has none yet)."""
    return artifacts.projections(model_parts(model).layers, model.dtype)


def make_cache(model: Transformer, spec: CacheSpec | str, batch: int, max_len: int, *,
               artifacts: Artifacts | None = None, device: torch.device | str | None = None,
               kernels: str = "auto") -> ModelCache:
    """A cache of any kind for `model`: the one entry point callers use (see `xqcli.cache.factory`).

    Pass the model's `artifacts` (`Loaded.artifacts`) when building more than one cache: without it a
    fresh one is made, so latent caches run the SVDs again and `+rot` rotates by the default, not the bundle's."""
    if isinstance(spec, str):
        spec = CacheSpec.parse(spec)
    artifacts = artifacts if artifacts is not None else Artifacts()
    return build_cache(spec, model_parts(model), batch, max_len, device=device if device is not None else model.device,
                       artifacts=artifacts, kernels=kernels)


def measured_bytes_per_token(model: Transformer, spec: CacheSpec, *, artifacts: Artifacts | None = None,
                             n: int = 8192) -> tuple[float, int, float]:
    """(payload+scales per token, fixed bytes, workspace per token) past the window, measured from the
    storage a window-less cache of n tokens allocates on the meta device (no memory, no SVD)."""
    spec = replace(spec, window=0) if spec.method != "kv" else spec
    a = make_cache(model, spec, 1, n, artifacts=artifacts, device=torch.device("meta")).allocated()
    return (a.payload + a.scales) / n, a.fp_window, a.workspace / n
