"""Calibration at convert time: per-layer statistics, clip ratios and a bit plan for the bundle.

Calibration text goes through the model in fp32 and each layer's post-norm input X is captured (the
output of `input_layernorm`: exactly what the caches store). Per layer we record:

- X statistics (mean |X|, max |X|, the channels with the largest |X|) and, for grouped-query models,
  the same for the latents X·U_k and X·U_v plus the energy fraction of latent channel 0 of X·U_k
  (the outlier channel of arXiv 2508.10395 §3.3.1);
- for `xquant` and `kivi` at 2/3/4/8 bits, the clip ratio from `CLIP_GRID` that minimizes the relative
  Frobenius error of the rebuilt K and V (streams quantized exactly as the caches do: group 128,
  per-channel keys / latents X·U_k, per-token values / X·U_v / X), and that error;
- for `xquant`, the relative error of the layer's attention output at each bit width (with its best
  clip): the sensitivity used by the bit plan (3 bits is reported as "sensitivity").

The bit plans (`xqcli.bundle.bitplan.bit_plan`) are recommendations recorded in the bundle; the runtime
applies the clip ratios only when asked (`xq eval --calibrated`) and plans bits only for `+mix` caches.
XQuant-CL deltas are not calibrated (their statistics depend on the accumulator, not on X alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from xqcli.bundle.artifacts import Artifacts
from xqcli.bundle.bitplan import CALIBRATED_METHODS, attention_errors, bit_plan
from xqcli.bundle.projections import LayerProjections
from xqcli.cache.spec import BITS, uses_latents
from xqcli.errors import InputError
from xqcli.kernels.quant import QuantSpec, fake_quantize
from xqcli.load import model_projections
from xqcli.model import Transformer
from xqcli.rope import causal_mask

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
TARGETS = (2.5, 3.0, 3.5)
DEFAULT_TOKENS = 2048
GROUP_SIZE = 128
TOP_CHANNELS = 8


def builtin_text() -> str:
    """English prose every Python ships: the stdlib's pydoc topic texts (the language reference)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@torch.inference_mode()
def calibrate(model: Transformer, tokens: list[int], *, text: str, artifacts: Artifacts | None = None
              ) -> dict[str, Any]:
    """The calibration record (calibration.json) of an fp32 `model` on `tokens`; `text` names the text.

    `artifacts`: the model's (its projections are the ones measured), else the SVDs are computed here."""
    if model.dtype != torch.float32:
        raise ValueError(f"calibration runs in float32 (the model is {model.dtype})")
    if len(tokens) < 16:
        raise InputError(f"calibration needs at least 16 tokens (the text gave {len(tokens)})")
    xs = capture_inputs(model, tokens)
    projections = model_projections(model, artifacts or Artifacts()) if uses_latents(model.config) else None
    layers = [_layer_record(model, i, x, projections[i] if projections else None) for i, x in enumerate(xs)]
    errors = attention_errors({"layers": layers})
    return {"text": text, "tokens": len(tokens), "group_size": GROUP_SIZE, "clip_grid": list(CLIP_GRID),
            "latents": projections is not None, "layers": layers,
            "bit_plans": {_target_key(t): bit_plan(errors, t) for t in TARGETS}}


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
    q = attn.split_heads(attn.q_proj(x)[None], model.config.num_attention_heads)
    q = model.rope.apply(q, _positions(x))
    ref = _attention(model, i, q, k, v)
    rec: dict[str, Any] = {"layer": i, "x": _stats(x, top=True), "latent": None, "clip": {}, "kv_error": {},
                           "attn_error": {}}
    for method in CALIBRATED_METHODS:
        streams, rebuild = _cache_streams(method, x, k, v, attn, p)
        if method == "xquant" and p is not None:
            (lat_k, _), (lat_v, _) = streams
            rec["latent"] = {"k": _stats(lat_k), "v": _stats(lat_v),
                             "k_channel0_energy": float(lat_k[:, 0].square().sum() / lat_k.square().sum())}
        clips, errs, attn_errs = {}, {}, {}
        for bits in BITS:
            best = None
            for clip in CLIP_GRID:
                quantized = (fake_quantize(t, QuantSpec(bits, GROUP_SIZE, axis, clip)) for t, axis in streams)
                kh, vh = rebuild(*quantized)
                err = _kv_error(k, v, kh, vh)
                if best is None or err < best[0]:
                    best = (err, clip, kh, vh)
            errs[str(bits)], clips[str(bits)] = best[0], best[1]
            if method == "xquant":
                attn_errs[str(bits)] = _rel(_attention(model, i, q, best[2], best[3]), ref)
        rec["clip"][method], rec["kv_error"][method] = clips, errs
        if attn_errs:
            rec["attn_error"][method] = attn_errs
    rec["sensitivity"] = rec["attn_error"]["xquant"]["3"]
    return rec


def _cache_streams(method: str, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn,
                   p: LayerProjections | None) -> tuple[list[tuple[torch.Tensor, str]], Callable]:
    """What `method`'s cache quantizes (tensor, axis), and how K and V are rebuilt from those streams."""
    if method == "kivi":
        return [(k, "channel"), (v, "token")], lambda kq, vq: (kq, vq)
    if p is not None:
        return [(x @ p.k.u, "channel"), (x @ p.v.u, "token")], lambda lk, lv: (lk @ p.k.m, lv @ p.v.m)
    return [(x, "token")], lambda xq: (xq @ attn.k_proj.weight.T, xq @ attn.v_proj.weight.T)


def _positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[0], device=x.device)[None]


def _attention(model: Transformer, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The layer's causal attention output (T, d) for post-RoPE queries q and bias-free, pre-RoPE K, V."""
    attn, cfg = model.layers[i].self_attn, model.config
    if attn.k_proj.bias is not None:
        k, v = k + attn.k_proj.bias, v + attn.v_proj.bias
    kh = model.rope.apply(attn.split_heads(k[None], cfg.num_key_value_heads), _positions(k))
    vh = attn.split_heads(v[None], cfg.num_key_value_heads)
    t, w = k.shape[0], cfg.sliding_window
    mask = causal_mask(_positions(k)[0], t, w) if w is not None and t > w else None  # None: plain causal
    out = F.scaled_dot_product_attention(q, kh, vh, attn_mask=mask, is_causal=mask is None,
                                         enable_gqa=cfg.is_gqa)  # (1, H, T, hd)
    return attn.o_proj(out.transpose(1, 2).reshape(k.shape[0], cfg.q_dim))


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


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _target_key(t: float) -> str:
    return f"{t:g}"
