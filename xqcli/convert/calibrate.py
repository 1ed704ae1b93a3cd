"""Calibration at convert time: per-layer statistics and clip ratios for the bundle.

Calibration text goes through the model in fp32 and each layer's post-norm input X is captured (the
output of `input_layernorm`: exactly what the caches store). Per layer we record:

- X statistics (mean |X|, max |X|, the channels with the largest |X|) and, for grouped-query models,
  the same for the latents X·U_k and X·U_v plus the energy fraction of latent channel 0 of X·U_k
  (the outlier channel of arXiv 2508.10395 §3.3.1);
- for `xquant` and `kivi` at 2/3/4/8 bits, the clip ratio from `CLIP_GRID` that minimizes the relative
  Frobenius error of the rebuilt K and V (streams quantized exactly as the caches do: group 128,
  per-channel keys / latents X·U_k, per-token values / X·U_v / X), and that error.

The runtime applies the clip ratios only when asked (`xq eval --calibrated`); `xq inspect` shows the rest.
XQuant-CL deltas are not calibrated (their statistics depend on the accumulator, not on X alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.bundle.calibrated import CALIBRATED_METHODS
from xqcli.bundle.format import CALIBRATION_VERSION
from xqcli.bundle.projections import LayerProjections
from xqcli.cache.spec import BITS, uses_latents
from xqcli.errors import InputError
from xqcli.kernels.quant import QuantSpec, fake_quantize
from xqcli.load import model_projections
from xqcli.model import Transformer

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
DEFAULT_TOKENS = 2048
GROUP_SIZE = 128
TOP_CHANNELS = 8


@torch.inference_mode()
def calibrate(model: Transformer, tokens: list[int], *, text: str, artifacts: Artifacts | None = None,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The calibration record (calibration.json) of an fp32 `model` on `tokens`; `text` names the text.

    `artifacts`: the model's (its projections are the ones measured), else the SVDs are computed here.
    `progress(done, total)`: layers measured so far, once before the first layer and after each."""
    if model.dtype != torch.float32:
        raise ValueError(f"calibration runs in float32 (the model is {model.dtype})")
    if len(tokens) < 16:
        raise InputError(f"calibration needs at least 16 tokens (the text gave {len(tokens)})")
    xs = capture_inputs(model, tokens)
    projections = model_projections(model, artifacts or Artifacts()) if uses_latents(model.config) else None
    layers: list[dict[str, Any]] = []
    for i, x in enumerate(xs):
        if progress:
            progress(i, len(xs))
        layers.append(_layer_record(model, i, x, projections[i] if projections else None))
    if progress:
        progress(len(xs), len(xs))
    return {"version": CALIBRATION_VERSION, "text": text, "tokens": len(tokens), "group_size": GROUP_SIZE,
            "clip_grid": list(CLIP_GRID), "latents": projections is not None, "layers": layers}


@torch.inference_mode()
def capture_inputs(model: Transformer, tokens: list[int]) -> list[torch.Tensor]:
    """Each layer's post-norm X, (T, d) in fp32, from one forward (no cache: the prompt attends to itself)."""
    xs: list[torch.Tensor] = []
    hooks = [layer.input_layernorm.register_forward_hook(lambda _m, _i, out: xs.append(out[0].float()))
             for layer in model.layers]
    try:
        t = torch.tensor([tokens], device=model.device)
        model.hidden_states(t)
    finally:
        for h in hooks:
            h.remove()
    return xs


def _layer_record(model: Transformer, i: int, x: torch.Tensor, p: LayerProjections | None) -> dict[str, Any]:
    attn = model.layers[i].self_attn
    k, v = x @ attn.k_proj.weight.T, x @ attn.v_proj.weight.T  # bias-free: biases cancel in the errors
    rec: dict[str, Any] = {"layer": i, "x": _stats(x, top=True), "latent": None, "clip": {}, "kv_error": {}}
    for method in CALIBRATED_METHODS:
        streams, rebuild = _cache_streams(method, x, k, v, attn, p)
        if method == "xquant" and p is not None:
            (lat_k, _), (lat_v, _) = streams
            rec["latent"] = {"k": _stats(lat_k), "v": _stats(lat_v),
                             "k_channel0_energy": float(lat_k[:, 0].square().sum() / lat_k.square().sum())}
        clips, errs = {}, {}
        for bits in BITS:
            best = None
            for clip in CLIP_GRID:
                quantized = (fake_quantize(t, QuantSpec(bits, GROUP_SIZE, axis, clip)) for t, axis in streams)
                err = _kv_error(k, v, *rebuild(*quantized))
                if best is None or err < best[0]:
                    best = (err, clip)
            errs[str(bits)], clips[str(bits)] = best
        rec["clip"][method], rec["kv_error"][method] = clips, errs
    return rec


def _cache_streams(method: str, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn,
                   p: LayerProjections | None) -> tuple[list[tuple[torch.Tensor, str]], Callable]:
    """What `method`'s cache quantizes (tensor, axis), and how K and V are rebuilt from those streams."""
    if method == "kivi":
        return [(k, "channel"), (v, "token")], lambda kq, vq: (kq, vq)
    if p is not None:
        return [(x @ p.k.u, "channel"), (x @ p.v.u, "token")], lambda lk, lv: (lk @ p.k.m, lv @ p.v.m)
    return [(x, "token")], lambda xq: (xq @ attn.k_proj.weight.T, xq @ attn.v_proj.weight.T)


def _stats(t: torch.Tensor, top: bool = False) -> dict[str, Any]:
    a = t.abs()
    out = {"mean_abs": float(a.mean()), "max_abs": float(a.max())}
    if top:
        vals, idx = a.amax(0).topk(min(TOP_CHANNELS, t.shape[1]))
        out["top_channels"] = [[int(c), float(m)] for c, m in zip(idx, vals)]
    return out


def _kv_error(k: torch.Tensor, v: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> float:
    return math.sqrt(float((kh - k).square().sum() + (vh - v).square().sum())
                     / max(float(k.square().sum() + v.square().sum()), 1e-30))
