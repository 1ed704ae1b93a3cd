"""Calibration at convert time: per-layer statistics, clip ratios and a bit plan for the bundle.

Calibration text goes through the model in fp32 and each layer's post-norm input X is captured (the
output of `input_layernorm`: exactly what the caches store). Per layer we record:

- X statistics (mean |X|, max |X|, the channels with the largest |X|) and, for grouped-query models,
  the same for the latents X·U_k and X·U_v plus the energy fraction of latent channel 0 of X·U_k
  (the paper's §3.3.1 outlier channel);
- for `xquant` and `kivi` at 2/3/4/8 bits, the clip ratio from `CLIP_GRID` that minimizes the relative
  Frobenius error of the rebuilt K and V (streams quantized exactly as the caches do: group 128,
  per-channel keys / latents X·U_k, per-token values / X·U_v / X), and that error;
- for `xquant`, the relative error of the layer's attention output at each bit width (with its best
  clip): the sensitivity used by the bit plan (3 bits is reported as "sensitivity").

The bit plan is greedy: every layer starts at 2 bits and the layer whose next step (2→3→4→8) buys the
largest attention-error drop per extra bit is upgraded, while the average stays within the target.
It is a recommendation recorded in the bundle; the runtime applies only the clip ratios, and only when
asked (`xq eval --calibrated`). XQuant-CL deltas are not calibrated (their statistics depend on the
accumulator, not on X alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from xqcli.cache.base import causal_mask
from xqcli.cache.spec import BITS, CacheSpec, uses_latents
from xqcli.errors import BundleError, InputError
from xqcli.kernels.quant import QuantSpec, fake_quantize
from xqcli.model import Transformer
from xqcli.bundle.projections import LayerProjections, model_projections

if TYPE_CHECKING:
    from xqcli.bundle.format import Bundle

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
TARGETS = (2.5, 3.0, 3.5)
CALIBRATED_METHODS = ("xquant", "kivi")
DEFAULT_TOKENS = 2048
GROUP_SIZE = 128
TOP_CHANNELS = 8


def builtin_text() -> str:
    """English prose every Python ships: the stdlib's pydoc topic texts (the language reference)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@torch.inference_mode()
def calibrate(model: Transformer, tokens: list[int], *, text: str) -> dict[str, Any]:
    """The calibration record (calibration.json) of an fp32 `model` on `tokens`; `text` names the text."""
    if model.dtype != torch.float32:
        raise ValueError(f"calibration runs in float32 (the model is {model.dtype})")
    if len(tokens) < 16:
        raise InputError(f"calibration needs at least 16 tokens (the text gave {len(tokens)})")
    xs = capture_inputs(model, tokens)
    projections = model_projections(model) if uses_latents(model.config) else None
    layers = [_layer_record(model, i, x, projections[i] if projections else None) for i, x in enumerate(xs)]
    errors = [{int(b): e for b, e in rec["attn_error"]["xquant"].items()} for rec in layers]
    return {"text": text, "tokens": len(tokens), "group_size": GROUP_SIZE, "clip_grid": list(CLIP_GRID),
            "latents": projections is not None, "layers": layers,
            "bit_plans": {_target_key(t): bit_plan(errors, t) for t in TARGETS}}


@torch.inference_mode()
def capture_inputs(model: Transformer, tokens: list[int]) -> list[torch.Tensor]:
    """Each layer's post-norm X, (T, d) in fp32, from one forward through a plain KV cache."""
    from xqcli.cache.base import KVCache

    xs: list[torch.Tensor] = []
    hooks = [layer.input_layernorm.register_forward_hook(lambda _m, _i, out: xs.append(out[0].float()))
             for layer in model.layers]
    try:
        t = torch.tensor([tokens], device=model.device)
        model.hidden_states(t, KVCache(model, 1, t.shape[1]))
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


def bit_plan(errors: list[dict[int, float]], target: float) -> list[int]:
    """Per-layer bits averaging at most `target`: greedy best error drop per extra bit, from all-2."""
    bits = [BITS[0]] * len(errors)
    budget = target * len(errors) + 1e-9
    while True:
        best: tuple[float, int, int] | None = None
        for i, b in enumerate(bits):
            nxt = next((n for n in BITS if n > b), None)
            if nxt is None or sum(bits) - b + nxt > budget:
                continue
            gain = (errors[i][b] - errors[i][nxt]) / (nxt - b)
            if best is None or gain > best[0]:
                best = (gain, i, nxt)
        if best is None:
            return bits
        bits[best[1]] = best[2]


def calibrated_specs(bundle: Bundle | None, specs: list[CacheSpec]) -> list[CacheSpec]:
    """For each quantized xquant/kivi spec, its twin with the bundle's per-layer clip ratios (`... (cal)`)."""
    cal = bundle.calibration() if bundle is not None else None
    if cal is None:
        raise InputError("--calibrated needs a bundle with a calibration",
                         hint="make one with: xq convert MODEL")
    out = []
    for spec in specs:
        if spec.method not in CALIBRATED_METHODS or spec.bits is None:
            continue
        try:
            clips = tuple(float(layer["clip"][spec.method][str(spec.bits)]) for layer in cal["layers"])
        except KeyError:
            raise BundleError(f"calibration.json has no clip ratios for {spec.name}") from None
        out.append(replace(spec, clips=clips))
    if not out:
        raise InputError("--calibrated: calibration covers xquant-B and kivi-B; --methods names neither")
    return out
