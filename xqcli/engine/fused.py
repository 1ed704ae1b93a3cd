"""Decode-step weights concatenated once per model and cache kind, and the fused layer tail built on them.

Issue 13 gives a decode layer at most 12 launches (`kv`) or 15 (quantized kinds), so everything a layer
computes from its post-norm input X is one GEMV: `DecodeWeights` stacks, per layer, W_q with the rows
of whatever this cache kind stores from X, and gate with up. One `F.linear(x, w_in, b_in)` gives q and
every stream's input; `layer_inputs` says where each lies. What each kind stores is what its cache
appends today (`xqcli.cache`):

    kv, kivi-B           k = X·W_kᵀ + b_k, v = X·W_vᵀ + b_v (pre-RoPE)
    xquant-B, GQA        k = X·U_k, v = X·U_v (SVD latents, `xqcli.bundle.projections`); `+ch0`: U_k's
                         column 0 apart as `ch0`; `+rot`: v = X·(U_v·R), R folded into the rows
    xquant-B, MHA        x = X itself (no rows); `+rot`: x = X·R with Rᵀ as rows
    xquant-cl-B          layers before the seed as xquant-B; seed and delta layers: x = X·U_kv (GQA,
                         `+rot`: U_kv·R as the cache folds it) or X / X·R (MHA)

Choice (ours): under `+rot` on MHA the rotation is a d × d block of rows in the GEMV (d² more weight
bytes per layer, no launch) rather than the caches' fast Walsh-Hadamard transform (log2(block) rounds
of torch ops); a Hadamard computed inside the quantize-and-append kernel would save those bytes.

The concatenations share storage with the model: after `build`, the model's q/k/v and gate/up
`nn.Linear` weights (and biases) are views of rows of `w_in` and `w_gate_up` (contiguous rows, the same
values, so the model computes the same numbers), so nothing is stored twice. Build it before the
caches: a cache built earlier keeps the previous K/V tensors alive.

Launches per decode layer on the CUDA path with these pieces (`fused_layer_tail`, `layer_head`):

    1  in-GEMV: q and the stream inputs (an addmm with the bias when the model has one)
       + the cache: quantize-and-append, attention with RoPE inside (and for `xquant-cl` the
         accumulator update): counted by the cache kernels, not here
    1  o_proj
    1  add_rms_norm: attention residual + post-attention norm
    1  gate_up GEMV
    1  silu_mul
    1  down_proj
    1  add_rms_norm: MLP residual + the next layer's input norm (the final norm after the last layer)

7 per layer, which leaves 5 for the `kv` cache and 8 for the quantized kinds within the budget. Outside
the layers: the embedding and the first layer's `rms_norm` (2), then lm_head and sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xqcli.bundle.artifacts import Artifacts
from xqcli.bundle.rotation import Rotation
from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.config import ModelConfig
from xqcli.kernels.decode_ops import add_rms_norm, silu_mul
from xqcli.load import model_projections
from xqcli.model import RMSNorm, Transformer

__all__ = ["DecodeWeights", "LayerDecode", "Norm", "fused_layer_tail", "layer_head", "layer_inputs"]


@dataclass(frozen=True)
class Norm:
    """An RMSNorm's gain and epsilon."""

    weight: Tensor
    eps: float

    @classmethod
    def of(cls, norm: RMSNorm) -> Norm:
        return cls(norm.weight.detach(), norm.eps)


@dataclass(frozen=True)
class LayerDecode:
    """One layer's decode weights: the input GEMV, attention output, MLP and the two norms after attention."""

    w_in: Tensor  # (rows, d): [W_q; this kind's stream rows]
    b_in: Tensor | None  # (rows,), zeros under rows without a bias; None when the model has no attention bias
    slots: dict[str, slice | None]  # `layer_inputs`: name -> columns of the GEMV output (None: X itself)
    w_o: Tensor  # (d, q_dim)
    w_gate_up: Tensor  # (2·I, d): [W_gate; W_up]
    w_down: Tensor  # (d, I)
    norm_post: Norm  # post-attention norm
    norm_next: Norm  # the next layer's input norm; the model's final norm after the last layer


@dataclass(frozen=True)
class DecodeWeights:
    """Every layer's `LayerDecode` for one model and cache kind, and the first layer's input norm."""

    spec: CacheSpec
    norm_first: Norm
    layers: list[LayerDecode]

    @classmethod
    @torch.no_grad()
    def build(cls, model: Transformer, spec: CacheSpec, artifacts: Artifacts) -> DecodeWeights:
        """Concatenate once (at engine construction); the model's q/k/v and gate/up weights become views."""
        cfg, blocks = model.config, model.layers
        nexts = [Norm.of(b.input_layernorm) for b in blocks[1:]] + [Norm.of(model.model.norm)]
        layers = []
        for i, (block, norm_next) in enumerate(zip(blocks, nexts)):
            rows = _stream_rows(model, spec, artifacts, i)
            slots = layer_inputs(spec, cfg, i)
            named = [(name, rows[name]) for name, s in slots.items() if s is not None]
            w_in = torch.cat([w for _, (w, _) in named])
            b_in = None
            if cfg.attention_bias:
                b_in = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for _, (w, b) in named])
            attn = block.self_attn
            linears = {"q": attn.q_proj}
            if _projects_kv(spec):
                linears |= {"k": attn.k_proj, "v": attn.v_proj}
            for name, linear in linears.items():
                _share(linear, w_in[slots[name]], None if b_in is None else b_in[slots[name]])
            mlp = block.mlp
            w_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            _share(mlp.gate_proj, w_gate_up[:cfg.intermediate_size])
            _share(mlp.up_proj, w_gate_up[cfg.intermediate_size:])
            layers.append(LayerDecode(w_in, b_in, slots, block.self_attn.o_proj.weight.detach(), w_gate_up,
                                      mlp.down_proj.weight.detach(), Norm.of(block.post_attention_layernorm),
                                      norm_next))
        return cls(spec, Norm.of(blocks[0].input_layernorm), layers)


def layer_inputs(spec: CacheSpec, cfg: ModelConfig, layer: int) -> dict[str, slice | None]:
    """Where q and each stream input of `layer` lie in the output of its input GEMV, in row order.

    Names: `q`; `k`, `v` (kv, kivi: pre-RoPE K and V; xquant on GQA: the latents); `ch0` (`+ch0`:
    latent channel 0); `x` (what an MHA xquant layer or an xquant-cl seed/delta layer stores). None:
    the layer input X itself, which needs no rows."""
    slots, start = {}, 0
    for name, width in _plan(spec, cfg, layer):
        slots[name] = None if width is None else slice(start, start + width)
        start += width or 0
    return slots


def _plan(spec: CacheSpec, cfg: ModelConfig, layer: int) -> list[tuple[str, int | None]]:
    """(name, width) of each GEMV output slot in row order, as the caches of `spec` lay out their streams."""
    q = [("q", cfg.q_dim)]
    if _projects_kv(spec):
        return q + [("k", cfg.kv_dim), ("v", cfg.kv_dim)]
    latent = uses_latents(cfg)
    x_width = cfg.hidden_size if spec.rotate else None
    if spec.method == "xquant-cl" and layer >= min(spec.base_layers, cfg.num_hidden_layers) - 1:
        return q + [("x", 2 * cfg.kv_dim if latent else x_width)]  # the seed layer and the delta layers
    if latent:
        ch0 = int(spec.fp16_channel0)
        return q + [("ch0", 1)] * ch0 + [("k", cfg.kv_dim - ch0), ("v", cfg.kv_dim)]
    return q + [("x", x_width)]


def _projects_kv(spec: CacheSpec) -> bool:
    """Kinds whose streams are K and V themselves (their rows are the model's k_proj and v_proj)."""
    return spec.method in ("kv", "kivi")


def _stream_rows(model: Transformer, spec: CacheSpec, artifacts: Artifacts,
                 layer: int) -> dict[str, tuple[Tensor, Tensor | None]]:
    """name -> (rows (width, d), bias or None) of one layer's GEMV slots (`_plan`'s names)."""
    cfg, attn = model.config, model.layers[layer].self_attn
    rows = {"q": (attn.q_proj.weight, attn.q_proj.bias)}
    if _projects_kv(spec):
        return rows | {"k": (attn.k_proj.weight, attn.k_proj.bias),
                       "v": (attn.v_proj.weight, attn.v_proj.bias)}

    def rotation(width: int) -> tuple[Rotation, Tensor]:
        """The caches' R for this width (`StreamCache.rotation`), from the same memo."""
        kind, seed = artifacts.rotation
        rot = Rotation(kind, width, seed)
        return rot, artifacts.folded(("R", rot), model.dtype, model.device, lambda: rot.matrix(torch.float64))

    def folded(key: str, u: Tensor) -> Tensor:
        """u·R under `+rot`, folded in float64 once (the memo and recipe the caches use for `ukv`)."""
        if not spec.rotate:
            return u
        rot, r = rotation(u.shape[1])
        return artifacts.folded((key, layer, rot), model.dtype, model.device, lambda: u.double() @ r.double())

    latent = uses_latents(cfg)
    p = model_projections(model, artifacts)[layer] if latent else None
    for name, width in _plan(spec, cfg, layer)[1:]:
        if width is None:  # X itself
            continue
        if name == "x":  # GQA xquant-cl: X·U_kv(·R); MHA +rot: X·R
            rows[name] = (folded("ukv", p.kv.u).T if latent else rotation(width)[1].T, None)
        elif name == "ch0":
            rows[name] = (p.k.u[:, :1].T, None)
        elif name == "k":
            rows[name] = (p.k.u[:, int(spec.fp16_channel0):].T, None)
        else:
            rows[name] = (folded("uv", p.v.u).T, None)
    return rows


def _share(linear: nn.Linear, weight: Tensor, bias: Tensor | None = None) -> None:
    """Make `linear` compute with views of the concatenated rows (same values: nothing stored twice)."""
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)


def layer_head(x: Tensor, layer: LayerDecode) -> dict[str, Tensor]:
    """q and every stream input of one layer from its post-norm input x (..., d): one GEMV, then views."""
    y = F.linear(x, layer.w_in, layer.b_in)
    return {name: x if s is None else y[..., s] for name, s in layer.slots.items()}


def fused_layer_tail(h: Tensor, attn_out: Tensor, layer: LayerDecode, *,
                     backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The rest of a decoder layer after attention, in 6 launches: (new residual h, next layer's input X).

    h: the residual stream (..., d); attn_out: attention's output (..., q_dim) before o_proj. The same
    math as `xqcli.model`: h += o_proj(attn); h += down(silu(gate(n)) · up(n)) with n the post-attention
    norm of h; then the next norm of h (fused with that last residual add)."""
    h, x = add_rms_norm(h, F.linear(attn_out, layer.w_o), layer.norm_post.weight, layer.norm_post.eps,
                        backend=backend)
    act = silu_mul(F.linear(x, layer.w_gate_up), backend=backend)
    return add_rms_norm(h, F.linear(act, layer.w_down), layer.norm_next.weight, layer.norm_next.eps,
                        backend=backend)
