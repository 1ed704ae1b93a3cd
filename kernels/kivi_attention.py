"""KIVI* decode attention with fused dequantization (the paper's baseline, docs/design.md §5).

KIVI* caches pre-RoPE keys with per-channel groups and values with per-token groups (both
``group_size`` tokens/channels, asymmetric, the ``xqcli.kernels.quant`` rule), plus a full-precision
tail of the newest tokens. One new query token per row attends over a row's cached tokens:

    K_j = RoPE(deq(k codes)[:, head j]) at each token's position (= its index),  V_j = deq(v codes)[:, head j]
    out_h = softmax(q_h · K_jᵀ / sqrt(D)) · V_j,        query head h uses kv head j = h // (H / H_kv)

Flash-decoding in two launches: ``_kivi_split_kernel`` (B, H_kv, splits) dequantizes K and V tiles
in registers, applies RoPE to the two rotate-half halves, scores the G query heads of the kv group
and keeps an online softmax with a (G, D) float32 accumulator; ``_common.merge_splits_kernel``
(B, H_kv) merges the splits. Nothing but the (B, H, splits, D) partial outputs is written. Each
program reads its row's length on the device (``_common.row_span``), so a launch sized for a
static ``capacity`` is the same every step (see ``_common.plan_splits``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from xqcli.kernels._common import (
    check_query,
    launch_merge,
    load_query,
    load_tile,
    online_softmax,
    plan_flash,
    resolve_len,
    rope_scores,
    rotate_half,
    row_span,
    store_split,
)
from xqcli.kernels._triton import check_device, jit, next_pow2, on_device, tl, use_triton
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


@jit(do_not_specialize=["NS", "SPLIT", "s_ab", "s_ah", "s_mlb", "s_mlh"])
def _kivi_split_kernel(
    Q, s_qb, s_qh,  # q (B, H, D)
    KC, KS, KZ, KT, K_SEALED, KB,  # pre-RoPE K stream (width H_KV * D)
    s_kcb, s_kct, s_ksb, s_kst, s_ktb, s_ktt, s_kbb,
    VC, VS, VZ, VT, V_SEALED, VB,  # V stream (width H_KV * D)
    s_vcb, s_vct, s_vsb, s_vst, s_vtb, s_vtt, s_vbb,
    SEQ,  # (B,) tokens per row
    COS, SIN, s_rope,  # RoPE tables (positions, D)
    ACC, s_ab, s_ah, s_as,  # out: unnormalized per split outputs (B, H, NS, D) float32
    ML, s_mlb, s_mlh,  # out: per split max and sum (B, H, NS, 2) float32
    NS, SPLIT,  # split programs per row, least tokens per split (row_span)
    qk_scale,  # softmax scale * log2(e)
    G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, DH: tl.constexpr, BDH: tl.constexpr,
    BD: tl.constexpr, BT: tl.constexpr,
    K_BITS: tl.constexpr, K_GS: tl.constexpr, K_PER_CHANNEL: tl.constexpr, K_HAS_CODES: tl.constexpr,
    K_ALIGNED: tl.constexpr, K_RING: tl.constexpr, K_PAGE: tl.constexpr,
    V_BITS: tl.constexpr, V_GS: tl.constexpr, V_PER_CHANNEL: tl.constexpr, V_HAS_CODES: tl.constexpr,
    V_ALIGNED: tl.constexpr, V_RING: tl.constexpr, V_PAGE: tl.constexpr,
    LOWP: tl.constexpr,
):
    i_b, i_hk, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    _lo, seq, split, n_used = row_span(SEQ, i_b, NS, SPLIT, BT, 0)
    if i_s >= n_used:  # past the row's last split: nothing to read or write
        return
    k_sealed = tl.load(K_SEALED + i_b).to(tl.int64)
    v_sealed = tl.load(V_SEALED + i_b).to(tl.int64)
    t_lo = i_s * split
    t_hi = tl.minimum(t_lo + split, seq)

    m_g, o_h, o_d, m_d, b_q1, b_q2 = load_query(Q + i_b * s_qb, s_qh, i_hk, qk_scale, G, BG, DH, BDH)
    o_c1 = i_hk * D + o_d  # the head's channels, first rotate-half
    o_dv = tl.arange(0, BD)
    m_dv = o_dv < D

    p_kc, p_ks, p_kz, p_kt = KC + i_b * s_kcb, KS + i_b * s_ksb, KZ + i_b * s_ksb, KT + i_b * s_ktb
    p_vc, p_vs, p_vz, p_vt = VC + i_b * s_vcb, VS + i_b * s_vsb, VZ + i_b * s_vsb, VT + i_b * s_vtb
    p_kb, p_vb = KB + i_b * s_kbb, VB + i_b * s_vbb
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, BD], tl.float32)
    for t0 in range(t_lo, t_hi, BT):
        o_t = t0 + tl.arange(0, BT).to(tl.int64)
        m_t = o_t < t_hi
        m_qk, m_fk = m_t & (o_t < k_sealed), m_t & (o_t >= k_sealed)
        b_k1 = load_tile(p_kc, s_kct, p_ks, p_kz, s_kst, p_kt, s_ktt, p_kb, o_t, o_c1, m_qk, m_fk, m_d, k_sealed,
                          t0, i_hk * D, K_BITS, K_GS, K_PER_CHANNEL, K_HAS_CODES, K_ALIGNED, K_RING, K_PAGE)
        b_k2 = load_tile(p_kc, s_kct, p_ks, p_kz, s_kst, p_kt, s_ktt, p_kb, o_t, o_c1 + DH, m_qk, m_fk, m_d,
                          k_sealed, t0, i_hk * D + DH, K_BITS, K_GS, K_PER_CHANNEL, K_HAS_CODES, K_ALIGNED, K_RING,
                          K_PAGE)
        b_s = rope_scores(b_q1, b_q2, b_k1, b_k2, COS, SIN, s_rope, o_t, m_t, o_d, m_d, DH, LOWP)  # (BG, BT)
        b_p, b_alpha, b_m, b_l = online_softmax(b_s, b_m, b_l)
        b_v = load_tile(p_vc, s_vct, p_vs, p_vz, s_vst, p_vt, s_vtt, p_vb, o_t, i_hk * D + o_dv,
                         m_t & (o_t < v_sealed), m_t & (o_t >= v_sealed), m_dv, v_sealed, t0, i_hk * D,
                         V_BITS, V_GS, V_PER_CHANNEL, V_HAS_CODES, V_ALIGNED, V_RING, V_PAGE)
        if LOWP:
            b_acc = tl.dot(b_p, b_v, b_acc * b_alpha[:, None], input_precision="tf32")
        else:
            b_acc = tl.dot(b_p, b_v, b_acc * b_alpha[:, None], input_precision="ieee")
    store_split(ACC, s_ab, s_ah, s_as, ML, s_mlb, s_mlh, i_b, i_s, o_h, m_g, o_dv, m_dv, b_acc, b_m, b_l)


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
    capacity: int | None = None,
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
        scale, max_seq_len, capacity, split_tokens, out, backend: as in ``xquant_attention``.

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

    s_max = resolve_len(op, seq_lens, max_seq_len, cos.shape[0], capacity)
    grp = n_heads // n_kv
    bg = max(16, next_pow2(grp))
    dh = hd // 2
    lowp, bt, split, n_splits, ml = plan_flash(q, n_kv, s_max, q.dtype, split_tokens)
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    acc = torch.empty(bsz, n_heads, n_splits, hd, dtype=torch.float32, device=device)
    with on_device(device):
        _kivi_split_kernel[(bsz, n_kv, n_splits)](
            q, q.stride(0), q.stride(1),
            *k.args(), *k.strides(),
            *v.args(), *v.strides(),
            seq_lens,
            cos, sin, cos.stride(0),
            acc, acc.stride(0), acc.stride(1), acc.stride(2),
            ml, ml.stride(0), ml.stride(1),
            n_splits, split, scale * 1.4426950408889634,
            G=grp, BG=bg, D=hd, DH=dh, BDH=max(16, next_pow2(dh)), BD=max(16, next_pow2(hd)), BT=bt,
            LOWP=lowp,
            **k.meta(bt, dh, "K_"), **v.meta(bt, hd, "V_"),
            num_warps=8, num_stages=2,
        )
        res = out if out is not None else torch.empty_like(q)
        launch_merge(acc, ml, res, seq_lens, split, bt, grp)
    return res
