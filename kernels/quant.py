"""Asymmetric uniform group quantization of X (XQuant, arXiv 2508.10395; docs/design.md §2).

The paper quantizes X (and the GQA latents) with "simple uniform quantization": min/max per group of
128 elements, one fp16 scale and one fp16 zero per group. It does not give the exact rounding, so this
module fixes one (docs/design.md §9). Every Triton kernel added here later must reproduce it bit
for bit; the ``*_ref`` functions are the specification and also the CPU path.

Axes
----
``token``:   groups of ``g`` consecutive channels inside one token row; the last group of a row is
             smaller when ``C % g != 0``. scale/zero have shape ``(..., T, ceil(C / g))``.
``channel``: each channel is quantized over a block of consecutive tokens. The rows passed in are split
             into blocks of ``g`` tokens (the last block smaller); callers normally pass one block of
             ``T <= g`` rows. scale/zero have shape ``(..., ceil(T / g), C)``.

Rounding rule (per group, all arithmetic in IEEE float32, ``n = 2**bits - 1``)
------------------------------------------------------------------------------
1. ``x = clamp(float32(x), -65504, 65504)``: inputs are saturated to the fp16 range first, so scale
   and zero can never overflow to inf (values beyond +-65504 decode to the grid ends). NaN inputs give
   unspecified codes.
2. ``mn = min(x)``, ``mx = max(x)``.
3. Clip (ratio ``c`` in (0, 1]): the range shrinks symmetrically about its midpoint,
   ``w = (mx - mn) * float32((1 - c) / 2)``, ``mn = mn + w``, ``mx = mx - w``. ``c = 1`` gives
   ``w = 0`` and leaves ``mn``/``mx`` untouched; values outside the clipped range saturate.
4. ``zero = fp16(mn)`` rounded to nearest-even, then moved one fp16 step down if it is ``> mn``:
   the largest fp16 value ``<= mn``. Rounding down guarantees the grid starts at or below the minimum.
5. ``scale = fp16((mx - zero) / n)`` rounded to nearest-even, then moved one fp16 step up if
   ``scale * n + zero < mx`` (the grid's top, computed exactly as step 8 decodes it). This guarantees
   the grid reaches the maximum, so (without clipping) no element saturates and every element decodes
   within ``scale / 2`` (up to float32 rounding). ``scale`` stays below 65504 because of step 1 and
   ``bits >= 2``. Requantizing a dequantized group gives back its zero, scale and codes whenever its
   codes include 0 and n (or it is constant). Groups too narrow to reach both ends, e.g. one fp32 value
   that is not an fp16 value, or a range below n times fp16's subnormal spacing, may requantize differently.
6. ``s = 1`` if ``scale == 0`` else ``scale``. ``scale == 0`` only for a constant group whose value is
   exactly ``zero``; every code is then 0 and decodes exactly.
7. ``code = uint8(clamp(floor((x - zero) / s + 0.5), 0, n))``: round half up, with an IEEE
   correctly rounded division (a Triton kernel must use ``div_rn``, not the approximate divide).
8. Dequantize: ``x_hat = float32(code) * float32(scale) + float32(zero)``, then cast to the requested
   dtype. The product is exact in float32 (8-bit code times 11-bit significand), so a fused
   multiply-add gives the same result.

Packed layout (one layout for every caller)
-------------------------------------------
Codes are packed along the LAST axis into uint8, in units of ``lcm(bits, 8)`` bits: a unit holds
``u = lcm(bits, 8) / bits`` codes and ``lcm(bits, 8) / 8`` bytes. Inside a unit, code ``j`` sits at
bit ``bits * j`` of the unit's little-endian word (byte ``k`` holds bits ``8k .. 8k + 7``). Hence:
8-bit: one code per byte. 4-bit: two per byte, code ``i`` at bit ``(i % 2) * 4``. 2-bit: four per
byte, code ``i`` at bit ``(i % 4) * 2``. 3-bit: 8 codes in 3 bytes, code ``j`` at bit ``3j`` of the
24-bit word. The last axis is padded with zero codes to a multiple of ``u``; see ``packed_width``.

Memory accounting
-----------------
Exact bytes of a quantized (..., T, C) tensor: payload ``T * packed_width(C, bits)`` per batch
element, plus 4 bytes (fp16 scale + fp16 zero) per group. The paper's model is ``bits + 32 / g`` bits
per element (``nominal_bits_per_element``); the exact figures differ only by packing and partial-group
padding.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from xqcli.kernels._common import FLOATS, group_min_max, quant_codes, scale_zero, store_packed
from xqcli.kernels._triton import INTERPRET, cdiv, jit, next_pow2, on_device, tl, use_triton

__all__ = [
    "QBytes",
    "QTensor",
    "QuantSpec",
    "bytes_per_row",
    "clip_weight",
    "dequantize",
    "dequantize_ref",
    "fake_quantize",
    "nominal_bits_per_element",
    "pack",
    "pack_ref",
    "packed_width",
    "packing_unit",
    "qtensor_nbytes",
    "quantize",
    "quantize_pack_triton",
    "quantize_ref",
    "unpack",
    "unpack_ref",
]

SUPPORTED_BITS = (2, 3, 4, 8)
FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit width, group size, grouping axis and range clip ratio."""

    bits: int
    group_size: int = 128
    axis: Literal["token", "channel"] = "token"
    clip: float = 1.0

    def __post_init__(self) -> None:
        if type(self.bits) is not int or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantSpec.bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if type(self.group_size) is not int or self.group_size < 1:
            raise ValueError(f"QuantSpec.group_size must be an integer >= 1, got {self.group_size!r}")
        if self.axis not in ("token", "channel"):
            raise ValueError(f"QuantSpec.axis must be 'token' or 'channel', got {self.axis!r}")
        if not (0.0 < self.clip <= 1.0):  # also rejects NaN
            raise ValueError(
                f"QuantSpec.clip must be in (0, 1] (1.0 = no clipping, 0.9 keeps the central 90% of "
                f"each group's min/max range), got {self.clip!r}"
            )

    @property
    def levels(self) -> int:
        """Largest code, 2**bits - 1."""
        return (1 << self.bits) - 1


class QBytes(NamedTuple):
    """Storage of a quantized tensor, itemized."""

    payload: int  # packed codes
    scale_zero: int  # fp16 scales plus fp16 zeros

    @property
    def total(self) -> int:
        return self.payload + self.scale_zero


@dataclass(frozen=True)
class QTensor:
    """A quantized (..., T, C) tensor: packed codes plus one fp16 scale and zero per group."""

    packed: Tensor  # uint8 (..., T, packed_width(C, bits))
    scale: Tensor  # fp16, token: (..., T, ceil(C / g)); channel: (..., ceil(T / g), C)
    zero: Tensor  # fp16, same shape as scale
    spec: QuantSpec
    shape: torch.Size  # shape of the original tensor, (..., T, C)
    dtype: torch.dtype  # dtype of the original tensor, the default for dequantize

    @property
    def nbytes(self) -> QBytes:
        """Bytes actually held by the tensors (equals ``qtensor_nbytes(shape, spec)``)."""
        return QBytes(
            payload=self.packed.numel() * self.packed.element_size(),
            scale_zero=self.scale.numel() * self.scale.element_size()
            + self.zero.numel() * self.zero.element_size(),
        )


# ----------------------------------------------------------------------------- layout and accounting


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def packing_unit(bits: int) -> tuple[int, int]:
    """(codes per packing unit, bytes per packing unit) for a bit width."""
    unit_bits = math.lcm(bits, 8)
    return unit_bits // bits, unit_bits // 8


def packed_width(n: int, bits: int) -> int:
    """Bytes that ``n`` codes occupy along the packed axis, padding included."""
    _check_bits(bits)
    per_unit, unit_bytes = packing_unit(bits)
    return -(-n // per_unit) * unit_bytes


def _n_groups(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Number of (scale, zero) pairs for a (..., T, C) tensor."""
    *batch, t, c = shape
    g = spec.group_size
    per_item = t * -(-c // g) if spec.axis == "token" else -(-t // g) * c
    return math.prod(batch) * per_item


def qtensor_nbytes(shape: tuple[int, ...], spec: QuantSpec) -> QBytes:
    """Exact bytes of ``quantize(x, spec)`` for ``x.shape == shape``, without allocating."""
    if len(shape) < 2:
        raise ValueError(f"shape must be (..., T, C), got {tuple(shape)}")
    *batch, t, c = shape
    return QBytes(
        payload=math.prod(batch) * t * packed_width(c, spec.bits),
        scale_zero=4 * _n_groups(tuple(shape), spec),
    )


def bytes_per_row(c: int, spec: QuantSpec) -> Fraction:
    """Exact steady-state bytes one row (token) of ``c`` values adds to a cache.

    Token axis: the row's own payload and groups (an integer). Channel axis: the average over one
    full ``g``-row block, since a block shares its scales and zeros (an integer when g divides 4c).
    """
    rows = 1 if spec.axis == "token" else spec.group_size
    return Fraction(qtensor_nbytes((rows, c), spec).total, rows)


def clip_weight(clip: float) -> float:
    """Rule step 3's float32 (1 - clip) / 2, as a Python float for a kernel argument (no tensor, so
    no host read of one)."""
    return struct.unpack("f", struct.pack("f", (1.0 - clip) / 2.0))[0]


def nominal_bits_per_element(spec: QuantSpec) -> float:
    """The paper's accounting: payload bits plus 32 bits of fp16 scale and zero per full group."""
    return spec.bits + 32 / spec.group_size


# ----------------------------------------------------------------------------- reference (pure torch)


def pack_ref(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (each < 2**bits) along the last axis; see the module docstring for the layout."""
    per_unit, unit_bytes = packing_unit(bits)
    n = codes.shape[-1]
    units = -(-n // per_unit)
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, units * per_unit - n))
    c = c.unflatten(-1, (units, per_unit))  # (..., units, per_unit)
    shifts = bits * torch.arange(per_unit, dtype=torch.int32, device=codes.device)
    word = (c << shifts).sum(-1)  # (..., units): disjoint bit fields, so the sum is an OR
    byte_shifts = 8 * torch.arange(unit_bytes, dtype=word.dtype, device=codes.device)
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # (..., units, unit_bytes)
    return out.to(torch.uint8).flatten(-2)  # (..., units * unit_bytes)


def unpack_ref(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``pack_ref``: the first ``n`` codes of each packed row, as uint8."""
    per_unit, unit_bytes = packing_unit(bits)
    b = packed.to(torch.int32).unflatten(-1, (-1, unit_bytes))  # (..., units, unit_bytes)
    byte_shifts = 8 * torch.arange(unit_bytes, dtype=torch.int32, device=packed.device)
    word = (b << byte_shifts).sum(-1)  # (..., units)
    shifts = bits * torch.arange(per_unit, dtype=word.dtype, device=packed.device)
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., units, per_unit)
    return codes.to(torch.uint8).flatten(-2)[..., :n]


def _fp16_round_down(v: Tensor) -> Tensor:
    """Largest fp16 value <= v, for float32 v in [-65504, 65504] (rule step 4)."""
    h = v.to(torch.float16)
    b = h.view(torch.int16)
    # One step toward -inf in the sign-magnitude encoding: +x -> bits - 1; +-0 -> -min_subnormal
    # (0x8001); -x -> bits + 1.
    down = torch.where(b > 0, b - 1, torch.where(b == 0, torch.full_like(b, -0x7FFF), b + 1))
    return torch.where(h.float() > v, down.view(torch.float16), h)


def _fp16_step_up(h: Tensor) -> Tensor:
    """Next fp16 value above a non-negative finite fp16 h (+0 -> smallest subnormal)."""
    return (h.view(torch.int16) + 1).view(torch.float16)


def _quantize_last(x: Tensor, bits: int, g: int, clip: float) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize groups of ``g`` consecutive elements along the last axis (last group may be short).

    Returns codes uint8 (..., n), scale and zero fp16 (..., ceil(n / g)).
    """
    n = x.shape[-1]
    n_groups = -(-n // g)
    levels = (1 << bits) - 1
    # Pad the short last group by repeating its last element: min/max are unchanged, pads are dropped.
    tail = x[..., -1:].expand(*x.shape[:-1], n_groups * g - n)
    xg = torch.cat([x, tail], dim=-1).unflatten(-1, (n_groups, g))  # (..., G, g)
    xg = xg.float().clamp(-FP16_MAX, FP16_MAX)
    mn = xg.amin(-1)  # (..., G)
    mx = xg.amax(-1)
    w = (mx - mn) * torch.full((), (1.0 - clip) / 2.0, dtype=torch.float32, device=x.device)  # no host copy
    mn = mn + w
    mx = mx - w
    zero = _fp16_round_down(mn)
    z = zero.float()
    scale = ((mx - z) / levels).to(torch.float16)
    scale = torch.where(scale.float() * levels + z < mx, _fp16_step_up(scale), scale)
    s = scale.float()
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.floor((xg - z.unsqueeze(-1)) / s.unsqueeze(-1) + 0.5).clamp_(0, levels)
    codes = q.to(torch.uint8).flatten(-2)[..., :n]  # (..., n)
    return codes, scale, zero


def _dequantize_last(codes: Tensor, scale: Tensor, zero: Tensor, g: int) -> Tensor:
    """Inverse of ``_quantize_last``, in float32."""
    n = codes.shape[-1]
    s = scale.float().repeat_interleave(g, dim=-1)[..., :n]  # (..., n)
    z = zero.float().repeat_interleave(g, dim=-1)[..., :n]
    return codes.float() * s + z


def quantize_ref(x: Tensor, spec: QuantSpec) -> QTensor:
    """Reference quantizer (rule in the module docstring) for x of shape (..., T, C)."""
    if spec.axis == "token":
        codes, scale, zero = _quantize_last(x, spec.bits, spec.group_size, spec.clip)
    else:
        codes, scale, zero = _quantize_last(x.mT, spec.bits, spec.group_size, spec.clip)
        codes, scale, zero = codes.mT, scale.mT.contiguous(), zero.mT.contiguous()  # (..., T, C)
    return QTensor(
        packed=pack_ref(codes, spec.bits), scale=scale, zero=zero, spec=spec, shape=x.shape, dtype=x.dtype
    )


def dequantize_ref(q: QTensor, dtype: torch.dtype) -> Tensor:
    """Reference dequantizer: float32 ``code * scale + zero``, cast to ``dtype``."""
    spec = q.spec
    codes = unpack_ref(q.packed, spec.bits, q.shape[-1])  # (..., T, C)
    if spec.axis == "token":
        x = _dequantize_last(codes, q.scale, q.zero, spec.group_size)
    else:
        x = _dequantize_last(codes.mT, q.scale.mT, q.zero.mT, spec.group_size).mT
    return x.to(dtype).contiguous()


# ----------------------------------------------------------------------------- Triton kernels
#
# quantize + pack on write, bit-identical to ``quantize_ref``. Two kernels, one per axis:
# - token axis: a program owns BR whole rows. Pass 1 computes every group's fp16 scale/zero and stores
#   them; pass 2 (after a CTA barrier, so it sees pass 1's stores) reloads them per element and packs
#   codes a packing unit at a time. Reloading the stored fp16 values is exact and lets groups of any
#   size (1, 7, 128, ...) straddle packing units.
# - channel axis: a program owns one block of G tokens and BU packing units of channels; each
#   channel's group is a column of the block, so min/max and codes stay in registers.
# The rule's divisions use ``div_rn`` (IEEE round-to-nearest; plain ``/`` is approximate on GPUs) and
# launches pass ``enable_fp_fusion=False`` so ``mn + (mx - mn) * w`` is never contracted into an FMA.


@jit(do_not_specialize=["R"])
def _quant_token_kernel(
    X, P, S, Z,  # x (R, C) rows; packed (R, PW) uint8; scale, zero (R, NG) fp16
    R, C, NG, NU,  # rows, channels, groups per row, packing units per row
    s_x, s_p, s_s,  # row strides of X, P and S/Z (elements)
    clip_w,  # float32 (1 - clip) / 2
    BITS: tl.constexpr, LEVELS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NGB: tl.constexpr,
    BR: tl.constexpr, PU: tl.constexpr, UB: tl.constexpr, BU: tl.constexpr,
):
    i_r = tl.program_id(0).to(tl.int64)
    o_r = i_r * BR + tl.arange(0, BR).to(tl.int64)
    m_r = o_r < R
    o_i = tl.arange(0, GP)
    for g0 in range(0, NG, NGB):
        o_g = g0 + tl.arange(0, NGB)
        o_c = o_g[:, None] * G + o_i[None, :]  # (NGB, GP)
        m_x = m_r[:, None, None] & ((o_i[None, :] < G) & (o_c < C))[None, :, :]
        b_x = tl.load(X + o_r[:, None, None] * s_x + o_c[None, :, :], mask=m_x, other=0.0).to(tl.float32)
        b_x = tl.minimum(tl.maximum(b_x, -65504.0), 65504.0)
        m_s = m_r[:, None] & (o_g < NG)[None, :]
        b_mn, b_mx = group_min_max(b_x, m_x, m_s, 2)
        b_scale, b_zero = scale_zero(b_mn, b_mx, clip_w, LEVELS)
        o_s = o_r[:, None] * s_s + o_g[None, :]
        tl.store(S + o_s, b_scale, mask=m_s)
        tl.store(Z + o_s, b_zero, mask=m_s)
    tl.debug_barrier()  # pass 2 reads the scales/zeros other threads of this program stored
    o_j = tl.arange(0, PU)
    for u0 in range(0, NU, BU):
        o_u = u0 + tl.arange(0, BU)
        o_c = o_u[:, None] * PU + o_j[None, :]  # (BU, PU)
        m_x = m_r[:, None, None] & (o_c < C)[None, :, :]
        b_x = tl.load(X + o_r[:, None, None] * s_x + o_c[None, :, :], mask=m_x, other=0.0).to(tl.float32)
        b_x = tl.minimum(tl.maximum(b_x, -65504.0), 65504.0)
        o_s = o_r[:, None, None] * s_s + (o_c // G)[None, :, :]
        b_scale = tl.load(S + o_s, mask=m_x, other=0.0)
        b_zero = tl.load(Z + o_s, mask=m_x, other=0.0)
        b_q = tl.where(m_x, quant_codes(b_x, b_scale, b_zero, LEVELS), 0)
        m_u = m_r[:, None] & (o_u < NU)[None, :]
        store_packed(P + o_r[:, None] * s_p + o_u[None, :] * UB, b_q, m_u, BITS, PU, UB)


@jit(do_not_specialize=["T", "NB", "s_xn", "s_pn", "s_sn"])
def _quant_channel_kernel(
    X, P, S, Z,  # x (N, T, C); packed (N, T, PW) uint8; scale, zero (N, NB, C) fp16
    T, C, NB, NU,  # tokens, channels, token blocks (ceil(T / G)), packing units per row
    s_xn, s_xt, s_pn, s_pt, s_sn, s_sb,  # strides (elements)
    clip_w,  # float32 (1 - clip) / 2
    BITS: tl.constexpr, LEVELS: tl.constexpr, G: tl.constexpr, GT: tl.constexpr,
    PU: tl.constexpr, UB: tl.constexpr, BU: tl.constexpr,
):
    i_nb, i_u = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_blk = i_nb // NB, i_nb % NB
    o_i = tl.arange(0, GT)
    o_t = i_blk * G + o_i.to(tl.int64)
    m_t = (o_i < G) & (o_t < T)
    o_u = i_u * BU + tl.arange(0, BU)
    o_j = tl.arange(0, PU)
    o_c = o_u[:, None] * PU + o_j[None, :]  # (BU, PU)
    m_c = o_c < C
    m_x = m_t[:, None, None] & m_c[None, :, :]
    p_x = X + i_n * s_xn + o_t[:, None, None] * s_xt + o_c[None, :, :]
    b_x = tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)
    b_x = tl.minimum(tl.maximum(b_x, -65504.0), 65504.0)
    b_mn, b_mx = group_min_max(b_x, m_x, m_c, 0)
    b_scale, b_zero = scale_zero(b_mn, b_mx, clip_w, LEVELS)  # (BU, PU)
    o_s = i_n * s_sn + i_blk * s_sb + o_c
    tl.store(S + o_s, b_scale, mask=m_c)
    tl.store(Z + o_s, b_zero, mask=m_c)
    b_q = tl.where(m_x, quant_codes(b_x, b_scale[None, :, :], b_zero[None, :, :], LEVELS), 0)
    m_w = m_t[:, None] & (o_u < NU)[None, :]
    store_packed(P + i_n * s_pn + o_t[:, None] * s_pt + o_u[None, :] * UB, b_q, m_w, BITS, PU, UB)


def _check_out(name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        raise ValueError(
            f"quantize_pack_triton: out {name} must be {dtype} {shape} on {device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"quantize_pack_triton: out {name} must be contiguous (a row range of a cache buffer is)")


def quantize_pack_triton(x: Tensor, spec: QuantSpec, *, out: tuple[Tensor, Tensor, Tensor] | None = None) -> QTensor:
    """Quantize and pack x (..., T, C) with Triton; bit-identical to ``quantize_ref``.

    ``out = (packed, scale, zero)`` writes into existing contiguous buffers, e.g. a row range of a
    cache: packed uint8 (..., T, packed_width(C)); scale/zero fp16 (..., T, ceil(C / g)) on the token
    axis, (..., ceil(T / g), C) on the channel axis. Needs CUDA tensors or ``TRITON_INTERPRET=1``.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    use_triton("quantize_pack_triton", "triton", x)  # raises when the kernel cannot run here
    if x.dtype not in FLOATS:
        raise ValueError(f"quantize expects one of {FLOATS}, got {x.dtype}")
    if x.dim() < 2 or x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"quantize expects a (..., T, C) tensor with T, C >= 1, got {tuple(x.shape)}")
    *batch, t, c = x.shape
    n = math.prod(batch)
    g, bits = spec.group_size, spec.bits
    per_unit, unit_bytes = packing_unit(bits)
    pw, n_units = packed_width(c, bits), -(-c // per_unit)
    sz_shape = (*batch, t, -(-c // g)) if spec.axis == "token" else (*batch, -(-t // g), c)
    if out is None:
        packed = torch.empty((*batch, t, pw), dtype=torch.uint8, device=x.device)
        scale = torch.empty(sz_shape, dtype=torch.float16, device=x.device)
        zero = torch.empty(sz_shape, dtype=torch.float16, device=x.device)
    else:
        packed, scale, zero = out
        _check_out("packed", packed, (*batch, t, pw), torch.uint8, x.device)
        _check_out("scale", scale, sz_shape, torch.float16, x.device)
        _check_out("zero", zero, sz_shape, torch.float16, x.device)
    xc = x.reshape(n, t, c).contiguous()
    clip_w = clip_weight(spec.clip)
    levels = spec.levels
    with on_device(x.device):
        if spec.axis == "token":
            ng = -(-c // g)
            gp = next_pow2(g)
            ngb = max(1, min(next_pow2(ng), 1024 // gp))
            br = 16 if INTERPRET else 4
            bu = max(1, min(next_pow2(n_units), 1024 // per_unit))
            rows = n * t
            _quant_token_kernel[(cdiv(rows, br),)](
                xc, packed, scale, zero, rows, c, ng, n_units, c, pw, ng, clip_w,
                BITS=bits, LEVELS=levels, G=g, GP=gp, NGB=ngb, BR=br, PU=per_unit, UB=unit_bytes, BU=bu,
                enable_fp_fusion=False, num_warps=4,
            )
        else:
            nb = -(-t // g)
            gt = next_pow2(min(g, t) if INTERPRET else g)  # on a GPU one variant per g, not per short T
            bu = max(1, min(next_pow2(n_units), 8192 // (gt * per_unit)))
            _quant_channel_kernel[(n * nb, cdiv(n_units, bu))](
                xc, packed, scale, zero, t, c, nb, n_units, t * c, c, t * pw, pw, nb * c, c, clip_w,
                BITS=bits, LEVELS=levels, G=g, GT=gt, PU=per_unit, UB=unit_bytes, BU=bu,
                enable_fp_fusion=False, num_warps=4,
            )
    return QTensor(packed=packed, scale=scale, zero=zero, spec=spec, shape=x.shape, dtype=x.dtype)


# ----------------------------------------------------------------------------- public entry points


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes along the last axis into ``packed_width(n, bits)`` bytes.

    Codes must be < 2**bits; this is not checked because checking needs a device sync.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack expects uint8 codes, got {codes.dtype}")
    if codes.dim() < 1:
        raise ValueError("pack expects at least one dimension (codes are packed along the last axis)")
    return pack_ref(codes, bits)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Recover the first ``n`` uint8 codes of each row packed by ``pack``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack expects uint8 input, got {packed.dtype}")
    if packed.dim() < 1 or packed.shape[-1] != packed_width(n, bits):
        raise ValueError(
            f"unpack: last axis must be packed_width({n}, {bits}) = {packed_width(n, bits)} bytes, "
            f"got shape {tuple(packed.shape)}"
        )
    return unpack_ref(packed, bits, n)


def quantize(x: Tensor, spec: QuantSpec, *, backend: str = "auto") -> QTensor:
    """Quantize x of shape (..., T, C) (fp16, bf16 or fp32) per ``spec``.

    ``backend``: ``"auto"`` runs the Triton kernel on CUDA tensors and ``quantize_ref`` otherwise
    (the two are bit-identical); ``"triton"`` / ``"ref"`` force one (see ``_triton.use_triton``).
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if x.dtype not in FLOATS:
        raise ValueError(f"quantize expects one of {FLOATS}, got {x.dtype}")
    if x.dim() < 2 or x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"quantize expects a (..., T, C) tensor with T, C >= 1, got {tuple(x.shape)}")
    if use_triton("quantize", backend, x):
        return quantize_pack_triton(x, spec)
    return quantize_ref(x, spec)


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> Tensor:
    """Dequantize to ``dtype`` (default: the dtype that was quantized)."""
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOATS:
        raise ValueError(f"dequantize can produce one of {FLOATS}, got {dtype}")
    return dequantize_ref(q, dtype)


def fake_quantize(x: Tensor, spec: QuantSpec) -> Tensor:
    """``dequantize(quantize(x))`` in x's dtype: the in-forward quantization of the perplexity protocol."""
    return dequantize(quantize(x, spec), x.dtype)
