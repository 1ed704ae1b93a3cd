"""RoPE of the decode step's query, positions read on the device: one launch per layer, no scalar that
changes from step to step (docs/design.md §6: a captured decode step).

``rope_q(q, cos, sin, positions)`` rotates each row's query (B, H, D) at its own position
(``positions[b]``, the row's length before the step, in device memory) exactly as
``xqcli.rope.Rope.apply`` does it: ``x·cos + rotate_half(x)·sin`` in q's dtype, the tables rounded to
it, each product and the sum rounded (the kernel's arithmetic is ``kv_append_rope``'s, whose K side
this is without the store into a cache). One program per row; the launch depends only on the shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from xqcli.kernels._common import FLOATS, check_rope_tables, check_seq_lens, rope_halves, rotate_half
from xqcli.kernels._triton import check_device, jit, next_pow2, on_device, tl, tl_dtype, use_triton

__all__ = ["rope_q", "rope_q_ref"]


def rope_q_ref(q: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> Tensor:
    """Reference: ``Rope.apply``'s formula at each row's position; returns a new (B, H, D) tensor."""
    pos = positions.long()
    c = cos[pos][:, None].to(q.dtype)  # (B, 1, D), as Rope.cos_sin casts the table to x's dtype
    s = sin[pos][:, None].to(q.dtype)
    return q * c + rotate_half(q) * s


@jit
def _rope_q_kernel(
    Q, s_qb, s_qh,  # query (B, H, D)
    O, s_ob, s_oh,  # output (B, H, D)
    COS, SIN, s_rope,  # RoPE tables (positions, D)
    POS,  # (B,) each row's position
    H: tl.constexpr, BH: tl.constexpr, DH: tl.constexpr, BDH: tl.constexpr, XT: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + i_b).to(tl.int64)
    o_h = tl.arange(0, BH)
    o_d = tl.arange(0, BDH)
    m_d = o_d < DH
    m_hd = (o_h < H)[:, None] & m_d[None, :]
    p_q = Q + i_b * s_qb + o_h[:, None] * s_qh + o_d[None, :]
    b_o1, b_o2 = rope_halves(p_q, COS, SIN, pos * s_rope + o_d, m_hd, m_d, DH, XT)
    p_o = O + i_b * s_ob + o_h[:, None] * s_oh + o_d[None, :]
    tl.store(p_o, b_o1.to(O.dtype.element_ty), mask=m_hd)
    tl.store(p_o + DH, b_o2.to(O.dtype.element_ty), mask=m_hd)


def rope_q(q: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, *, out: Tensor | None = None,
           backend: str = "auto") -> Tensor:
    """RoPE of one query token per row at ``positions[b]``; returns ``out`` (default a new (B, H, D)).

    q: (B, H, D) float with unit last stride (any other strides: a view of the layer's GEMV output);
    cos, sin: (P, D) rotate-half tables covering every position; positions: (B,) int on the device,
    not checked there (that would sync): each must be < P. out: a (B, H, D) buffer of q's dtype.
    backend: "auto" (Triton for CUDA tensors, else the reference), "triton" or "ref".
    """
    op = "rope_q"
    if q.dim() != 3 or q.dtype not in FLOATS or q.stride(-1) != 1:
        raise ValueError(f"{op}: q must be a float (B, H, D) tensor with unit last stride, "
                         f"got {q.dtype} {tuple(q.shape)}")
    bsz, heads, hd = q.shape
    check_rope_tables(op, cos, sin, hd)
    check_seq_lens(op, positions, bsz)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"{op}: out must be {q.dtype} {tuple(q.shape)} with unit last stride, "
                         f"got {out.dtype} {tuple(out.shape)}")
    device = check_device(op, q=q, cos=cos, sin=sin, positions=positions, out=out)
    if not use_triton(op, backend, q):
        res = rope_q_ref(q, cos, sin, positions)
        return res if out is None else out.copy_(res)
    res = out if out is not None else torch.empty_like(q, memory_format=torch.contiguous_format)
    with on_device(device):
        _rope_q_kernel[(bsz,)](
            q, q.stride(0), q.stride(1),
            res, res.stride(0), res.stride(1),
            cos, sin, cos.stride(0),
            positions,
            H=heads, BH=next_pow2(heads), DH=hd // 2, BDH=next_pow2(hd // 2), XT=tl_dtype(q.dtype),
            num_warps=1, enable_fp_fusion=False,  # float32: each product rounded, as torch does
        )
    return res
