"""KIVI* decode attention with fused dequantization (the paper's baseline, docs/design.md §5).

KIVI* caches pre-RoPE keys with per-channel groups and values with per-token groups (both
``group_size`` tokens/channels, asymmetric, the ``xqcli.kernels.quant`` rule), plus a full-precision
tail of the newest tokens. One new query token per row attends over a row's cached tokens:

    K_j = RoPE(deq(k codes)[:, head j]) at each token's position (= its index),  V_j = deq(v codes)[:, head j]
    out_h = softmax(q_h · K_jᵀ / sqrt(D)) · V_j,        query head h uses kv head j = h // (H / H_kv)

Flash-decoding in two launches: ``_kivi_split_kernel`` (B, H_kv, splits) dequantizes K and V tiles
in registers, applies RoPE to the two rotate-half halves, scores the G query heads of the kv group
and keeps an online softmax with a (G, D) float32 accumulator; ``_kivi_reduce_kernel`` (B, H_kv)
merges the splits. Nothing but the (B, H, splits, D) partial outputs is written.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from xqcli.kernels._common import (
    check_query,
    load_query,
    load_tile,
    plan_splits,
    resolve_len,
    rope_scores,
    rotate_half,
)
from xqcli.kernels._triton import INTERPRET, check_device, jit, next_pow2, on_device, tl, use_triton
from xqcli.kernels.packed import PackedStream

__all__ = ["kivi_attention", "kivi_attention_ref"]


def kivi_attention_ref(
    q: Tensor,
    k: PackedStream,
    v: PackedStream,
    cos: Tensor,
    sin: Tensor,
    seq_lens: Tensor,
    *,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Reference: dequantize with the quant refs, RoPE on K, softmax attention, in ``compute_dtype``.

    Same arguments as ``kivi_attention``; the softmax is float32. Rows of length 0 give 0.
    Returns (B, H, D) in q.dtype.
    """
    bsz, n_heads, hd = q.shape
    n_kv = k.c // hd
    grp = n_heads // n_kv
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    cd = compute_dtype
    out = torch.zeros(bsz, n_heads, hd, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        n = int(seq_lens[b])
        if n == 0:
            continue
        kk = k.values_ref(b, n).to(cd).view(n, n_kv, hd).transpose(0, 1)  # (n_kv, n, D)
        vv = v.values_ref(b, n).to(cd).view(n, n_kv, hd).transpose(0, 1)
        kk = kk * cos[:n].to(cd) + rotate_half(kk) * sin[:n].to(cd)
        qq = q[b].to(cd).view(n_kv, grp, hd)
        s = (qq @ kk.transpose(-1, -2)).float() * scale  # (n_kv, G, n)
        p = torch.softmax(s, dim=-1).to(cd)
        out[b] = (p @ vv).float().reshape(n_heads, hd)
    return out.to(q.dtype)


@jit(do_not_specialize=["SPLIT", "s_ab", "s_ah", "s_mlb", "s_mlh"])
def _kivi_split_kernel(
    Q, s_qb, s_qh,  # q (B, H, D)
    KC, KS, KZ, KT, K_SEALED,  # pre-RoPE K stream (width H_KV * D)
    s_kcb, s_kct, s_ksb, s_kst, s_ktb, s_ktt,
    VC, VS, VZ, VT, V_SEALED,  # V stream (width H_KV * D)
    s_vcb, s_vct, s_vsb, s_vst, s_vtb, s_vtt,
    SEQ,  # (B,) tokens per row
    COS, SIN, s_rope,  # RoPE tables (positions, D)
    ACC, s_ab, s_ah, s_as,  # out: unnormalized per split outputs (B, H, NS, D) float32
    ML, s_mlb, s_mlh,  # out: per split max and sum (B, H, NS, 2) float32
    SPLIT, qk_scale,  # tokens per split; softmax scale * log2(e)
    G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, DH: tl.constexpr, BDH: tl.constexpr,
    BD: tl.constexpr, BT: tl.constexpr,
    K_BITS: tl.constexpr, K_GS: tl.constexpr, K_PER_CHANNEL: tl.constexpr, K_HAS_CODES: tl.constexpr,
    K_ALIGNED: tl.constexpr,
    V_BITS: tl.constexpr, V_GS: tl.constexpr, V_PER_CHANNEL: tl.constexpr, V_HAS_CODES: tl.constexpr,
    V_ALIGNED: tl.constexpr,
    LOWP: tl.constexpr,
):
    i_b, i_hk, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    seq = tl.load(SEQ + i_b).to(tl.int64)
    k_sealed = tl.load(K_SEALED + i_b).to(tl.int64)
    v_sealed = tl.load(V_SEALED + i_b).to(tl.int64)
    t_lo = i_s * SPLIT
    t_hi = tl.minimum(t_lo + SPLIT, seq)

    m_g, o_h, o_d, m_d, b_q1, b_q2 = load_query(Q + i_b * s_qb, s_qh, i_hk, qk_scale, G, BG, DH, BDH)
    o_c1 = i_hk * D + o_d  # the head's channels, first rotate-half
    o_dv = tl.arange(0, BD)
    m_dv = o_dv < D

    p_kc, p_ks, p_kz, p_kt = KC + i_b * s_kcb, KS + i_b * s_ksb, KZ + i_b * s_ksb, KT + i_b * s_ktb
    p_vc, p_vs, p_vz, p_vt = VC + i_b * s_vcb, VS + i_b * s_vsb, VZ + i_b * s_vsb, VT + i_b * s_vtb
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, BD], tl.float32)
    for t0 in range(t_lo, t_hi, BT):
        o_t = t0 + tl.arange(0, BT).to(tl.int64)
        m_t = o_t < t_hi
        m_qk, m_fk = m_t & (o_t < k_sealed), m_t & (o_t >= k_sealed)
        b_k1 = load_tile(p_kc, s_kct, p_ks, p_kz, s_kst, p_kt, s_ktt, o_t, o_c1, m_qk, m_fk, m_d, k_sealed,
                          t0, i_hk * D, K_BITS, K_GS, K_PER_CHANNEL, K_HAS_CODES, K_ALIGNED)
        b_k2 = load_tile(p_kc, s_kct, p_ks, p_kz, s_kst, p_kt, s_ktt, o_t, o_c1 + DH, m_qk, m_fk, m_d, k_sealed,
                          t0, i_hk * D + DH, K_BITS, K_GS, K_PER_CHANNEL, K_HAS_CODES, K_ALIGNED)
        b_s = rope_scores(b_q1, b_q2, b_k1, b_k2, COS, SIN, s_rope, o_t, m_t, o_d, m_d, DH, LOWP)  # (BG, BT)
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_alpha = tl.exp2(b_m - b_mn)
        b_p = tl.exp2(b_s - b_mn[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = load_tile(p_vc, s_vct, p_vs, p_vz, s_vst, p_vt, s_vtt, o_t, i_hk * D + o_dv,
                         m_t & (o_t < v_sealed), m_t & (o_t >= v_sealed), m_dv, v_sealed, t0, i_hk * D,
                         V_BITS, V_GS, V_PER_CHANNEL, V_HAS_CODES, V_ALIGNED)
        if LOWP:
            b_acc = tl.dot(b_p, b_v, b_acc * b_alpha[:, None], input_precision="tf32")
        else:
            b_acc = tl.dot(b_p, b_v, b_acc * b_alpha[:, None], input_precision="ieee")
        b_m = b_mn
    tl.store(ACC + i_b * s_ab + o_h[:, None] * s_ah + i_s * s_as + o_dv[None, :], b_acc,
             mask=m_g[:, None] & m_dv[None, :])
    p_ml = ML + i_b * s_mlb + o_h * s_mlh + i_s * 2
    tl.store(p_ml, b_m, mask=m_g)
    tl.store(p_ml + 1, b_l, mask=m_g)


@jit(do_not_specialize=["NS", "s_ab", "s_ah", "s_mlb", "s_mlh"])
def _kivi_reduce_kernel(
    ACC, s_ab, s_ah, s_as,  # per split outputs (B, H, NS, D)
    ML, s_mlb, s_mlh,  # per split max and sum (B, H, NS, 2)
    O, s_ob, s_oh,  # out (B, H, D)
    NS,
    G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
):
    i_b, i_hk = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_h = i_hk * G + o_g
    o_d = tl.arange(0, BD)
    m_gd = m_g[:, None] & (o_d < D)[None, :]
    p_ml = ML + i_b * s_mlb + o_h * s_mlh
    b_mx = tl.full([BG], float("-inf"), tl.float32)
    for i_s in range(NS):
        b_mx = tl.maximum(b_mx, tl.load(p_ml + i_s * 2, mask=m_g, other=float("-inf")))
    b_mx = tl.where(b_mx == float("-inf"), 0.0, b_mx)  # a row without tokens
    b_sum = tl.zeros([BG], tl.float32)
    b_o = tl.zeros([BG, BD], tl.float32)
    p_a = ACC + i_b * s_ab + o_h[:, None] * s_ah + o_d[None, :]
    for i_s in range(NS):
        b_w = tl.exp2(tl.load(p_ml + i_s * 2, mask=m_g, other=float("-inf")) - b_mx)
        b_sum += b_w * tl.load(p_ml + i_s * 2 + 1, mask=m_g, other=0.0)
        b_o += b_w[:, None] * tl.load(p_a + i_s * s_as, mask=m_gd, other=0.0)
    b_o = b_o * tl.where(b_sum > 0, 1.0 / tl.where(b_sum > 0, b_sum, 1.0), 0.0)[:, None]
    tl.store(O + i_b * s_ob + o_h[:, None] * s_oh + o_d[None, :], b_o, mask=m_gd)


def kivi_attention(
    q: Tensor,
    k: PackedStream,
    v: PackedStream,
    cos: Tensor,
    sin: Tensor,
    seq_lens: Tensor,
    *,
    scale: float | None = None,
    max_seq_len: int | None = None,
    split_tokens: int | None = None,
    out: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Decode attention of one new query token per row over a KIVI* cache, dequantized on the fly.

    Args:
        q: (B, H, D) post-RoPE query of the new token.
        k: pre-RoPE keys, width H_kv·D (per-channel codes in KIVI*; any axis works).
        v: values, width H_kv·D (per-token codes in KIVI*).
        cos, sin: (P, D) RoPE tables in HF rotate-half layout; token t is at position t.
        seq_lens: (B,) int tokens per row (the new token included).
        scale, max_seq_len, split_tokens, out, backend: as in ``xquant_attention``.

    Returns (B, H, D) in q.dtype. Rows of length 0 give 0.
    """
    op = "kivi_attention"
    check_query(op, q, cos, sin, seq_lens, out)
    bsz, n_heads, hd = q.shape
    device = check_device(op, q=q, cos=cos, sin=sin, seq_lens=seq_lens, out=out)
    k.check(op, "k", bsz, device)
    v.check(op, "v", bsz, device)
    if k.c % hd or k.c != v.c or n_heads % (k.c // hd):
        raise ValueError(f"{op}: k and v must both be H_kv x D wide with H_kv dividing the {n_heads} query heads "
                         f"(D={hd}), got widths {k.c} and {v.c}")
    n_kv = k.c // hd
    if not use_triton(op, backend, q):
        res = kivi_attention_ref(q, k, v, cos, sin, seq_lens, scale=scale)
        return res if out is None else out.copy_(res)

    s_max = resolve_len(op, seq_lens, max_seq_len, cos.shape[0])
    grp = n_heads // n_kv
    bg = max(16, next_pow2(grp))
    dh = hd // 2
    lowp = not INTERPRET and q.dtype in (torch.float16, torch.bfloat16)
    bt = 32 if INTERPRET or not lowp else 64  # float32 (tests) takes the FMA path: smaller tiles
    split, n_splits = plan_splits(s_max, bsz * n_kv, device, bt, split_tokens)
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    f32 = {"dtype": torch.float32, "device": device}
    acc = torch.empty(bsz, n_heads, n_splits, hd, **f32)
    ml = torch.empty(bsz, n_heads, n_splits, 2, **f32)
    bd = max(16, next_pow2(hd))
    with on_device(device):
        _kivi_split_kernel[(bsz, n_kv, n_splits)](
            q, q.stride(0), q.stride(1),
            *k.args(), *k.strides(),
            *v.args(), *v.strides(),
            seq_lens,
            cos, sin, cos.stride(0),
            acc, acc.stride(0), acc.stride(1), acc.stride(2),
            ml, ml.stride(0), ml.stride(1),
            split, scale * 1.4426950408889634,
            G=grp, BG=bg, D=hd, DH=dh, BDH=max(16, next_pow2(dh)), BD=bd, BT=bt,
            LOWP=lowp,
            **k.meta(bt, dh, "K_"), **v.meta(bt, hd, "V_"),
            num_warps=8, num_stages=2,
        )
        res = out if out is not None else torch.empty_like(q)
        _kivi_reduce_kernel[(bsz, n_kv)](
            acc, acc.stride(0), acc.stride(1), acc.stride(2),
            ml, ml.stride(0), ml.stride(1),
            res, res.stride(0), res.stride(1),
            n_splits,
            G=grp, BG=bg, D=hd, BD=bd,
            num_warps=4,
        )
    return res
