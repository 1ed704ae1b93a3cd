"""Fused XQuant decode attention: dequantize latents, rebuild K, RoPE, softmax, absorbed V.

One new query token per row attends over every cached token of the row (docs/design.md §8). K and V
are never written to memory; per kv head the kernels read the packed codes and rebuild what they need
in registers.

    K_j = (lat_k · M_k)[:, head j] (+ b_k), then RoPE at each token's position (= its index)
    out_h = softmax(q_h · K_jᵀ / sqrt(D)) · (lat_v · M_v)[:, head j] (+ b_v)
          = (Σ_t p_h(t) · lat_v[t]) · M_v[:, head j] (+ b_v)          (V absorbed)

GQA XQuant (docs/design.md §3): lat_k = X·U_k (per-channel codes), lat_v = X·U_v (per-token),
M = Σ Bᵀ, d_kv wide.
MHA XQuant: lat_k = lat_v = X (one per-token stream passed twice), M_k = W_kᵀ, M_v = W_vᵀ.
XQuant-CL: a dense accumulator X̂ in MHA form (``xquant_cl.xquant_cl_attention``).

Flash-decoding in three launches, the cached sequence split across programs:
1. ``_xq_scores_kernel`` (B, H_kv, splits): per tile of BT tokens, rebuild the K tile for the kv
   head (dequantize BC latent channels at a time and ``tl.dot`` them with the head's M_k columns,
   the two rotate-half halves separately), add b_k, apply RoPE, score the G query heads of the group,
   and keep each split's online-softmax max and sum. It writes the scaled logits (B, H, S), never K.
2. ``_xq_pv_kernel`` (B, H_kv, splits x latent chunks): p = exp2(logit - split max) times the
   dequantized V latent tile, accumulated per split into (B, H, splits, C_v) float32.
3. ``_xq_reduce_kernel`` (B, H_kv): merge the splits (rescale by exp2(m_s - M), divide by the sum),
   then project once per head with M_v's head slice and add b_v.
Every program reads its row's length on the device (``_common.row_span``) and programs past the
row's last split return at once, so a launch sized for a static ``capacity`` has the same grid and
arguments every step (capturable in a CUDA graph; ``_common.plan_splits`` has the split rule).
Keeping the V latent accumulator (G x C_v, up to 16 x 4096 for MHA) out of the scores kernel's
registers is why PV is a separate pass over stored logits (4 bytes per head and token, against
C_v·bits/8 bytes of codes per token) rather than fused into one loop.

Precision: everything is float32 under the interpreter and for float32 weights. With bf16/fp16
weights on a GPU the K rebuild runs on tensor cores in the weights' dtype (latent tile cast to it)
and the small QKᵀ, PV and M_v products in tf32; accumulation is float32 throughout.

Scales and zeros (a choice, ours): they are applied in registers (``code * scale + zero``, one FMA
per element, in ``_common.load_tile``) rather than folded into the dot products. Folding K's
per-channel scales into M_k (C·diag(s)M_k + 1·zᵀM_k) costs a BC x D row scaling per chunk, the same
count of FMAs as scaling the BT x BC code tile at BT = D = 64; folding V's per-token scales into the
probabilities saves one FMA per code element in a pass whose cost is reading and unpacking those
codes. Both pay off only with codes fed to the tensor cores directly (an fp8 path: 2/3/4-bit codes
are exact in e4m3), which does not exist yet.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from xqcli.kernels._common import (
    FLOATS,
    check_query,
    load_query,
    load_tile,
    merged_max,
    plan_flash,
    resolve_len,
    rope_scores,
    rotate_half,
    row_span,
)
from xqcli.kernels._triton import INTERPRET, check_device, jit, next_pow2, on_device, tl, use_triton
from xqcli.kernels.packed import PackedStream

__all__ = ["xquant_attention", "xquant_attention_ref"]


def xquant_attention_ref(
    q: Tensor,
    k: PackedStream,
    v: PackedStream,
    m_k: Tensor,
    m_v: Tensor,
    cos: Tensor,
    sin: Tensor,
    seq_lens: Tensor,
    *,
    b_k: Tensor | None = None,
    b_v: Tensor | None = None,
    k_ch0: Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Reference: dequantize with the quant refs, rebuild K and V densely, RoPE, softmax attention.

    Same arguments as ``xquant_attention``. Math in ``compute_dtype`` (float32 = the truth; a low
    precision gives "what plain PyTorch in that dtype gets", for the tests' 2x rule); the softmax is
    always float32. Rows of length 0 give b_v (or 0). Returns (B, H, D) in q.dtype.
    """
    bsz, n_heads, hd = q.shape
    n_kv = m_k.shape[1] // hd
    grp = n_heads // n_kv
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    cd = compute_dtype
    out = torch.zeros(bsz, n_heads, hd, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        n = int(seq_lens[b])
        if n == 0:
            if b_v is not None:
                out[b] = b_v.float().view(n_kv, 1, hd).expand(n_kv, grp, hd).reshape(n_heads, hd)
            continue
        lat_k = k.values_ref(b, n)  # (n, C_k)
        if k_ch0 is not None:
            lat_k = torch.cat([k_ch0.reshape(bsz, -1)[b, :n, None].float(), lat_k], dim=-1)
        kk = lat_k.to(cd) @ m_k.to(cd)  # (n, n_kv * D)
        vv = v.values_ref(b, n).to(cd) @ m_v.to(cd)
        if b_k is not None:
            kk = kk + b_k.to(cd)
        if b_v is not None:
            vv = vv + b_v.to(cd)
        kk = kk.view(n, n_kv, hd).transpose(0, 1)  # (n_kv, n, D)
        vv = vv.view(n, n_kv, hd).transpose(0, 1)
        kk = kk * cos[:n].to(cd) + rotate_half(kk) * sin[:n].to(cd)
        qq = q[b].to(cd).view(n_kv, grp, hd)
        s = (qq @ kk.transpose(-1, -2)).float() * scale  # (n_kv, G, n)
        p = torch.softmax(s, dim=-1).to(cd)
        out[b] = (p @ vv).float().reshape(n_heads, hd)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------- kernels


@jit(do_not_specialize=["NS", "SPLIT", "s_mlb", "s_mlh"])
def _xq_scores_kernel(
    Q, s_qb, s_qh,  # q (B, H, D)
    KC, KS, KZ, KT, K_SEALED, KB,  # K-latent stream: codes, scale, zero, tail, sealed (B,), block table
    s_kcb, s_kct, s_ksb, s_kst, s_ktb, s_ktt, s_kbb,  # strides: codes (b, t), scale/zero (b, t|block), tail, table
    SEQ,  # (B,) tokens per row
    MK, s_mkc, s_mkn,  # M_k (C_K, H_KV * D): latent channel c, output column n
    BK,  # b_k (H_KV * D,), read only if HAS_BIAS
    CH0, s_ch0b, MK0,  # channel 0 of the latent (B, S) and its M_k row (H_KV * D,), if HAS_CH0
    COS, SIN, s_rope,  # RoPE tables (positions, D)
    SC, s_scb, s_sch,  # out: logits * log2(e) / sqrt(D), (B, H, S_bound) float32
    ML, s_mlb, s_mlh,  # out: per split running max and sum, (B, H, NS, 2) float32
    C_K,  # channels of the K-latent codes/tail
    NS, SPLIT,  # split programs per row, least tokens per split (a multiple of BT; row_span)
    qk_scale,  # softmax scale * log2(e)
    G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, DH: tl.constexpr, BDH: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
    BITS: tl.constexpr, GS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_CODES: tl.constexpr,
    ALIGNED: tl.constexpr, RING: tl.constexpr, PAGE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CH0: tl.constexpr,
    LOWP: tl.constexpr,
):
    i_b, i_hk, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    _lo, seq, split, n_used = row_span(SEQ, i_b, NS, SPLIT, BT, 0)
    if i_s >= n_used:  # past the row's last split: nothing to read or write
        return
    sealed = tl.load(K_SEALED + i_b).to(tl.int64)
    p_kb = KB + i_b * s_kbb
    t_lo = i_s * split
    t_hi = tl.minimum(t_lo + split, seq)

    m_g, o_h, o_d, m_d, b_q1, b_q2 = load_query(Q + i_b * s_qb, s_qh, i_hk, qk_scale, G, BG, DH, BDH)
    o_n = i_hk * D + o_d  # M_k columns of the head's first rotate-half

    p_kc, p_ks, p_kz, p_kt = KC + i_b * s_kcb, KS + i_b * s_ksb, KZ + i_b * s_ksb, KT + i_b * s_ktb
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    for t0 in range(t_lo, t_hi, BT):
        o_t = t0 + tl.arange(0, BT).to(tl.int64)
        m_t = o_t < t_hi
        m_q = m_t & (o_t < sealed)
        m_f = m_t & (o_t >= sealed)
        b_k1 = tl.zeros([BT, BDH], tl.float32)
        b_k2 = tl.zeros([BT, BDH], tl.float32)
        for c0 in range(0, C_K, BC):
            o_c = c0 + tl.arange(0, BC)
            m_c = o_c < C_K
            b_x = load_tile(p_kc, s_kct, p_ks, p_kz, s_kst, p_kt, s_ktt, p_kb, o_t, o_c, m_q, m_f, m_c, sealed,
                             t0, c0, BITS, GS, PER_CHANNEL, HAS_CODES, ALIGNED, RING, PAGE)
            p_m = MK + o_c[:, None] * s_mkc + o_n[None, :] * s_mkn
            m_m = m_c[:, None] & m_d[None, :]
            b_m1 = tl.load(p_m, mask=m_m, other=0.0)
            b_m2 = tl.load(p_m + DH * s_mkn, mask=m_m, other=0.0)
            if LOWP:
                b_xl = b_x.to(b_m1.dtype)
                b_k1 = tl.dot(b_xl, b_m1, b_k1)
                b_k2 = tl.dot(b_xl, b_m2, b_k2)
            else:
                b_k1 = tl.dot(b_x, b_m1.to(tl.float32), b_k1, input_precision="ieee")
                b_k2 = tl.dot(b_x, b_m2.to(tl.float32), b_k2, input_precision="ieee")
        if HAS_CH0:
            b_c0 = tl.load(CH0 + i_b * s_ch0b + o_t, mask=m_t, other=0.0).to(tl.float32)
            b_k1 += b_c0[:, None] * tl.load(MK0 + o_n, mask=m_d, other=0.0).to(tl.float32)[None, :]
            b_k2 += b_c0[:, None] * tl.load(MK0 + DH + o_n, mask=m_d, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            b_k1 += tl.load(BK + o_n, mask=m_d, other=0.0).to(tl.float32)[None, :]
            b_k2 += tl.load(BK + DH + o_n, mask=m_d, other=0.0).to(tl.float32)[None, :]
        b_s = rope_scores(b_q1, b_q2, b_k1, b_k2, COS, SIN, s_rope, o_t, m_t, o_d, m_d, DH, LOWP)
        tl.store(SC + i_b * s_scb + o_h[:, None] * s_sch + o_t[None, :], b_s, mask=m_g[:, None] & m_t[None, :])
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_l = b_l * tl.exp2(b_m - b_mn) + tl.sum(tl.exp2(b_s - b_mn[:, None]), 1)
        b_m = b_mn
    p_ml = ML + i_b * s_mlb + o_h * s_mlh + i_s * 2
    tl.store(p_ml, b_m, mask=m_g)
    tl.store(p_ml + 1, b_l, mask=m_g)


@jit(do_not_specialize=["NS", "SPLIT", "NVC", "s_mlb", "s_mlh", "s_ab", "s_ah"])
def _xq_pv_kernel(
    VC, VS, VZ, VT, V_SEALED, VB,  # V-latent stream
    s_vcb, s_vct, s_vsb, s_vst, s_vtb, s_vtt, s_vbb,
    SEQ,  # (B,) tokens per row
    SC, s_scb, s_sch,  # logits (B, H, S_bound)
    ML, s_mlb, s_mlh,  # per split max and sum (B, H, NS, 2)
    ACC, s_ab, s_ah, s_as,  # out: sum_t exp2(logit - split max) * lat_v[t], (B, H, NS, C_V) float32
    C_V, NS, SPLIT, NVC,  # latent width, the split plan (row_span), latent chunks per split
    G: tl.constexpr, BG: tl.constexpr, BT: tl.constexpr, BCV: tl.constexpr,
    BITS: tl.constexpr, GS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_CODES: tl.constexpr,
    ALIGNED: tl.constexpr, RING: tl.constexpr, PAGE: tl.constexpr, LOWP: tl.constexpr,
):
    i_b, i_hk, i_x = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_s, i_v = i_x // NVC, i_x % NVC
    _lo, seq, split, n_used = row_span(SEQ, i_b, NS, SPLIT, BT, 0)
    if i_s >= n_used:
        return
    sealed = tl.load(V_SEALED + i_b).to(tl.int64)
    t_lo = i_s * split
    t_hi = tl.minimum(t_lo + split, seq)
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_h = i_hk * G + o_g
    b_m = tl.load(ML + i_b * s_mlb + o_h * s_mlh + i_s * 2, mask=m_g, other=0.0)
    o_c = i_v * BCV + tl.arange(0, BCV)
    m_c = o_c < C_V
    p_vc, p_vs, p_vz, p_vt = VC + i_b * s_vcb, VS + i_b * s_vsb, VZ + i_b * s_vsb, VT + i_b * s_vtb
    p_vb = VB + i_b * s_vbb
    b_acc = tl.zeros([BG, BCV], tl.float32)
    for t0 in range(t_lo, t_hi, BT):
        o_t = t0 + tl.arange(0, BT).to(tl.int64)
        m_t = o_t < t_hi
        b_s = tl.load(SC + i_b * s_scb + o_h[:, None] * s_sch + o_t[None, :],
                      mask=m_g[:, None] & m_t[None, :], other=float("-inf"))
        b_p = tl.exp2(b_s - b_m[:, None])
        b_v = load_tile(p_vc, s_vct, p_vs, p_vz, s_vst, p_vt, s_vtt, p_vb, o_t, o_c,
                         m_t & (o_t < sealed), m_t & (o_t >= sealed), m_c, sealed, t0, i_v * BCV,
                         BITS, GS, PER_CHANNEL, HAS_CODES, ALIGNED, RING, PAGE)
        if LOWP:
            b_acc = tl.dot(b_p, b_v, b_acc, input_precision="tf32")
        else:
            b_acc = tl.dot(b_p, b_v, b_acc, input_precision="ieee")
    tl.store(ACC + i_b * s_ab + o_h[:, None] * s_ah + i_s * s_as + o_c[None, :], b_acc,
             mask=m_g[:, None] & m_c[None, :])


@jit(do_not_specialize=["NS", "SPLIT", "s_ab", "s_ah", "s_mlb", "s_mlh"])
def _xq_reduce_kernel(
    ACC, s_ab, s_ah, s_as,  # per split latent sums (B, H, NS, C_V)
    ML, s_mlb, s_mlh,  # per split max and sum (B, H, NS, 2)
    MV, s_mvc, s_mvn,  # M_v (C_V, H_KV * D)
    BV,  # b_v (H_KV * D,), read only if HAS_BIAS
    O, s_ob, s_oh,  # out (B, H, D)
    SEQ, C_V, NS, SPLIT,  # tokens per row, latent width, the split plan (row_span)
    G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    BT: tl.constexpr, HAS_BIAS: tl.constexpr, LOWP: tl.constexpr,
):
    i_b, i_hk = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    _lo, _hi, _split, n_used = row_span(SEQ, i_b, NS, SPLIT, BT, 0)  # splits past it were never written
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_h = i_hk * G + o_g
    p_ml = ML + i_b * s_mlb + o_h * s_mlh
    b_mx = merged_max(p_ml, n_used, m_g, BG)
    b_sum = tl.zeros([BG], tl.float32)
    for i_s in range(n_used):
        b_sum += tl.exp2(tl.load(p_ml + i_s * 2, mask=m_g, other=float("-inf")) - b_mx) * \
            tl.load(p_ml + i_s * 2 + 1, mask=m_g, other=0.0)
    b_inv = tl.where(b_sum > 0, 1.0 / tl.where(b_sum > 0, b_sum, 1.0), 0.0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_o = tl.zeros([BG, BD], tl.float32)
    p_a = ACC + i_b * s_ab + o_h[:, None] * s_ah
    for c0 in range(0, C_V, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c < C_V
        b_lat = tl.zeros([BG, BC], tl.float32)
        for i_s in range(n_used):
            b_w = tl.exp2(tl.load(p_ml + i_s * 2, mask=m_g, other=float("-inf")) - b_mx)
            b_part = tl.load(p_a + i_s * s_as + o_c[None, :], mask=m_g[:, None] & m_c[None, :], other=0.0)
            b_lat += b_w[:, None] * b_part
        b_lat = b_lat * b_inv[:, None]
        b_mv = tl.load(MV + o_c[:, None] * s_mvc + (i_hk * D + o_d)[None, :] * s_mvn,
                       mask=m_c[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        if LOWP:
            b_o = tl.dot(b_lat, b_mv, b_o, input_precision="tf32")
        else:
            b_o = tl.dot(b_lat, b_mv, b_o, input_precision="ieee")
    if HAS_BIAS:
        b_o += tl.load(BV + i_hk * D + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    tl.store(O + i_b * s_ob + o_h[:, None] * s_oh + o_d[None, :], b_o, mask=m_g[:, None] & m_d[None, :])


# ----------------------------------------------------------------------------- launcher


def xquant_attention(
    q: Tensor,
    k: PackedStream,
    v: PackedStream,
    m_k: Tensor,
    m_v: Tensor,
    cos: Tensor,
    sin: Tensor,
    seq_lens: Tensor,
    *,
    b_k: Tensor | None = None,
    b_v: Tensor | None = None,
    k_ch0: Tensor | None = None,
    scale: float | None = None,
    max_seq_len: int | None = None,
    capacity: int | None = None,
    split_tokens: int | None = None,
    out: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Decode attention of one new query token per row over an XQuant cache, K/V rebuilt on the fly.

    Args:
        q: (B, H, D) post-RoPE query of the new token (fp16/bf16/fp32).
        k: the K-latent stream, width C_k (GQA: X·U_k, per-channel codes; MHA: X, per-token).
        v: the V-latent stream, width C_v (GQA: X·U_v, per-token; MHA: X again).
        m_k: (C_k [+1 with k_ch0], H_kv·D): K = lat_k · m_k. GQA: M_k; MHA: ``k_proj.weight.T``
            (any strides). Query head h uses kv head h // (H / H_kv), as in HF's repeat_kv.
        m_v: (C_v, H_kv·D): V = lat_v · m_v.
        cos, sin: (P, D) RoPE tables in HF rotate-half layout; token t of a row is at position t.
        seq_lens: (B,) int tokens per row (sealed + tail, the new token included).
        b_k, b_v: optional (H_kv·D,) biases (Qwen2), added after the rebuild, before RoPE.
        k_ch0: optional (B, S) or (B, S, 1) channel 0 of X·U_k kept in full precision (arXiv 2508.10395 App. B):
            ``k`` then holds channels 1.. and row 0 of m_k multiplies k_ch0.
        scale: softmax scale, default 1/sqrt(D).
        max_seq_len: an upper bound of seq_lens known on the host (saves a device sync; sizes the
            grid): for eager steps.
        capacity: the allocated context (the cache's max_len) instead: a static launch whose grid,
            scratch buffers and scalar arguments do not depend on the current lengths, so one CUDA
            graph capture serves every step; each program reads its row's length from seq_lens and
            programs past it return at once (``_common.plan_splits``). cos/sin must cover it.
        split_tokens: tokens per split (default: about two programs per SM, spread per row).
        out: optional (B, H, D) output buffer in q.dtype.
        backend: "auto" (Triton for CUDA tensors, else the reference), "triton" or "ref".

    Returns (B, H, D) in q.dtype. Rows of length 0 give b_v (or 0).
    """
    op = "xquant_attention"
    check_query(op, q, cos, sin, seq_lens, out)
    bsz, n_heads, hd = q.shape
    device = check_device(op, q=q, m_k=m_k, m_v=m_v, cos=cos, sin=sin, seq_lens=seq_lens, b_k=b_k, b_v=b_v,
                          k_ch0=k_ch0, out=out)
    k.check(op, "k", bsz, device)
    v.check(op, "v", bsz, device)
    for name, m in (("m_k", m_k), ("m_v", m_v)):
        if m.dim() != 2 or m.dtype not in FLOATS or m.shape[1] % hd:
            raise ValueError(f"{op}: {name} must be a float (C, H_kv * D) matrix with D={hd}, "
                             f"got {m.dtype} {tuple(m.shape)}")
    n_kv = m_k.shape[1] // hd
    if n_kv == 0 or n_heads % n_kv or m_v.shape[1] != m_k.shape[1]:
        raise ValueError(f"{op}: {n_heads} query heads need H_kv dividing them; m_k gives {m_k.shape[1]} = "
                         f"{n_kv} x {hd} columns and m_v {m_v.shape[1]}")
    c_k = k.c + (1 if k_ch0 is not None else 0)
    if m_k.shape[0] != c_k:
        extra = " + channel 0" if k_ch0 is not None else ""
        raise ValueError(f"{op}: m_k must have {c_k} rows (k width {k.c}{extra}), got {m_k.shape[0]}")
    if m_v.shape[0] != v.c:
        raise ValueError(f"{op}: m_v must have {v.c} rows (v width), got {m_v.shape[0]}")
    for name, bias in (("b_k", b_k), ("b_v", b_v)):
        if bias is not None and (bias.shape != (n_kv * hd,) or bias.dtype not in FLOATS):
            raise ValueError(f"{op}: {name} must be a float ({n_kv * hd},) vector, "
                             f"got {bias.dtype} {tuple(bias.shape)}")
    if k_ch0 is not None:
        if k_ch0.dim() == 3 and k_ch0.shape[-1] == 1:
            k_ch0 = k_ch0[..., 0]
        if k_ch0.dim() != 2 or k_ch0.shape[0] != bsz or k_ch0.dtype not in FLOATS or k_ch0.stride(-1) != 1:
            raise ValueError(f"{op}: k_ch0 must be a float (B={bsz}, S) tensor with unit last stride, "
                             f"got {k_ch0.dtype} {tuple(k_ch0.shape)}")

    if not use_triton(op, backend, q, m_k, m_v):
        res = xquant_attention_ref(q, k, v, m_k, m_v, cos, sin, seq_lens, b_k=b_k, b_v=b_v, k_ch0=k_ch0, scale=scale)
        return res if out is None else out.copy_(res)

    s_max = resolve_len(op, seq_lens, max_seq_len, cos.shape[0], capacity)
    if k_ch0 is not None and k_ch0.shape[1] < s_max:
        raise ValueError(f"{op}: k_ch0 holds {k_ch0.shape[1]} tokens but rows reach {s_max}")
    grp = n_heads // n_kv
    bg = max(16, next_pow2(grp))
    dh = hd // 2
    bdh = max(16, next_pow2(dh))
    plan = plan_flash(q, n_kv, s_max, m_k.dtype, split_tokens)  # the K rebuild's operands: weights
    lowp, bt, split, n_splits, ml = plan
    bc = 128 if INTERPRET else 64
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    qk_scale = scale * 1.4426950408889634  # log2(e): the kernels use exp2

    f32 = {"dtype": torch.float32, "device": device}
    logits = torch.empty(bsz, n_heads, s_max, **f32)
    kc, ks, kz, kt, ksealed, kb = k.args()
    m_k_main, mk0 = (m_k[1:], m_k[0]) if k_ch0 is not None else (m_k, m_k)
    ch0 = k_ch0 if k_ch0 is not None else q
    with on_device(device):
        _xq_scores_kernel[(bsz, n_kv, n_splits)](
            q, q.stride(0), q.stride(1),
            kc, ks, kz, kt, ksealed, kb, *k.strides(),
            seq_lens,
            m_k_main, m_k_main.stride(0), m_k_main.stride(1),
            b_k if b_k is not None else q,
            ch0, ch0.stride(0), mk0,
            cos, sin, cos.stride(0),
            logits, logits.stride(0), logits.stride(1),
            ml, ml.stride(0), ml.stride(1),
            k.c, n_splits, split, qk_scale,
            G=grp, BG=bg, D=hd, DH=dh, BDH=bdh, BT=bt, BC=bc,
            HAS_BIAS=b_k is not None, HAS_CH0=k_ch0 is not None, LOWP=lowp, **k.meta(bt, bc),
            num_warps=8, num_stages=2,
        )
        c_v = v.c
        bcv = min(256 if INTERPRET else 128, max(16, next_pow2(c_v)))
        nvc = -(-c_v // bcv)
        acc = torch.empty(bsz, n_heads, n_splits, c_v, **f32)
        vc, vs, vz, vt, vsealed, vb = v.args()
        _xq_pv_kernel[(bsz, n_kv, n_splits * nvc)](
            vc, vs, vz, vt, vsealed, vb, *v.strides(),
            seq_lens,
            logits, logits.stride(0), logits.stride(1),
            ml, ml.stride(0), ml.stride(1),
            acc, acc.stride(0), acc.stride(1), acc.stride(2),
            c_v, n_splits, split, nvc,
            G=grp, BG=bg, BT=bt, BCV=bcv, LOWP=lowp, **v.meta(bt, bcv),
            num_warps=8, num_stages=2,
        )
        res = out if out is not None else torch.empty_like(q)
        _xq_reduce_kernel[(bsz, n_kv)](
            acc, acc.stride(0), acc.stride(1), acc.stride(2),
            ml, ml.stride(0), ml.stride(1),
            m_v, m_v.stride(0), m_v.stride(1),
            b_v if b_v is not None else q,
            res, res.stride(0), res.stride(1),
            seq_lens, c_v, n_splits, split,
            G=grp, BG=bg, D=hd, BD=max(16, next_pow2(hd)), BC=256 if INTERPRET else (64 if lowp else 32),
            BT=bt,
            HAS_BIAS=b_v is not None, LOWP=lowp,
            num_warps=4,
        )
    return res
