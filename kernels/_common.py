"""Helpers shared by the kernel modules: argument checks, split planning, and the ``@jit`` device
functions that more than one kernel inlines (stream tiles, grouped queries, rotate-half RoPE scores).

The kernel files import from here and from ``_triton``, never private names of a sibling kernel.

``load_tile`` is the one place where kernels read a ``packed.PackedStream``: it dequantizes a (tokens x
channels) tile in registers (float32 ``code * scale + zero``, ``quant`` rule step 8) or reads the
tail, by token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xqcli.kernels._triton import cdiv, jit, num_sms, tl

__all__ = [
    "FLOATS",
    "check_query",
    "check_seq_lens",
    "load_query",
    "load_tile",
    "plan_splits",
    "resolve_len",
    "rope_scores",
    "rotate_half",
]

FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # the float dtypes every op accepts


def rotate_half(x: Tensor) -> Tensor:
    """HF's rotate-half: (x1, x2) -> (-x2, x1) on the last axis (the references' RoPE)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def check_seq_lens(op: str, seq_lens: Tensor, batch: int) -> None:
    """Raise ValueError unless seq_lens is an int32/int64 (batch,) vector of tokens per row."""
    if seq_lens.shape != (batch,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: seq_lens must be int32/int64 of shape ({batch},), "
                         f"got {seq_lens.dtype} {tuple(seq_lens.shape)}")


def check_query(op: str, q: Tensor, cos: Tensor, sin: Tensor, seq_lens: Tensor, out: Tensor | None) -> None:
    """Shared checks of the attention ops' query, RoPE tables, lengths and output."""
    if q.dim() != 3 or q.dtype not in FLOATS:
        raise ValueError(f"{op}: q must be a float (B, H, D) tensor, got {q.dtype} {tuple(q.shape)}")
    bsz, _, hd = q.shape
    if hd % 2 or hd < 2:
        raise ValueError(f"{op}: head_dim must be even (rotate-half RoPE), got {hd}")
    if q.stride(-1) != 1:
        raise ValueError(f"{op}: q must have a unit stride on its last axis")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[1] != hd or t.dtype not in FLOATS or t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be a float (positions, D={hd}) table with unit last stride, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ValueError(f"{op}: cos and sin must have the same shape and strides")
    check_seq_lens(op, seq_lens, bsz)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"{op}: out must be {q.dtype} {tuple(q.shape)} on {q.device} with unit last stride, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")


def resolve_len(op: str, seq_lens: Tensor, max_seq_len: int | None, rope_rows: int) -> int:
    """Tokens the longest row reaches (host bound if given, else a device sync); must fit the RoPE tables."""
    n = int(seq_lens.max()) if max_seq_len is None else int(max_seq_len)
    if n > rope_rows:
        raise ValueError(f"{op}: RoPE tables hold {rope_rows} positions but rows reach {n} tokens")
    return n


def plan_splits(max_len: int, programs: int, device: torch.device, block_t: int,
                split_tokens: int | None = None) -> tuple[int, int]:
    """(tokens per split, number of splits) for flash-decoding over ``max_len`` cached tokens.

    Aims at about two programs per SM over the ``programs`` (batch x kv heads) that already exist;
    a split is a whole number of ``block_t`` tiles. ``split_tokens`` fixes the split size (tests use
    it to force several splits on short sequences).
    """
    max_len = max(1, max_len)
    if split_tokens is not None:
        if split_tokens < 1:
            raise ValueError(f"split_tokens must be >= 1, got {split_tokens}")
        split = cdiv(split_tokens, block_t) * block_t
    else:
        n = max(1, min(cdiv(2 * num_sms(device), programs), cdiv(max_len, block_t)))
        split = cdiv(cdiv(max_len, n), block_t) * block_t
    return split, cdiv(max_len, split)


# ----------------------------------------------------------------------------- device functions


@jit
def load_query(p_q, s_qh, i_hk, qk_scale, G: tl.constexpr, BG: tl.constexpr, DH: tl.constexpr,
               BDH: tl.constexpr):
    """The G query heads of kv head i_hk, pre-scaled, as their two rotate-half halves (BG, BDH).

    Returns (m_g, o_h, o_d, m_d, q1, q2): the mask of the group lanes, their query heads, half-dim
    lanes and their mask, and the halves. p_q points at this row's q (H, D) with head stride s_qh.
    """
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_h = i_hk * G + o_g
    o_d = tl.arange(0, BDH)
    m_d = o_d < DH
    m_gd = m_g[:, None] & m_d[None, :]
    p = p_q + o_h[:, None] * s_qh + o_d[None, :]
    b_q1 = tl.load(p, mask=m_gd, other=0.0).to(tl.float32) * qk_scale
    b_q2 = tl.load(p + DH, mask=m_gd, other=0.0).to(tl.float32) * qk_scale
    return m_g, o_h, o_d, m_d, b_q1, b_q2


@jit
def rope_scores(b_q1, b_q2, b_k1, b_k2, COS, SIN, s_rope, o_t, m_t, o_d, m_d, DH: tl.constexpr,
                LOWP: tl.constexpr):
    """Scores (BG, BT) of the query halves against a key tile's halves after RoPE at each token's
    position; -inf for the tile's tokens outside m_t. Rotate-half RoPE:
    (k1, k2) -> (k1 cos1 - k2 sin1, k2 cos2 + k1 sin2)."""
    p_r = o_t[:, None] * s_rope + o_d[None, :]
    m_r = m_t[:, None] & m_d[None, :]
    b_cos1 = tl.load(COS + p_r, mask=m_r, other=0.0).to(tl.float32)
    b_cos2 = tl.load(COS + DH + p_r, mask=m_r, other=0.0).to(tl.float32)
    b_sin1 = tl.load(SIN + p_r, mask=m_r, other=0.0).to(tl.float32)
    b_sin2 = tl.load(SIN + DH + p_r, mask=m_r, other=0.0).to(tl.float32)
    b_r1 = b_k1 * b_cos1 - b_k2 * b_sin1
    b_r2 = b_k2 * b_cos2 + b_k1 * b_sin2
    if LOWP:
        b_s = tl.dot(b_q1, tl.trans(b_r1), input_precision="tf32")
        b_s = tl.dot(b_q2, tl.trans(b_r2), b_s, input_precision="tf32")
    else:
        b_s = tl.dot(b_q1, tl.trans(b_r1), input_precision="ieee")
        b_s = tl.dot(b_q2, tl.trans(b_r2), b_s, input_precision="ieee")
    return tl.where(m_t[None, :], b_s, float("-inf"))


@jit
def load_tile(
    p_c, s_ct,  # this row's codes, token stride
    p_s, p_z, s_st,  # this row's scale and zero, stride per token (token axis) or per block (channel axis)
    p_t, s_tt,  # this row's tail (its first token is token `sealed`), token stride
    o_t, o_c,  # (BT,) token and (BC,) channel indices
    m_q, m_f, m_c,  # (BT,) tokens read from codes, (BT,) tokens read from the tail, (BC,) valid channels
    sealed,  # quantized tokens of this row
    t0, c0,  # first token and first channel of the tile (used when ALIGNED)
    BITS: tl.constexpr, GS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_CODES: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """A (BT, BC) float32 tile of the stream; 0 where neither mask holds.

    ALIGNED: the tile lies in one quantization group along the grouped axis (channel axis: its
    tokens share one scale row; token axis: its channels share one group), so scale/zero are a
    vector load instead of a per-element gather.
    """
    m_ft = m_f[:, None] & m_c[None, :]
    b_x = tl.load(p_t + (o_t - sealed)[:, None] * s_tt + o_c[None, :], mask=m_ft, other=0.0).to(tl.float32)
    if HAS_CODES:
        m_qt = m_q[:, None] & m_c[None, :]
        o_bit = o_c * BITS  # codes form a little-endian bit stream: code c starts at bit c * BITS
        o_sh = o_bit % 8
        p_b = p_c + o_t[:, None] * s_ct + (o_bit // 8)[None, :]
        b_w = tl.load(p_b, mask=m_qt, other=0).to(tl.int32)
        if BITS == 3:  # a 3-bit code may straddle two bytes
            b_w = b_w | (tl.load(p_b + 1, mask=m_qt & (o_sh > 5)[None, :], other=0).to(tl.int32) << 8)
        b_q = ((b_w >> o_sh[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        if PER_CHANNEL:
            if ALIGNED:
                o_s = ((t0 // GS) * s_st + o_c)[None, :]  # (1, BC)
                m_s = (m_c & ((o_c * 0 + t0) < sealed))[None, :]  # (vector form: the interpreter mishandles scalar & vector masks)
            else:
                o_s = (o_t // GS)[:, None] * s_st + o_c[None, :]
                m_s = m_qt
        else:
            if ALIGNED:
                o_s = (o_t * s_st + c0 // GS)[:, None]  # (BT, 1)
                m_s = m_q[:, None]
            else:
                o_s = o_t[:, None] * s_st + (o_c // GS)[None, :]
                m_s = m_qt
        b_sc = tl.load(p_s + o_s, mask=m_s, other=0.0).to(tl.float32)
        b_zr = tl.load(p_z + o_s, mask=m_s, other=0.0).to(tl.float32)
        b_x = tl.where(m_qt, b_q * b_sc + b_zr, b_x)
    return b_x
