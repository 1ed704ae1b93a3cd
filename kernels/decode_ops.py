"""The decode step's small fused ops around the matmuls: residual add + RMSNorm, and SiLU·mul.

A decode step is launch-bound (issue 13: at most 12-15 launches per layer), so the elementwise work
between two matmuls is one kernel each:

``add_rms_norm(h, delta, w, eps)``
    ``h = h + delta`` (the residual, in the model dtype) fused with the next RMSNorm of h: one launch
    instead of about eight aten ops. ``rms_norm`` is the same kernel without the residual (the first
    layer's input norm).
``silu_mul(gate_up)``
    ``silu(gate) · up`` on the output of one GEMV over ``[W_gate; W_up]`` (gate: the first half of
    the last axis): one launch instead of two, after one GEMV instead of two.

Numerics are the model's (``xqcli.model.RMSNorm`` and ``MLP``), rounding for rounding: every value
the model rounds to its dtype is rounded here too (round to nearest even), in the same order; all
arithmetic in between is float32, as torch computes the same ops. So on float32 inputs the kernels
differ from the references only by the order of the row sum in the norm and by ``exp``'s last bit.
Under the interpreter, float32 -> bfloat16 casts and stores truncate; ``_round`` rounds bf16 with
integer arithmetic there, which makes the stored values exact (bf16 values) before the store.

Every op takes ``out=`` buffers (for a captured CUDA graph: the step's static tensors; in tests:
NaN-poisoned buffers that show unwritten elements) and ``backend`` as the other kernels do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xqcli.kernels._common import FLOATS
from xqcli.kernels._triton import INTERPRET, cdiv, jit, next_pow2, on_device, tl, tl_dtype, use_triton

__all__ = ["add_rms_norm", "add_rms_norm_ref", "rms_norm", "rms_norm_ref", "silu_mul", "silu_mul_ref"]

SILU_BLOCK = 1024  # columns per SiLU·mul program (gate and up halves: 2 x 4 KiB of fp16 per program)


# ----------------------------------------------------------------------------- references


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in ``xqcli.model.RMSNorm``'s (HF's) order: normalize in float32, cast back, then the gain."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_ref(h: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(h + delta, its RMSNorm): the model's residual add (in its dtype), then the next norm."""
    h = h + delta
    return h, rms_norm_ref(h, weight, eps)


def silu_mul_ref(gate_up: Tensor) -> Tensor:
    """``silu(gate) · up`` from ``[gate | up]`` on the last axis, as ``xqcli.model.MLP`` computes it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ----------------------------------------------------------------------------- kernels


@jit
def _round(x, DT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """float32 x rounded (to nearest even) to DT and back to float32: the model's cast to its dtype.

    EMULATE_BF16 (interpreter, bf16): integer rounding, since the interpreter's bf16 cast truncates."""
    if EMULATE_BF16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536  # -65536: the int32 mask 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)


@jit
def _add_rms_norm_kernel(
    H, D, W, HO, NO,  # input rows, residual delta rows, gain (C,), outputs: h + delta, normed
    s_h, s_d, s_ho, s_no,  # row strides
    n_cols, n_cols_f, eps,
    HAS_DELTA: tl.constexpr, DT: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row: h (+ delta, rounded, stored), then RMSNorm of that row (n_cols_f: C as a
    float, so the mean is one correctly rounded division like torch's)."""
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK)
    m = o < n_cols
    x = tl.load(H + row * s_h + o, mask=m, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x = _round(x + tl.load(D + row * s_d + o, mask=m, other=0.0).to(tl.float32), DT, EMULATE_BF16)
        tl.store(HO + row * s_ho + o, x, mask=m)
    mean = tl.math.div_rn(tl.sum(x * x, axis=0), n_cols_f)
    inv = tl.math.div_rn(1.0, tl.sqrt_rn(mean + eps))  # torch.rsqrt: 1 / sqrt, each correctly rounded
    y = _round(x * inv, DT, EMULATE_BF16)
    g = tl.load(W + o, mask=m, other=0.0).to(tl.float32)
    tl.store(NO + row * s_no + o, _round(g * y, DT, EMULATE_BF16), mask=m)


@jit
def _silu_mul_kernel(GU, OUT, s_g, s_o, n_cols, DT: tl.constexpr, EMULATE_BF16: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Program (row, block): BLOCK columns of silu(gate)·up; the gate rounds to DT before the product."""
    row = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = o < n_cols
    g = tl.load(GU + row * s_g + o, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * s_g + n_cols + o, mask=m, other=0.0).to(tl.float32)
    s = _round(tl.math.div_rn(g, 1.0 + tl.exp(-g)), DT, EMULATE_BF16)
    tl.store(OUT + row * s_o + o, _round(s * u, DT, EMULATE_BF16), mask=m)


# ----------------------------------------------------------------------------- ops


def _check_like(op: str, name: str, t: Tensor, shape: tuple[int, ...], like: Tensor, *,
                out: bool = False) -> None:
    """Raise ValueError unless t has this shape and like's dtype and device (an output: also contiguous)."""
    if tuple(t.shape) != tuple(shape) or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{op}: {name} must be {like.dtype} {tuple(shape)} on {like.device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if out and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def _emulate_bf16(dtype: torch.dtype) -> bool:
    """bf16 rounding by integer arithmetic: only under the interpreter, whose bf16 casts truncate."""
    return INTERPRET and dtype == torch.bfloat16


def _rows(t: Tensor) -> Tensor:
    """t as (rows, C) with a unit last stride (a view when t allows it)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _norm(op: str, h: Tensor, delta: Tensor | None, weight: Tensor, eps: float, h_out: Tensor | None,
          normed_out: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    """The shared body of ``rms_norm`` and ``add_rms_norm``: checks, then the kernel or the reference."""
    if h.dtype not in FLOATS or h.dim() < 1 or h.shape[-1] == 0:
        raise ValueError(f"{op}: x must be a float (..., C) tensor with C >= 1, "
                         f"got {h.dtype} {tuple(h.shape)}")
    if weight.shape != h.shape[-1:] or weight.dtype != h.dtype or weight.device != h.device:
        raise ValueError(f"{op}: weight must be {h.dtype} ({h.shape[-1]},) on {h.device}, "
                         f"got {weight.dtype} {tuple(weight.shape)} on {weight.device}")
    if delta is not None:
        _check_like(op, "delta", delta, h.shape, h)
    for name, t in (("h_out", h_out), ("out", normed_out)):
        if t is not None:
            _check_like(op, name, t, h.shape, h, out=True)
    if not use_triton(op, backend, h, delta, weight):
        if delta is None:
            h_new, normed = h, rms_norm_ref(h, weight, eps)
        else:
            h_new, normed = add_rms_norm_ref(h, delta, weight, eps)
        if h_out is not None:
            h_new = h_out.copy_(h_new)
        return h_new, normed if normed_out is None else normed_out.copy_(normed)
    x, c = _rows(h), h.shape[-1]
    d = _rows(delta) if delta is not None else x
    if delta is not None and h_out is None:
        h_out = torch.empty_like(h, memory_format=torch.contiguous_format)
    if normed_out is None:
        normed_out = torch.empty_like(h, memory_format=torch.contiguous_format)
    block = next_pow2(c)
    with on_device(h.device):
        _add_rms_norm_kernel[(x.shape[0],)](
            x, d, weight, x if h_out is None else h_out, normed_out, x.stride(0), d.stride(0), c, c,
            c, float(c), float(eps), HAS_DELTA=delta is not None, DT=tl_dtype(h.dtype),
            EMULATE_BF16=_emulate_bf16(h.dtype), BLOCK=block, num_warps=8 if block >= 4096 else 4,
        )
    return h if h_out is None else h_out, normed_out


def add_rms_norm(h: Tensor, delta: Tensor, weight: Tensor, eps: float, *,
                 out: tuple[Tensor, Tensor] | None = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(h + delta, RMSNorm(h + delta) · weight) over the last axis, in one launch.

    h, delta: (..., C) of one float dtype; weight: (C,) of that dtype (the model's). ``out = (h_out,
    normed_out)``: contiguous buffers of h's shape (``h_out`` may be ``h`` itself: each row is read
    before it is written). ``backend``: ``"auto"`` runs the kernel on CUDA tensors and
    ``add_rms_norm_ref`` otherwise; ``"triton"`` / ``"ref"`` force one (see ``_triton.use_triton``).
    """
    h_out, normed_out = out if out is not None else (None, None)
    return _norm("add_rms_norm", h, delta, weight, eps, h_out, normed_out, backend)


def rms_norm(x: Tensor, weight: Tensor, eps: float, *, out: Tensor | None = None,
             backend: str = "auto") -> Tensor:
    """RMSNorm(x) · weight over the last axis, in one launch (``add_rms_norm`` without the residual)."""
    return _norm("rms_norm", x, None, weight, eps, None, out, backend)[1]


def silu_mul(gate_up: Tensor, *, out: Tensor | None = None, backend: str = "auto") -> Tensor:
    """silu(gate) · up for gate_up = ``[gate | up]`` (..., 2·I) -> (..., I), in one launch.

    ``out``: a contiguous (..., I) buffer of gate_up's dtype. ``backend`` as in ``add_rms_norm``.
    """
    op = "silu_mul"
    width = gate_up.shape[-1] if gate_up.dim() else 0
    if gate_up.dtype not in FLOATS or width % 2 or width == 0:
        raise ValueError(f"{op}: gate_up must be a float (..., 2·I) tensor with I >= 1, "
                         f"got {gate_up.dtype} {tuple(gate_up.shape)}")
    half = gate_up.shape[-1] // 2
    if out is not None:
        _check_like(op, "out", out, (*gate_up.shape[:-1], half), gate_up, out=True)
    if not use_triton(op, backend, gate_up):
        ref = silu_mul_ref(gate_up)
        return ref if out is None else out.copy_(ref)
    out = out if out is not None else gate_up.new_empty(*gate_up.shape[:-1], half)
    gu = _rows(gate_up)
    block = min(next_pow2(half), SILU_BLOCK)
    with on_device(gate_up.device):
        _silu_mul_kernel[(gu.shape[0], cdiv(half, block))](
            gu, out, gu.stride(0), half, half, DT=tl_dtype(gate_up.dtype),
            EMULATE_BF16=_emulate_bf16(gate_up.dtype), BLOCK=block, num_warps=4,
        )
    return out
