"""Helpers shared by the kernel modules: argument checks, split planning, the ``@jit`` device
functions that more than one kernel inlines (each row's split span, stream tiles, grouped queries,
rotate-half RoPE scores) and flash-decoding's merge kernel, which KIVI* and plain KV attention share.

The kernel files import from here and from ``_triton``, never private names of a sibling kernel.

``load_tile`` is the one place where kernels read a ``packed.PackedStream``: it dequantizes a (tokens x
channels) tile in registers (float32 ``code * scale + zero``, ``quant`` rule step 8) or reads the
tail, by token (shifted layout ``tail[t - sealed]`` or ring layout ``tail[t % cap]``).
``group_min_max``, ``scale_zero``, ``quant_codes`` and ``store_packed`` are the ``quant`` rule and
packing on the device; every kernel that writes codes (``quant``, ``stream_append``) uses them, so
the rule is written once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from xqcli.kernels._triton import INTERPRET, cdiv, jit, next_pow2, num_sms, tl

__all__ = [
    "FLOATS",
    "FlashPlan",
    "check_q_out",
    "check_query",
    "check_rope_tables",
    "check_seq_lens",
    "group_min_max",
    "load_half",
    "load_query",
    "launch_merge",
    "load_tile",
    "merge_splits_kernel",
    "merged_max",
    "online_softmax",
    "plan_flash",
    "plan_splits",
    "quant_codes",
    "resolve_len",
    "rope_scores",
    "rotate_half",
    "row_span",
    "scale_zero",
    "store_packed",
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


def check_q_out(op: str, q: Tensor, seq_lens: Tensor, out: Tensor | None) -> None:
    """Shared checks of a decode attention op's query (B, H, D), lengths and output buffer."""
    if q.dim() != 3 or q.dtype not in FLOATS:
        raise ValueError(f"{op}: q must be a float (B, H, D) tensor, got {q.dtype} {tuple(q.shape)}")
    if q.stride(-1) != 1:
        raise ValueError(f"{op}: q must have a unit stride on its last axis")
    check_seq_lens(op, seq_lens, q.shape[0])
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"{op}: out must be {q.dtype} {tuple(q.shape)} on {q.device} with unit last stride, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")


def check_query(op: str, q: Tensor, cos: Tensor, sin: Tensor, seq_lens: Tensor, out: Tensor | None) -> None:
    """Shared checks of the RoPE-applying attention ops' query, RoPE tables, lengths and output."""
    check_q_out(op, q, seq_lens, out)
    check_rope_tables(op, cos, sin, q.shape[2])


def check_rope_tables(op: str, cos: Tensor, sin: Tensor, hd: int) -> None:
    """Raise ValueError unless cos/sin are matching float (positions, hd) rotate-half tables, hd even."""
    if hd % 2 or hd < 2:
        raise ValueError(f"{op}: head_dim must be even (rotate-half RoPE), got {hd}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[1] != hd or t.dtype not in FLOATS or t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be a float (positions, D={hd}) table with unit last stride, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ValueError(f"{op}: cos and sin must have the same shape and strides")


def resolve_len(op: str, seq_lens: Tensor, max_seq_len: int | None, limit: int, capacity: int | None = None,
                holder: str = "RoPE tables") -> int:
    """The host bound of every row's length that sizes a launch (grid, scratch buffers).

    ``capacity``: a static launch for the allocated context (a cache's max_len): nothing in the
    launch depends on the current lengths, so it can be captured in a CUDA graph and replayed every
    step. ``max_seq_len``: a host bound of the current lengths (eager steps). Neither: read the
    longest row from the device (a sync). The bound must fit ``limit`` (positions the ``holder`` has).
    Rows must not exceed it: seq_lens is not checked on the device (that would sync).
    """
    if capacity is not None and max_seq_len is not None:
        raise ValueError(f"{op}: pass capacity (a static launch) or max_seq_len (an eager bound), not both")
    if capacity is not None:
        if capacity < 1:
            raise ValueError(f"{op}: capacity must be >= 1 token, got {capacity}")
        n = int(capacity)
    else:
        n = int(seq_lens.max()) if max_seq_len is None else int(max_seq_len)
    if n > limit:
        raise ValueError(f"{op}: {holder} hold {limit} positions but rows may reach {n} tokens")
    return n


def plan_splits(max_len: int, programs: int, device: torch.device, block_t: int,
                split_tokens: int | None = None, per_sm: int = 2) -> tuple[int, int]:
    """(least tokens per split, number of splits) for flash-decoding rows of up to ``max_len`` tokens.

    The split count sizes the grid and is fixed by the host bound alone; each program then sizes
    its row's splits on the device (``row_span``): a row of n tokens is spread evenly over the
    splits, in whole ``block_t`` tiles and at least the returned split size per split, and programs
    past the row's last split exit at once. So a launch sized for a 128k capacity (33 splits for
    batch 1 x 8 kv heads on an H200) gives a 300-token row 5 busy splits of 64 tokens per kv head and
    28 idle programs that return after one load, not 2,048 tile programs, and a row that reaches the
    capacity still uses every split. The count aims at about ``per_sm`` programs per SM over the
    ``programs`` (batch x kv heads) that already exist and never exceeds the tiles of ``max_len``.
    ``split_tokens`` fixes the split size instead (tests use it to force several splits on short
    rows): then every row uses splits of exactly that many tokens, rounded up to tiles.
    """
    max_len = max(1, max_len)
    if split_tokens is not None:
        if split_tokens < 1:
            raise ValueError(f"split_tokens must be >= 1, got {split_tokens}")
        split = cdiv(split_tokens, block_t) * block_t
        return split, cdiv(max_len, split)
    return block_t, max(1, min(cdiv(per_sm * num_sms(device), programs), cdiv(max_len, block_t)))


class FlashPlan(NamedTuple):
    """Sizes and shared scratch of one flash-decoding launch (``plan_flash``)."""

    lowp: bool  # fp16/bf16 operands on tensor cores (GPU only); else float32 ieee dots
    bt: int  # tokens per tile
    split: int  # least tokens per split (``plan_splits``)
    n_splits: int  # split programs per (row, kv head)
    ml: Tensor  # float32 (B, H, n_splits, 2): each split's running max and sum


def plan_flash(q: Tensor, n_kv: int, span: int, dtype: torch.dtype, split_tokens: int | None) -> FlashPlan:
    """Plan a flash-decoding launch of q (B, H, D) over rows of up to ``span`` attended tokens, whose
    operands are ``dtype``. Tiles: 32 tokens under the interpreter (fewer numpy steps) and for the
    float32 FMA path, 64 for tensor cores (sizes checked against register spills with ptxas -v, sm_90)."""
    lowp = not INTERPRET and dtype in (torch.float16, torch.bfloat16)
    bt = 32 if INTERPRET or not lowp else 64
    bsz, n_heads, _ = q.shape
    split, n_splits = plan_splits(span, bsz * n_kv, q.device, bt, split_tokens)
    ml = torch.empty(bsz, n_heads, n_splits, 2, dtype=torch.float32, device=q.device)
    return FlashPlan(lowp, bt, split, n_splits, ml)


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
def row_span(SEQ, i_b, NS, SPLIT, BT: tl.constexpr, WINDOW: tl.constexpr):
    """Row i_b's attended tokens [lo, hi) and how its NS split programs share them: (lo, hi, tokens
    per split, splits in use). The length is read here, on the device; ``plan_splits`` documents the
    rule (even spread in whole BT tiles, at least SPLIT tokens a split). WINDOW > 0: only the last
    WINDOW tokens (a sliding window that counts the query's own token)."""
    hi = tl.load(SEQ + i_b).to(tl.int64)
    lo = hi * 0
    if WINDOW > 0:
        lo = tl.maximum(hi - WINDOW, 0)
    split = tl.maximum(SPLIT, tl.cdiv(tl.cdiv(hi - lo, NS), BT) * BT)
    return lo, hi, split, tl.cdiv(hi - lo, split)


@jit
def online_softmax(b_s, b_m, b_l):
    """One tile of flash-decoding's online softmax over log2-scaled scores b_s (BG, BT), -inf where
    masked: (the tile's probabilities against the new running max, the factor that rescales what was
    accumulated so far, the new max, the new sum)."""
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_alpha = tl.exp2(b_m - b_mn)
    b_p = tl.exp2(b_s - b_mn[:, None])
    return b_p, b_alpha, b_mn, b_l * b_alpha + tl.sum(b_p, 1)


@jit
def store_split(ACC, s_ab, s_ah, s_as, ML, s_mlb, s_mlh, i_b, i_s, o_h, m_g, o_d, m_d, b_acc, b_m, b_l):
    """Write split i_s's unnormalized (G, D) output and its running max and sum, what
    ``merge_splits_kernel`` reads."""
    tl.store(ACC + i_b * s_ab + o_h[:, None] * s_ah + i_s * s_as + o_d[None, :], b_acc,
             mask=m_g[:, None] & m_d[None, :])
    p_ml = ML + i_b * s_mlb + o_h * s_mlh + i_s * 2
    tl.store(p_ml, b_m, mask=m_g)
    tl.store(p_ml + 1, b_l, mask=m_g)


@jit
def merged_max(p_ml, n_used, m_g, BG: tl.constexpr):
    """The largest running max over a row's n_used splits, per query lane; 0 for a row without tokens."""
    b_mx = tl.full([BG], float("-inf"), tl.float32)
    for i_s in range(n_used):
        b_mx = tl.maximum(b_mx, tl.load(p_ml + i_s * 2, mask=m_g, other=float("-inf")))
    return tl.where(b_mx == float("-inf"), 0.0, b_mx)


@jit(do_not_specialize=["NS", "SPLIT", "s_ab", "s_ah", "s_mlb", "s_mlh"])
def merge_splits_kernel(
    ACC, s_ab, s_ah, s_as,  # unnormalized per split outputs (B, H, NS, D) float32
    ML, s_mlb, s_mlh,  # per split running max (log2 units) and sum (B, H, NS, 2) float32
    O, s_ob, s_oh,  # out (B, H, D)
    SEQ, NS, SPLIT,  # tokens per row; the split plan (``row_span``)
    G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Flash-decoding's merge, one program per (row, kv head): rescale each split in use by
    exp2(m_s - M), divide by the merged sum. Splits past the row's last were never written."""
    i_b, i_hk = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    _lo, _hi, _split, n_used = row_span(SEQ, i_b, NS, SPLIT, BT, WINDOW)
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_h = i_hk * G + o_g
    o_d = tl.arange(0, BD)
    m_gd = m_g[:, None] & (o_d < D)[None, :]
    p_ml = ML + i_b * s_mlb + o_h * s_mlh
    b_mx = merged_max(p_ml, n_used, m_g, BG)
    b_sum = tl.zeros([BG], tl.float32)
    b_o = tl.zeros([BG, BD], tl.float32)
    p_a = ACC + i_b * s_ab + o_h[:, None] * s_ah + o_d[None, :]
    for i_s in range(n_used):
        b_w = tl.exp2(tl.load(p_ml + i_s * 2, mask=m_g, other=float("-inf")) - b_mx)
        b_sum += b_w * tl.load(p_ml + i_s * 2 + 1, mask=m_g, other=0.0)
        b_o += b_w[:, None] * tl.load(p_a + i_s * s_as, mask=m_gd, other=0.0)
    b_o = b_o * tl.where(b_sum > 0, 1.0 / tl.where(b_sum > 0, b_sum, 1.0), 0.0)[:, None]
    tl.store(O + i_b * s_ob + o_h[:, None] * s_oh + o_d[None, :], b_o, mask=m_gd)


def launch_merge(acc: Tensor, ml: Tensor, out: Tensor, seq_lens: Tensor, split: int, block_t: int,
                 group: int, window: int = 0) -> None:
    """Launch ``merge_splits_kernel`` over (B, H_kv): acc (B, H, NS, D) and ml (B, H, NS, 2) into
    out (B, H, D), with the split plan (``split``, ``block_t``, ``window``) the split kernel used."""
    bsz, n_heads, n_splits, hd = acc.shape
    merge_splits_kernel[(bsz, n_heads // group)](
        acc, acc.stride(0), acc.stride(1), acc.stride(2),
        ml, ml.stride(0), ml.stride(1),
        out, out.stride(0), out.stride(1),
        seq_lens, n_splits, split,
        G=group, BG=max(16, next_pow2(group)), D=hd, BD=max(16, next_pow2(hd)), BT=block_t, WINDOW=window,
        num_warps=4,
    )


@jit
def load_half(p, o_lo, o_hi, m):
    """fp16 values stored as a low byte at p + o_lo and a high byte at p + o_hi (any alignment), as float32;
    0 where m is false."""
    b_lo = tl.load(p + o_lo, mask=m, other=0).to(tl.int32)
    b_hi = tl.load(p + o_hi, mask=m, other=0).to(tl.int32)
    return (b_lo | (b_hi << 8)).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@jit
def load_tile(
    p_c, s_ct,  # this row's codes, token stride
    p_s, p_z, s_st,  # this row's scale and zero, stride per token (token axis) or per block (channel axis)
    p_t, s_tt,  # this row's tail, token stride
    p_bt,  # this row's block table (read only if PAGE)
    o_t, o_c,  # (BT,) token and (BC,) channel indices
    m_q, m_f, m_c,  # (BT,) tokens read from codes, (BT,) tokens read from the tail, (BC,) valid channels
    sealed,  # quantized tokens of this row
    t0, c0,  # first token and first channel of the tile (used when ALIGNED)
    BITS: tl.constexpr, GS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_CODES: tl.constexpr,
    ALIGNED: tl.constexpr, RING: tl.constexpr = 0, PAGE: tl.constexpr = 0,
):
    """A (BT, BC) float32 tile of the stream; 0 where neither mask holds.

    RING: 0 for the shifted tail layout (token t at ``tail[t - sealed]``), else the ring's capacity
    (token t at ``tail[t % RING]``, ``stream_append``'s layout; a constant divisor is cheap).
    ALIGNED: the tile lies in one quantization group along the grouped axis (channel axis: its
    tokens share one scale row; token axis: its channels share one group), so scale/zero are a
    vector load instead of a per-element gather.
    PAGE: 0 for a row's own buffers, else tokens per page of a ``packed.PagedStream``: token t's codes
    are in row ``t % PAGE`` of page ``p_bt[t // PAGE]`` (p_c, p_s, p_z are byte pointers into the
    shared pages, s_ct the page row's bytes), its fp16 scales and zeros two bytes each in that row
    (token axis) or spread over the page's rows, s_st bytes a row (channel axis).
    """
    m_ft = m_f[:, None] & m_c[None, :]
    if RING:
        o_f = o_t % RING
    else:
        o_f = o_t - sealed
    b_x = tl.load(p_t + o_f[:, None] * s_tt + o_c[None, :], mask=m_ft, other=0.0).to(tl.float32)
    if HAS_CODES:
        m_qt = m_q[:, None] & m_c[None, :]
        o_bit = o_c * BITS  # codes form a little-endian bit stream: code c starts at bit c * BITS
        o_sh = o_bit % 8
        if PAGE:
            o_pg = tl.load(p_bt + o_t // PAGE, mask=m_q, other=0).to(tl.int64) * PAGE  # each token's page's row 0
            o_r = o_pg + o_t % PAGE
        else:
            o_r = o_t
        p_b = p_c + o_r[:, None] * s_ct + (o_bit // 8)[None, :]
        b_w = tl.load(p_b, mask=m_qt, other=0).to(tl.int32)
        if BITS == 3:  # a 3-bit code may straddle two bytes
            b_w = b_w | (tl.load(p_b + 1, mask=m_qt & (o_sh > 5)[None, :], other=0).to(tl.int32) << 8)
        b_q = ((b_w >> o_sh[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        if PAGE:
            if PER_CHANNEL:  # channel c's fp16 is bytes 2c, 2c + 1 of the page's scales, s_st of them a row
                o_j = 2 * o_c
                o_lo = (o_pg * s_ct)[:, None] + ((o_j // s_st) * s_ct + o_j % s_st)[None, :]
                o_hi = (o_pg * s_ct)[:, None] + (((o_j + 1) // s_st) * s_ct + (o_j + 1) % s_st)[None, :]
            else:
                o_lo = o_r[:, None] * s_ct + (2 * (o_c // GS))[None, :]
                o_hi = o_lo + 1
            b_sc = load_half(p_s, o_lo, o_hi, m_qt)
            b_zr = load_half(p_z, o_lo, o_hi, m_qt)
            return tl.where(m_qt, b_q * b_sc + b_zr, b_x)
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


@jit
def group_min_max(b_x, m_x, m_s, AXIS: tl.constexpr):
    """Quant rule step 2: float32 min and max of each group, reducing ``AXIS``; m_x masks the
    elements, m_s the groups (0 for groups outside it)."""
    b_mn = tl.where(m_s, tl.min(tl.where(m_x, b_x, float("inf")), axis=AXIS), 0.0)
    b_mx = tl.where(m_s, tl.max(tl.where(m_x, b_x, float("-inf")), axis=AXIS), 0.0)
    return b_mn, b_mx


@jit
def scale_zero(b_mn, b_mx, clip_w, LEVELS: tl.constexpr):
    """Quant rule steps 3-5 on float32 group min/max: fp16 (scale, zero)."""
    b_w = (b_mx - b_mn) * clip_w
    b_mn = b_mn + b_w
    b_mx = b_mx - b_w
    b_h = b_mn.to(tl.float16)  # round to nearest even
    b_bits = b_h.to(tl.int16, bitcast=True).to(tl.int32)
    # one fp16 step toward -inf in sign-magnitude: +x -> bits - 1, +-0 -> 0x8001, -x -> bits + 1
    b_down = tl.where(b_bits > 0, b_bits - 1, tl.where(b_bits == 0, -0x7FFF, b_bits + 1))
    b_down = b_down.to(tl.int16).to(tl.float16, bitcast=True)
    b_zero = tl.where(b_h.to(tl.float32) > b_mn, b_down, b_h)
    b_z = b_zero.to(tl.float32)
    b_scale = tl.math.div_rn(b_mx - b_z, tl.full(b_mx.shape, LEVELS, tl.float32)).to(tl.float16)
    b_up = (b_scale.to(tl.int16, bitcast=True).to(tl.int32) + 1).to(tl.int16).to(tl.float16, bitcast=True)
    b_scale = tl.where(b_scale.to(tl.float32) * LEVELS + b_z < b_mx, b_up, b_scale)
    return b_scale, b_zero


@jit
def quant_codes(b_x, b_scale, b_zero, LEVELS: tl.constexpr):
    """Quant rule steps 6-7: int32 codes of float32 x for fp16 scale/zero (broadcastable)."""
    b_s = b_scale.to(tl.float32)
    b_s = tl.where(b_s == 0, 1.0, b_s)
    b_q = tl.floor(tl.math.div_rn(b_x - b_zero.to(tl.float32), b_s) + 0.5)
    b_q = tl.minimum(tl.maximum(b_q, 0.0), LEVELS * 1.0)
    return b_q.to(tl.int32)


@jit
def store_packed(p_p, b_q, m_w, BITS: tl.constexpr, PU: tl.constexpr, UB: tl.constexpr):
    """Pack int32 codes b_q (R, BU, PU), a packing unit per (R, BU) entry, and store each unit's UB
    little-endian bytes at p_p (R, BU) (the unit's first byte) where m_w holds."""
    o_j = tl.arange(0, PU)
    b_w = tl.sum(b_q << (o_j * BITS)[None, None, :], axis=2)  # disjoint bit fields: the sum is an OR
    for k in tl.static_range(UB):
        tl.store(p_p + k, ((b_w >> (8 * k)) & 0xFF).to(tl.uint8), mask=m_w)


@jit
def round_to(x, DT: tl.constexpr):
    """float32 x rounded to the nearest DT value (ties to even), kept in float32: torch's rounding
    after each op in DT. bf16 by bit arithmetic, because the interpreter truncates bf16 casts."""
    if DT == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    elif DT == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@jit
def rope_halves(p_x, COS, SIN, p_r, m_hd, m_d, DH: tl.constexpr, XT: tl.constexpr):
    """RoPE of a (heads, head_dim) tile at one position, as `xqcli.rope.Rope.apply` computes it in x's dtype
    XT: x·cos + rotate_half(x)·sin with rotate_half(x) = (−x2, x1), each op rounded to XT. Returns the two
    halves in float32 (rounded to XT). p_x points at the tile's first half; p_r at the position's table row."""
    b_x1 = tl.load(p_x, mask=m_hd, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_x + DH, mask=m_hd, other=0.0).to(tl.float32)
    b_c1 = round_to(tl.load(COS + p_r, mask=m_d, other=0.0).to(tl.float32), XT)[None, :]
    b_c2 = round_to(tl.load(COS + DH + p_r, mask=m_d, other=0.0).to(tl.float32), XT)[None, :]
    b_s1 = round_to(tl.load(SIN + p_r, mask=m_d, other=0.0).to(tl.float32), XT)[None, :]
    b_s2 = round_to(tl.load(SIN + DH + p_r, mask=m_d, other=0.0).to(tl.float32), XT)[None, :]
    b_o1 = round_to(round_to(b_x1 * b_c1, XT) - round_to(b_x2 * b_s1, XT), XT)
    b_o2 = round_to(round_to(b_x2 * b_c2, XT) + round_to(b_x1 * b_s2, XT), XT)
    return b_o1, b_o2
