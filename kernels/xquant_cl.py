"""XQuant-CL: fused delta dequantization + accumulator update, then attention over the accumulator.

Closed-loop cross-layer deltas (docs/design.md §4): layer i stores Q(X_i − X̂_{i−1}) per token (GQA: the delta
projected on U_kv, 2·d_kv wide) and the decoder keeps one running accumulator

    X̂_i = X̂_{i−1} + Δ_i                (MHA, delta width d)
    X̂_i = X̂_{i−1} + Δ_i · U_kvᵀ        (GQA, U_kv (d × 2·d_kv) with orthonormal columns)

``xquant_cl_update`` does this in place on the accumulator for every token t < seq_lens[b] of each
row, reading Δ from a delta stream: dequantized codes for t < sealed[b], the stream's full-precision
tail after that. The tail deltas are formed against the accumulator of the moment:
``xqcli.cache.xquant_cl`` keeps X·U_kv (or X) in its window, so a waiting token's delta is
``tail − X̂_{i−1}[t]·U_kv``. The caller either passes a tail of deltas, or the raw tail and that projection
as ``tail_sub`` (laid out like the tail), which the kernel subtracts in float32 as it reads the tail:
one launch fewer per layer in the static decode step. Tokens at or
after seq_lens[b] are not touched. ``seed=True`` starts the chain (the base layer): X̂ = Δ (·U_kvᵀ).
The accumulator is a materialized buffer by design (the paper's transient accumulator); K and V are
not: ``xquant_cl_attention`` runs the fused XQuant attention kernel in MHA form over it (M_k = W_kᵀ,
M_v = W_vᵀ, K rebuilt per tile, V absorbed).

GQA's closed loop is sensitive to rounding where a token is sealed (docs/design.md §4), so the decode step
carries the X̂ of each row's sealed token in float64 beside the accumulator: ``xquant_cl_update`` extends it
(``sealing``: the program whose tile holds that token adds its row's delta times U_kvᵀ in float64) and
``xquant_cl_project`` projects it on the next layer's U_kv in float64, together with the ring tokens' float32
projections the update kernel subtracts (``tail_sub``): one launch for both.

The kernel ``_cl_update_kernel`` has a program per (row, token slot, BN accumulator channels): slot
i handles the row's BT-token tiles i, i + NT, i + 2·NT, ... up to the row's length read on the
device. Per tile it dequantizes BC delta channels at a time and, for GQA, ``tl.dot``s them with the
matching U_kv block, then adds the previous accumulator in float32 and stores in the accumulator's
dtype. NT, the slots per row, comes from the launch's host bound alone (one slot per tile for short
bounds, about eight programs per SM for long ones), so a launch sized for a static ``capacity`` is
the same every step and slots past a row's length do nothing.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from xqcli.kernels._common import FLOATS, check_seq_lens, load_tile, plan_splits, resolve_len
from xqcli.kernels._triton import INTERPRET, cdiv, check_device, jit, next_pow2, on_device, tl, use_triton
from xqcli.kernels.packed import PackedStream
from xqcli.kernels.xquant_attention import xquant_attention, xquant_attention_ref

__all__ = ["xquant_cl_attention", "xquant_cl_attention_ref", "xquant_cl_project", "xquant_cl_project_ref",
           "xquant_cl_update", "xquant_cl_update_ref"]

def xquant_cl_update_ref(
    acc: Tensor,
    delta: PackedStream,
    seq_lens: Tensor,
    *,
    u_kv: Tensor | None = None,
    seed: bool = False,
    tail_sub: Tensor | None = None,
    sealing: Tensor | None = None,
    sealing_pos: Tensor | None = None,
) -> Tensor:
    """Reference of ``xquant_cl_update`` (float32 math, one rounding to acc.dtype; ``sealing`` in float64);
    updates acc (and sealing) in place."""
    if tail_sub is not None:
        delta = replace(delta, tail=delta.tail.float() - tail_sub.float())
    for b in range(acc.shape[0]):
        n = int(seq_lens[b])
        if n == 0:
            continue
        d = delta.values_ref(b, n)  # (n, C): dequantized deltas, then the tail's deltas
        if sealing is not None and int(sealing_pos[b]) < n:
            up = d[int(sealing_pos[b])].double() @ u_kv.double().T
            sealing[b] = up if seed else sealing[b] + up
        if u_kv is not None:
            d = d @ u_kv.float().T
        acc[b, :n] = (d if seed else acc[b, :n].float() + d).to(acc.dtype)
    return acc


@jit
def _tail_sub_tile(p_ts, s_tst, o_t, o_c, m_f, m_c, sealed, RING: tl.constexpr):
    """The (BT, BC) float32 tile of ``tail_sub`` at the tail tokens (m_f), addressed as ``load_tile`` addresses
    the tail; 0 elsewhere."""
    if RING:
        o_f = o_t % RING
    else:
        o_f = o_t - sealed
    return tl.load(p_ts + o_f[:, None] * s_tst + o_c[None, :], mask=m_f[:, None] & m_c[None, :],
                   other=0.0).to(tl.float32)


@jit(do_not_specialize=["NT"])
def _cl_update_kernel(
    A, s_ab, s_at,  # accumulator (B, S, N), updated in place
    DC, DS, DZ, DT, D_SEALED, DB,  # delta stream (width C): codes, scale, zero, full-precision tail, sealed,
    s_dcb, s_dct, s_dsb, s_dst, s_dtb, s_dtt, s_dbb,  # block table (PAGE), and their strides
    TS, s_tsb, s_tst,  # tail_sub, laid out like the tail, read only if HAS_TS
    SEQ,  # (B,) tokens per row
    U, s_un, s_uc,  # U_kv (N, C), read only if HAS_U
    SEAL, s_seb, SEAL_POS,  # float64 X̂ (B, N) of the token each row seals, its position (B,): if HAS_SEAL
    N, C, NT,  # accumulator width, delta width, token slots per row
    BT: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
    BITS: tl.constexpr, GS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_CODES: tl.constexpr,
    ALIGNED: tl.constexpr, RING: tl.constexpr, PAGE: tl.constexpr, HAS_U: tl.constexpr, SEED: tl.constexpr,
    LOWP: tl.constexpr, HAS_TS: tl.constexpr, HAS_SEAL: tl.constexpr,
):
    i_b, i_t, i_n = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    seq = tl.load(SEQ + i_b).to(tl.int64)
    sealed = tl.load(D_SEALED + i_b).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_dc, p_ds, p_dz, p_dt = DC + i_b * s_dcb, DS + i_b * s_dsb, DZ + i_b * s_dsb, DT + i_b * s_dtb
    p_ts = TS + i_b * s_tsb
    p_db = DB + i_b * s_dbb
    pos = -1
    if HAS_SEAL:
        pos = tl.load(SEAL_POS + i_b).to(tl.int64)
    for t0 in range(i_t * BT, seq, NT * BT):  # empty for slots past the row's length
        o_t = t0 + tl.arange(0, BT).to(tl.int64)
        m_t = o_t < seq
        m_q = m_t & (o_t < sealed)
        m_f = m_t & (o_t >= sealed)
        if HAS_U:
            b_u = tl.zeros([BT, BN], tl.float32)
            mine = (pos >= t0) & (pos < t0 + BT) & (pos < seq)  # this tile holds the token being sealed
            b_s = tl.zeros([BN], tl.float64)
            for c0 in range(0, C, BC):
                o_c = c0 + tl.arange(0, BC)
                m_c = o_c < C
                b_x = load_tile(p_dc, s_dct, p_ds, p_dz, s_dst, p_dt, s_dtt, p_db, o_t, o_c, m_q, m_f, m_c,
                                 sealed, t0, c0, BITS, GS, PER_CHANNEL, HAS_CODES, ALIGNED, RING, PAGE)
                if HAS_TS:
                    b_x = b_x - _tail_sub_tile(p_ts, s_tst, o_t, o_c, m_f, m_c, sealed, RING)
                b_w = tl.load(U + o_n[None, :] * s_un + o_c[:, None] * s_uc, mask=m_c[:, None] & m_n[None, :],
                              other=0.0)
                if LOWP:
                    b_u = tl.dot(b_x.to(b_w.dtype), b_w, b_u)
                else:
                    b_u = tl.dot(b_x, b_w.to(tl.float32), b_u, input_precision="ieee")
                if HAS_SEAL:
                    if mine:  # its row of the tile (a sum of one value: exact), then a float64 product
                        b_r = tl.sum(tl.where((o_t == pos)[:, None], b_x, 0.0), axis=0).to(tl.float64)
                        b_s += tl.sum(b_r[:, None] * b_w.to(tl.float64), axis=0)
            if HAS_SEAL:
                if mine:
                    p_s = SEAL + i_b * s_seb + o_n
                    if not SEED:
                        b_s += tl.load(p_s, mask=m_n, other=0.0)
                    tl.store(p_s, b_s, mask=m_n)
        else:
            b_u = load_tile(p_dc, s_dct, p_ds, p_dz, s_dst, p_dt, s_dtt, p_db, o_t, o_n, m_q, m_f, m_n, sealed,
                             t0, i_n * BN, BITS, GS, PER_CHANNEL, HAS_CODES, ALIGNED, RING, PAGE)
            if HAS_TS:
                b_u = b_u - _tail_sub_tile(p_ts, s_tst, o_t, o_n, m_f, m_n, sealed, RING)
        p_a = A + i_b * s_ab + o_t[:, None] * s_at + o_n[None, :]
        m_a = m_t[:, None] & m_n[None, :]
        if SEED:
            b_new = b_u
        else:
            b_new = tl.load(p_a, mask=m_a, other=0.0).to(tl.float32) + b_u
        tl.store(p_a, b_new, mask=m_a)


def xquant_cl_update(
    acc: Tensor,
    delta: PackedStream,
    seq_lens: Tensor,
    *,
    u_kv: Tensor | None = None,
    seed: bool = False,
    tail_sub: Tensor | None = None,
    sealing: Tensor | None = None,
    sealing_pos: Tensor | None = None,
    max_seq_len: int | None = None,
    capacity: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """X̂_i = X̂_{i−1} + Δ_i (·U_kvᵀ), in place on ``acc``; returns ``acc``.

    Args:
        acc: (B, S, d) accumulator X̂_{i−1} (fp16/bf16/fp32), overwritten with X̂_i.
        delta: layer i's deltas (width d for MHA, 2·d_kv with u_kv): per-token codes for tokens
            < sealed[b], full-precision deltas in ``tail`` for the tokens after them.
        seq_lens: (B,) int tokens per row; tokens at or after seq_lens[b] are not touched.
        u_kv: (d, 2·d_kv) shared basis U_kv (GQA); None for MHA.
        seed: start the chain: X̂ = Δ (·U_kvᵀ), ignoring the previous contents of acc.
        tail_sub: subtracted (in float32) from the tail's values as they are read, the same shape as
            ``delta.tail`` and laid out like it (unit last stride): the raw tail's projected accumulator.
        sealing: (B, d) float64, with u_kv: the closed-loop chain of the token each row seals this step,
            at ``sealing_pos`` (B,) int: if that token is among the row's seq_lens[b], sealing[b] becomes
            Δ_i[pos]·U_kvᵀ (seed) or sealing[b] + Δ_i[pos]·U_kvᵀ, products and sums in float64, so the
            next layer's delta of that token does not depend on a GEMM's summation order
            (``xquant_cl_project``); other rows' sealing is left as is.
        max_seq_len: an upper bound of seq_lens known on the host (saves a device sync): eager steps.
        capacity: the allocated context instead (at most acc's S): a static launch, the same every
            step (capturable in a CUDA graph); see the module docstring.
        backend: "auto" (Triton for CUDA tensors, else the reference), "triton" or "ref".
    """
    op = "xquant_cl_update"
    if acc.dim() != 3 or acc.dtype not in FLOATS or acc.stride(-1) != 1:
        raise ValueError(f"{op}: acc must be a float (B, S, d) tensor with unit last stride, "
                         f"got {acc.dtype} {tuple(acc.shape)}")
    bsz, s_acc, d = acc.shape
    device = check_device(op, acc=acc, seq_lens=seq_lens, u_kv=u_kv, tail_sub=tail_sub)
    delta.check(op, "delta", bsz, device)
    if delta.quantized and delta.spec.axis != "token":
        raise ValueError(f"{op}: deltas are quantized per token, got a {delta.spec.axis}-axis stream")
    if u_kv is None:
        if delta.c != d:
            raise ValueError(f"{op}: without u_kv the delta width must equal acc's {d}, got {delta.c}")
    elif u_kv.shape != (d, delta.c) or u_kv.dtype not in FLOATS:
        raise ValueError(f"{op}: u_kv must be a float (d={d}, {delta.c}) matrix, "
                         f"got {u_kv.dtype} {tuple(u_kv.shape)}")
    if tail_sub is not None and (tail_sub.shape != delta.tail.shape or tail_sub.dtype not in FLOATS
                                 or tail_sub.stride(-1) != 1):
        raise ValueError(f"{op}: tail_sub must be a float tensor shaped like delta's tail "
                         f"{tuple(delta.tail.shape)} with unit last stride, got {tail_sub.dtype} "
                         f"{tuple(tail_sub.shape)}")
    check_seq_lens(op, seq_lens, bsz)
    if sealing is not None:
        check_sealing(op, sealing, bsz, d)
        if u_kv is None:
            raise ValueError(f"{op}: sealing is the GQA chain through U_kv; it needs u_kv")
        if sealing_pos is None or sealing_pos.shape != (bsz,) or sealing_pos.is_floating_point():
            raise ValueError(f"{op}: sealing_pos must be an integer ({bsz},) tensor of positions")
    if not use_triton(op, backend, acc, u_kv, tail_sub):
        return xquant_cl_update_ref(acc, delta, seq_lens, u_kv=u_kv, seed=seed, tail_sub=tail_sub, sealing=sealing,
                                    sealing_pos=sealing_pos)
    s_max = resolve_len(op, seq_lens, max_seq_len, s_acc, capacity, holder="acc's buffers")
    if s_max == 0:
        return acc
    lowp = not INTERPRET and u_kv is not None and u_kv.dtype in (torch.float16, torch.bfloat16)
    bt = 32 if INTERPRET or not lowp else 64  # tiles sized against register spills (ptxas -v, sm_90)
    bn = min(256 if INTERPRET else 64, max(16, next_pow2(d)))
    bc = 128 if INTERPRET else 64
    u = u_kv if u_kv is not None else acc
    ts = tail_sub if tail_sub is not None and tail_sub.shape[1] else acc  # an empty tail is never read
    n_chunks = cdiv(d, bn)
    _, n_slots = plan_splits(s_max, bsz * n_chunks, device, bt, per_sm=8)
    with on_device(device):
        _cl_update_kernel[(bsz, n_slots, n_chunks)](
            acc, acc.stride(0), acc.stride(1),
            *delta.args(), *delta.strides(),
            ts, ts.stride(0), ts.stride(1),
            seq_lens,
            u, u.stride(0), u.stride(1),
            *((sealing, sealing.stride(0), sealing_pos) if sealing is not None else (acc, 0, seq_lens)),
            d, delta.c, n_slots,
            BT=bt, BN=bn, BC=bc,
            HAS_U=u_kv is not None, SEED=seed,
            LOWP=lowp, HAS_TS=ts is not acc, HAS_SEAL=sealing is not None,
            **delta.meta(bt, bc if u_kv is not None else bn),
            num_warps=8, num_stages=2,
        )
    return acc


def check_sealing(op: str, sealing: Tensor, bsz: int, d: int) -> None:
    """The sealed tokens' float64 chain: (B, d) float64 with unit last stride."""
    if sealing.shape != (bsz, d) or sealing.dtype != torch.float64 or sealing.stride(-1) != 1:
        raise ValueError(f"{op}: sealing must be a float64 ({bsz}, {d}) tensor with unit last stride, "
                         f"got {sealing.dtype} {tuple(sealing.shape)}")


def xquant_cl_project_ref(acc: Tensor, index: Tensor, sealing: Tensor, u_kv: Tensor) -> Tensor:
    """Reference of ``xquant_cl_project``: a float32 product for the indexed tokens, a float64 one for the sealed
    token's chain (rounded to float32, then to acc's dtype)."""
    rows = acc.gather(1, index.long()[..., None].expand(-1, -1, acc.shape[-1]))
    out = (rows.float() @ u_kv.float()).to(acc.dtype)
    sealed = (sealing @ u_kv.double()).float().to(acc.dtype)
    return torch.cat([sealed[:, None], out], dim=1)


@jit
def _cl_project_kernel(
    A, s_ab, s_at,  # accumulator (B, S, D)
    IDX, s_ib, s_ir,  # (B, R) token positions
    SEAL, s_sb,  # (B, D) float64
    U, s_ud, s_uc,  # (D, C)
    OUT, s_ob, s_or,  # (B, 1 + R, C)
    R, D, C,
    BR: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, LOWP: tl.constexpr,
):
    i_b, i_r, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    o_r = i_r * BR + tl.arange(0, BR)  # output rows: 0 is the sealed token's, 1 + j is index[b, j]'s
    m_r = (o_r >= 1) & (o_r <= R)
    o_t = tl.load(IDX + i_b * s_ib + (o_r - 1) * s_ir, mask=m_r, other=0).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    b_o = tl.zeros([BR, BC], tl.float32)
    b_s = tl.zeros([BC], tl.float64)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_w = tl.load(U + o_d[:, None] * s_ud + o_c[None, :] * s_uc, mask=m_d[:, None] & m_c[None, :], other=0.0)
        b_a = tl.load(A + i_b * s_ab + o_t[:, None] * s_at + o_d[None, :], mask=m_r[:, None] & m_d[None, :],
                      other=0.0)
        if LOWP:
            b_o = tl.dot(b_a.to(b_w.dtype), b_w, b_o)
        else:
            b_o = tl.dot(b_a.to(tl.float32), b_w.to(tl.float32), b_o, input_precision="ieee")
        if i_r == 0:
            b_x = tl.load(SEAL + i_b * s_sb + o_d, mask=m_d, other=0.0)
            b_s += tl.sum(b_x[:, None] * b_w.to(tl.float64), axis=0)
    b_o = tl.where((o_r == 0)[:, None], b_s.to(tl.float32)[None, :], b_o)
    tl.store(OUT + i_b * s_ob + o_r[:, None] * s_or + o_c[None, :], b_o.to(OUT.dtype.element_ty),
             mask=(o_r <= R)[:, None] & m_c[None, :])


def xquant_cl_project(acc: Tensor, index: Tensor, sealing: Tensor, u_kv: Tensor, *, backend: str = "auto"
                      ) -> Tensor:
    """(B, 1 + R, C): X̂_{i−1} of the tokens a GQA delta layer forms deltas for, projected on U_kv, in one launch.

    Row 0 is ``sealing[b]·U_kv``, the token this step seals, from its float64 chain (products and sums in
    float64, then rounded to float32 and acc's dtype): its closed-loop delta is quantized, and a float32 GEMM's
    summation order (which differs between cuBLAS, MKL and ``tl.dot``) would move it across rounding
    boundaries of its fp16 scales and zeros, a flip each later layer of the token carries on. Rows 1 + j are
    ``acc[b, index[b, j]]·U_kv`` in float32 (the ring's waiting tokens: full precision, nothing rounded to a
    code). acc (B, S, d) float; index (B, R) integer positions below S; sealing (B, d) float64; u_kv (d, C).
    """
    op = "xquant_cl_project"
    if acc.dim() != 3 or acc.dtype not in FLOATS or acc.stride(-1) != 1:
        raise ValueError(f"{op}: acc must be a float (B, S, d) tensor with unit last stride, "
                         f"got {acc.dtype} {tuple(acc.shape)}")
    bsz, _, d = acc.shape
    check_device(op, acc=acc, index=index, sealing=sealing, u_kv=u_kv)
    if index.dim() != 2 or index.shape[0] != bsz or index.is_floating_point():
        raise ValueError(f"{op}: index must be an integer ({bsz}, R) tensor, got {index.dtype} {tuple(index.shape)}")
    if u_kv.dim() != 2 or u_kv.shape[0] != d or u_kv.dtype not in FLOATS:
        raise ValueError(f"{op}: u_kv must be a float (d={d}, C) matrix, got {u_kv.dtype} {tuple(u_kv.shape)}")
    check_sealing(op, sealing, bsz, d)
    if not use_triton(op, backend, acc, u_kv):
        return xquant_cl_project_ref(acc, index, sealing, u_kv)
    r, c = index.shape[1], u_kv.shape[1]
    out = torch.empty(bsz, 1 + r, c, dtype=acc.dtype, device=acc.device)
    lowp = not INTERPRET and acc.dtype in (torch.float16, torch.bfloat16) and u_kv.dtype == acc.dtype
    br = min(next_pow2(1 + r), 128) if INTERPRET else 16
    bd, bc = (128, 128) if INTERPRET else (64, 64)
    with on_device(acc.device):
        _cl_project_kernel[(bsz, cdiv(1 + r, br), cdiv(c, bc))](
            acc, acc.stride(0), acc.stride(1),
            index, index.stride(0), index.stride(1),
            sealing, sealing.stride(0),
            u_kv, u_kv.stride(0), u_kv.stride(1),
            out, out.stride(0), out.stride(1),
            r, d, c,
            BR=br, BD=bd, BC=bc, LOWP=lowp,
            num_warps=4,
        )
    return out


def xquant_cl_attention_ref(
    q: Tensor, acc: Tensor, w_k: Tensor, w_v: Tensor, cos: Tensor, sin: Tensor, seq_lens: Tensor, *,
    b_k: Tensor | None = None, b_v: Tensor | None = None, scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Reference of ``xquant_cl_attention``: K = X̂·W_kᵀ, V = X̂·W_vᵀ densely, RoPE, softmax."""
    dense = PackedStream.dense(acc)
    return xquant_attention_ref(q, dense, dense, w_k.T, w_v.T, cos, sin, seq_lens, b_k=b_k, b_v=b_v,
                                scale=scale, compute_dtype=compute_dtype)


def xquant_cl_attention(
    q: Tensor, acc: Tensor, w_k: Tensor, w_v: Tensor, cos: Tensor, sin: Tensor, seq_lens: Tensor, *,
    b_k: Tensor | None = None, b_v: Tensor | None = None, scale: float | None = None,
    max_seq_len: int | None = None, capacity: int | None = None, split_tokens: int | None = None,
    out: Tensor | None = None, backend: str = "auto",
) -> Tensor:
    """Decode attention over the accumulator X̂_i (B, S, d): the XQuant kernel in MHA form.

    w_k, w_v: ``k_proj.weight`` / ``v_proj.weight`` (H_kv·D, d); b_k, b_v their biases. Other
    arguments as in ``xquant_attention``. K and V are rebuilt per tile and never stored.
    """
    if acc.dim() != 3:
        raise ValueError(f"xquant_cl_attention: acc must be (B, S, d), got {tuple(acc.shape)}")
    dense = PackedStream.dense(acc)
    return xquant_attention(q, dense, dense, w_k.T, w_v.T, cos, sin, seq_lens, b_k=b_k, b_v=b_v, scale=scale,
                            max_seq_len=max_seq_len, capacity=capacity, split_tokens=split_tokens, out=out,
                            backend=backend)
