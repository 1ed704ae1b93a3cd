"""Decode attention over a plain KV cache (the `kv` kind), and the append that fills it.

The cache keeps post-RoPE K and V per layer as (B, H_kv, S, D) buffers allocated for S = max_len
tokens (``xqcli.cache.kv`` stores (L, B, H_kv, S, D) and passes one layer's slice). Each decode step:

1. ``kv_append_rope`` writes the new token of every row at that row's position (its length before
   the step, read on the device): K rotated by RoPE exactly as ``xqcli.rope.Rope.apply`` does it
   (``x·cos + rotate_half(x)·sin`` in K's dtype, cos/sin rounded to it, each product and the sum
   rounded), V as it is. One launch, one program per row.
2. ``kv_attention``: one query token per row attends over the row's own tokens only, read from
   ``seq_lens`` on the device: keys j < seq_lens[b], and with a sliding window W only
   j >= seq_lens[b] − W (the query at position p sees p − W < j <= p, as ``xqcli.rope.causal_mask``).
   Tokens past a row's length are never read, unlike SDPA over the whole buffer with a mask.
   Query head h uses kv head h // (H / H_kv), as in HF's repeat_kv.

Flash-decoding in two launches: ``_kv_split_kernel`` (B, H_kv, splits) scores the G query heads of
a kv group against BT-token K tiles and keeps an online softmax with a (G, D) float32 accumulator;
``_common.merge_splits_kernel`` merges the splits. Each program reads its row's span on the device
(``_common.row_span``): with a static ``capacity`` the launch is the same every step (CUDA graph
capturable) and programs past the row's last split return at once.

Precision: float32 inputs (and the interpreter) use ieee dots; fp16/bf16 on a GPU run QKᵀ on tensor
cores in the buffers' dtype and PV with the probabilities cast to it (as flash-attention does), with
float32 accumulation and softmax.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from xqcli.kernels._common import (
    FLOATS,
    check_q_out,
    check_rope_tables,
    check_seq_lens,
    launch_merge,
    online_softmax,
    plan_flash,
    resolve_len,
    rope_halves,
    rotate_half,
    round_to,
    row_span,
    store_split,
)
from xqcli.kernels._triton import check_device, jit, next_pow2, on_device, tl, tl_dtype, use_triton

__all__ = ["kv_append_rope", "kv_append_rope_ref", "kv_attention", "kv_attention_ref"]


def _check_buffers(op: str, k_buf: Tensor, v_buf: Tensor) -> None:
    """Raise ValueError unless K and V are float (B, H_kv, S, D) buffers of one shape, unit last stride."""
    for name, t in (("k_buf", k_buf), ("v_buf", v_buf)):
        if t.dim() != 4 or t.dtype not in FLOATS or t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be a float (B, H_kv, S, D) buffer with unit last stride, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if k_buf.shape != v_buf.shape or k_buf.dtype != v_buf.dtype:
        raise ValueError(f"{op}: k_buf and v_buf must have one shape and dtype, got {k_buf.dtype} "
                         f"{tuple(k_buf.shape)} and {v_buf.dtype} {tuple(v_buf.shape)}")


# ----------------------------------------------------------------------------- append


def kv_append_rope_ref(k_buf: Tensor, v_buf: Tensor, k_new: Tensor, v_new: Tensor, cos: Tensor, sin: Tensor,
                       positions: Tensor) -> None:
    """Reference of ``kv_append_rope``: ``Rope.apply``'s formula, then an indexed store; in place."""
    pos = positions.long()
    if bool((pos >= k_buf.shape[2]).any()):
        raise ValueError(f"kv_append_rope: positions {pos.tolist()} must be below the buffers' "
                         f"{k_buf.shape[2]} tokens")
    c = cos[pos][:, None].to(k_new.dtype)  # (B, 1, D), as Rope.cos_sin casts the table to x's dtype
    s = sin[pos][:, None].to(k_new.dtype)
    rows = torch.arange(k_buf.shape[0], device=k_buf.device)
    k_buf[rows, :, pos] = (k_new * c + rotate_half(k_new) * s).to(k_buf.dtype)
    v_buf[rows, :, pos] = v_new.to(v_buf.dtype)


@jit(do_not_specialize=["S"])
def _kv_append_kernel(
    K, s_kb, s_kh, s_kt,  # K buffer (B, H_KV, S, D)
    V, s_vb, s_vh, s_vt,  # V buffer (B, H_KV, S, D)
    KN, s_knb, s_knh,  # new pre-RoPE K (B, H_KV, D)
    VN, s_vnb, s_vnh,  # new V (B, H_KV, D)
    COS, SIN, s_rope,  # RoPE tables (positions, D)
    POS,  # (B,) each row's new token position = its slot
    S,  # tokens the buffers hold
    H_KV: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr,
    BDH: tl.constexpr, XT: tl.constexpr, KT: tl.constexpr, VT: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + i_b).to(tl.int64)
    if pos >= S:  # a full row: nothing to write (the cache refuses it on the host)
        return
    o_h = tl.arange(0, BH)
    o_d = tl.arange(0, BDH)
    m_d = o_d < DH
    m_hd = (o_h < H_KV)[:, None] & m_d[None, :]
    p_n = KN + i_b * s_knb + o_h[:, None] * s_knh + o_d[None, :]
    b_o1, b_o2 = rope_halves(p_n, COS, SIN, pos * s_rope + o_d, m_hd, m_d, DH, XT)
    p_k = K + i_b * s_kb + o_h[:, None] * s_kh + pos * s_kt + o_d[None, :]
    tl.store(p_k, round_to(b_o1, KT).to(K.dtype.element_ty), mask=m_hd)
    tl.store(p_k + DH, round_to(b_o2, KT).to(K.dtype.element_ty), mask=m_hd)
    o_dv = tl.arange(0, BD)
    m_hdv = (o_h < H_KV)[:, None] & (o_dv < D)[None, :]
    b_v = tl.load(VN + i_b * s_vnb + o_h[:, None] * s_vnh + o_dv[None, :], mask=m_hdv, other=0.0)
    b_v = b_v.to(tl.float32)
    tl.store(V + i_b * s_vb + o_h[:, None] * s_vh + pos * s_vt + o_dv[None, :],
             round_to(b_v, VT).to(V.dtype.element_ty), mask=m_hdv)


def kv_append_rope(k_buf: Tensor, v_buf: Tensor, k_new: Tensor, v_new: Tensor, cos: Tensor, sin: Tensor,
                   positions: Tensor, *, backend: str = "auto") -> None:
    """Write each row's new token into the KV buffers at its position, K rotated by RoPE; in place.

    Args:
        k_buf, v_buf: (B, H_kv, S, D) one layer's buffers (post-RoPE K, V), any float dtype.
        k_new: (B, H_kv, D) the new token's pre-RoPE K (the model's (B, H_kv, 1, D) with the token
            axis squeezed); RoPE runs in its dtype, exactly as ``Rope.apply``, then the store casts.
        v_new: (B, H_kv, D) the new token's V.
        cos, sin: (P, D) rotate-half RoPE tables covering every slot (P >= S).
        positions: (B,) int position of each row's new token, on the device (the row's length
            before the step); it is also the slot written. A row at S tokens writes nothing.
        backend: "auto" (Triton for CUDA tensors, else the reference), "triton" or "ref".

    Nothing in the launch depends on the positions' values (one program per row), so it is the
    same every step.
    """
    op = "kv_append_rope"
    _check_buffers(op, k_buf, v_buf)
    bsz, n_kv, s_cap, hd = k_buf.shape
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.shape != (bsz, n_kv, hd) or t.dtype not in FLOATS or t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be a float ({bsz}, {n_kv}, {hd}) tensor with unit last "
                             f"stride, got {t.dtype} {tuple(t.shape)}")
    check_rope_tables(op, cos, sin, hd)
    if cos.shape[0] < s_cap:
        raise ValueError(f"{op}: RoPE tables hold {cos.shape[0]} positions but the buffers hold {s_cap} "
                         "tokens")
    check_seq_lens(op, positions, bsz)
    device = check_device(op, k_buf=k_buf, v_buf=v_buf, k_new=k_new, v_new=v_new, cos=cos, sin=sin,
                          positions=positions)
    if not use_triton(op, backend, k_buf, v_buf, k_new, v_new):
        kv_append_rope_ref(k_buf, v_buf, k_new, v_new, cos, sin, positions)
        return
    with on_device(device):
        _kv_append_kernel[(bsz,)](
            k_buf, k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
            v_buf, v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
            k_new, k_new.stride(0), k_new.stride(1),
            v_new, v_new.stride(0), v_new.stride(1),
            cos, sin, cos.stride(0),
            positions, s_cap,
            H_KV=n_kv, BH=next_pow2(n_kv), D=hd, DH=hd // 2, BD=next_pow2(hd), BDH=next_pow2(hd // 2),
            XT=tl_dtype(k_new.dtype), KT=tl_dtype(k_buf.dtype), VT=tl_dtype(v_buf.dtype),
            num_warps=1, enable_fp_fusion=False,  # float32: each product rounded, as torch does
        )


# ----------------------------------------------------------------------------- attention


def kv_attention_ref(
    q: Tensor,
    k_buf: Tensor,
    v_buf: Tensor,
    seq_lens: Tensor,
    *,
    window: int | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Reference: softmax attention over each row's tokens [max(0, n − window), n), in ``compute_dtype``.

    Same arguments as ``kv_attention``; the softmax is float32. Rows of length 0 give 0.
    Returns (B, H, D) in q.dtype.
    """
    bsz, n_heads, hd = q.shape
    n_kv = k_buf.shape[1]
    grp = n_heads // n_kv
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    cd = compute_dtype
    out = torch.zeros(bsz, n_heads, hd, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        n = int(seq_lens[b])
        lo = max(0, n - window) if window is not None else 0
        if n == 0:
            continue
        kk, vv = k_buf[b, :, lo:n].to(cd), v_buf[b, :, lo:n].to(cd)  # (n_kv, n - lo, D)
        qq = q[b].to(cd).view(n_kv, grp, hd)
        s = (qq @ kk.transpose(-1, -2)).float() * scale  # (n_kv, G, n - lo)
        p = torch.softmax(s, dim=-1).to(cd)
        out[b] = (p @ vv).float().reshape(n_heads, hd)
    return out.to(q.dtype)


@jit(do_not_specialize=["NS", "SPLIT", "s_ab", "s_ah", "s_mlb", "s_mlh"])
def _kv_split_kernel(
    Q, s_qb, s_qh,  # q (B, H, D)
    K, s_kb, s_kh, s_kt,  # K buffer (B, H_KV, S, D), post-RoPE
    V, s_vb, s_vh, s_vt,  # V buffer (B, H_KV, S, D)
    SEQ,  # (B,) tokens per row
    ACC, s_ab, s_ah, s_as,  # out: unnormalized per split outputs (B, H, NS, D) float32
    ML, s_mlb, s_mlh,  # out: per split max and sum (B, H, NS, 2) float32
    NS, SPLIT, qk_scale,  # split programs per row, least tokens per split (row_span); scale * log2(e)
    G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
    WINDOW: tl.constexpr, LOWP: tl.constexpr,
):
    i_b, i_hk = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    lo, hi, split, n_used = row_span(SEQ, i_b, NS, SPLIT, BT, WINDOW)
    if i_s >= n_used:  # past the row's last split: nothing to read or write
        return
    t_lo = lo + i_s * split
    t_hi = tl.minimum(t_lo + split, hi)

    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_h = i_hk * G + o_g
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_gd = m_g[:, None] & m_d[None, :]
    b_q = tl.load(Q + i_b * s_qb + o_h[:, None] * s_qh + o_d[None, :], mask=m_gd, other=0.0)
    if LOWP:
        b_q = b_q.to(K.dtype.element_ty)
    else:
        b_q = b_q.to(tl.float32)
    p_k = K + i_b * s_kb + i_hk * s_kh
    p_v = V + i_b * s_vb + i_hk * s_vh
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, BD], tl.float32)
    for t0 in range(t_lo, t_hi, BT):
        o_t = t0 + tl.arange(0, BT).to(tl.int64)
        m_t = o_t < t_hi
        m_td = m_t[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_t[:, None] * s_kt + o_d[None, :], mask=m_td, other=0.0)
        b_v = tl.load(p_v + o_t[:, None] * s_vt + o_d[None, :], mask=m_td, other=0.0)
        if LOWP:
            b_s = tl.dot(b_q, tl.trans(b_k))
        else:
            b_s = tl.dot(b_q, tl.trans(b_k.to(tl.float32)), input_precision="ieee")
        b_s = tl.where(m_t[None, :], b_s * qk_scale, float("-inf"))
        b_p, b_alpha, b_m, b_l = online_softmax(b_s, b_m, b_l)
        if LOWP:
            b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None])
        else:
            b_acc = tl.dot(b_p, b_v.to(tl.float32), b_acc * b_alpha[:, None], input_precision="ieee")
    store_split(ACC, s_ab, s_ah, s_as, ML, s_mlb, s_mlh, i_b, i_s, o_h, m_g, o_d, m_d, b_acc, b_m, b_l)


def kv_attention(
    q: Tensor,
    k_buf: Tensor,
    v_buf: Tensor,
    seq_lens: Tensor,
    *,
    window: int | None = None,
    scale: float | None = None,
    max_seq_len: int | None = None,
    capacity: int | None = None,
    split_tokens: int | None = None,
    out: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Decode attention of one new query token per row over its own tokens of a plain KV cache.

    Args:
        q: (B, H, D) post-RoPE query of the new token (fp16/bf16/fp32).
        k_buf, v_buf: (B, H_kv, S, D) one layer's buffers, post-RoPE K and V (``kv_append_rope``
            has written the new token); H_kv divides H.
        seq_lens: (B,) int tokens per row on the device, the new token included: row b attends over
            its tokens [0, seq_lens[b]), with a window only the last ``window`` of them.
        window: sliding window W (the model's ``sliding_window``) or None.
        scale: softmax scale, default 1/sqrt(D).
        max_seq_len, capacity: a host bound of seq_lens (eager steps) or the allocated context for
            a static, capturable launch (at most S); as in ``xquant_attention``.
        split_tokens: tokens per split (default: about two programs per SM, spread per row).
        out: optional (B, H, D) output buffer in q.dtype.
        backend: "auto" (Triton for CUDA tensors, else the reference), "triton" or "ref".

    Returns (B, H, D) in q.dtype. Rows of length 0 give 0.
    """
    op = "kv_attention"
    check_q_out(op, q, seq_lens, out)
    _check_buffers(op, k_buf, v_buf)
    bsz, n_heads, hd = q.shape
    device = check_device(op, q=q, k_buf=k_buf, v_buf=v_buf, seq_lens=seq_lens, out=out)
    n_kv = k_buf.shape[1]
    if k_buf.shape[0] != bsz or k_buf.shape[3] != hd or n_heads % n_kv:
        raise ValueError(f"{op}: k_buf/v_buf must be (B={bsz}, H_kv, S, D={hd}) with H_kv dividing the "
                         f"{n_heads} query heads, got {tuple(k_buf.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"{op}: window must be >= 1 token or None, got {window}")
    if not use_triton(op, backend, q, k_buf, v_buf):
        res = kv_attention_ref(q, k_buf, v_buf, seq_lens, window=window, scale=scale)
        return res if out is None else out.copy_(res)

    bound = resolve_len(op, seq_lens, max_seq_len, k_buf.shape[2], capacity, holder="the K/V buffers")
    span = min(bound, window) if window is not None else bound
    grp = n_heads // n_kv
    lowp, bt, split, n_splits, ml = plan_flash(q, n_kv, span, k_buf.dtype, split_tokens)
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    acc = torch.empty(bsz, n_heads, n_splits, hd, dtype=torch.float32, device=device)
    with on_device(device):
        _kv_split_kernel[(bsz, n_kv, n_splits)](
            q, q.stride(0), q.stride(1),
            k_buf, k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
            v_buf, v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
            seq_lens,
            acc, acc.stride(0), acc.stride(1), acc.stride(2),
            ml, ml.stride(0), ml.stride(1),
            n_splits, split, scale * 1.4426950408889634,
            G=grp, BG=max(16, next_pow2(grp)), D=hd, BD=max(16, next_pow2(hd)), BT=bt,
            WINDOW=window or 0, LOWP=lowp,
            num_warps=4, num_stages=2,
        )
        res = out if out is not None else torch.empty_like(q)
        launch_merge(acc, ml, res, seq_lens, split, bt, grp, window or 0)
    return res
