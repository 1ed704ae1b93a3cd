"""The decode step's fused residual+RMSNorm and SiLU·mul kernels against their references and the model.

Run under TRITON_INTERPRET=1 on CPU (tests/conftest.py) or compiled on a GPU. Odd widths (72, 200: not
multiples of 64), T=1, batch 1 and 3, float32 and bfloat16; every output buffer is prefilled with NaN
so an unwritten element shows. The kernels round exactly where the model rounds, so on bf16 they may
differ from the same-dtype reference by one unit in the last place (a value whose float32 sum landed
on the other side of a rounding boundary), never more; on float32, by the table tolerance.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_attention import DEVICE, TOL, check_close, nan_like
from test_kernels_attention import pytestmark as needs_triton  # triton, and CUDA or the interpreter

from xqcli.kernels.decode_ops import (
    add_rms_norm,
    add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
    silu_mul,
    silu_mul_ref,
)
from xqcli.model import RMSNorm

EPS = 1e-6
SHAPES = [(1, 1, 72), (3, 1, 72), (1, 1, 200), (3, 1, 200)]  # (batch, T, width)
DTYPES = [torch.float32, torch.bfloat16]


def rand(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return (shift + scale * torch.randn(shape)).to(dtype).to(DEVICE)


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place between two bf16 tensors of finite values."""
    def key(t: torch.Tensor) -> torch.Tensor:  # bit patterns in the order of the values they encode
        i = t.cpu().contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return int((key(a) - key(b)).abs().max())


def check_model_numerics(name: str, tri: torch.Tensor, ref: torch.Tensor, ref32: torch.Tensor) -> None:
    """No NaN; float32: the table tolerance against the reference; bf16: at most one ulp from the same-dtype
    reference (the model's rounding), and the table plus the 2x rule against the float32 computation."""
    assert not bool(tri.isnan().any()), f"{name}: NaN in the output (an element left unwritten)"
    if tri.dtype == torch.float32:
        atol, rtol = TOL[tri.dtype]
        torch.testing.assert_close(tri, ref, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        return
    assert bf16_ulps(tri, ref) <= 1, f"{name}: more than one bf16 ulp from the model's numerics"
    check_close(name, tri, ref32.to(tri.dtype), ref)


def test_references_are_the_models_numerics():
    """rms_norm_ref is xqcli.model.RMSNorm bit for bit (it is the kernels' specification)."""
    for dtype in DTYPES:
        x, w = rand((3, 1, 200), dtype), rand((200,), dtype, 0.1, 1.0)
        norm = RMSNorm(200, EPS).to(device=DEVICE, dtype=dtype).requires_grad_(False)
        norm.weight.copy_(w)
        assert torch.equal(rms_norm_ref(x, w, EPS), norm(x))
        h, y = add_rms_norm_ref(x, x * 0.5, w, EPS)
        assert torch.equal(h, x + x * 0.5) and torch.equal(y, norm(x + x * 0.5))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_rms_norm(shape, dtype):
    h, delta = rand(shape, dtype, 2.0), rand(shape, dtype)
    w = rand(shape[-1:], dtype, 0.1, 1.0)
    h_out, n_out = nan_like(h), nan_like(h)
    got_h, got_n = add_rms_norm(h, delta, w, EPS, out=(h_out, n_out), backend="triton")
    assert got_h.data_ptr() == h_out.data_ptr() and got_n.data_ptr() == n_out.data_ptr()
    ref_h, ref_n = add_rms_norm_ref(h, delta, w, EPS)
    assert torch.equal(got_h, ref_h), "the residual add rounds once, as the model's: exact"
    ref32 = rms_norm_ref(ref_h.float(), w.float(), EPS)
    check_model_numerics(f"add_rms_norm {shape} {dtype}", got_n, ref_n, ref32)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm(shape, dtype):
    x, w = rand(shape, dtype, 3.0), rand(shape[-1:], dtype, 0.1, 1.0)
    x_before = x.clone()
    out = nan_like(x)
    got = rms_norm(x, w, EPS, out=out, backend="triton")
    assert got.data_ptr() == out.data_ptr() and torch.equal(x, x_before)
    ref, ref32 = rms_norm_ref(x, w, EPS), rms_norm_ref(x.float(), w.float(), EPS)
    check_model_numerics(f"rms_norm {shape} {dtype}", got, ref, ref32)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_in_place_on_strided_rows(dtype):
    """h_out may be h itself (the decode step's residual buffer); inputs may be row slices of a wider
    GEMV output (row stride > width)."""
    h = rand((3, 1, 200), dtype)
    wide = rand((3, 1, 264), dtype)
    delta = wide[..., 64:]  # row stride 264
    w = rand((200,), dtype, 0.1, 1.0)
    ref_h, ref_n = add_rms_norm_ref(h, delta, w, EPS)
    got_h, got_n = add_rms_norm(h, delta, w, EPS, out=(h, nan_like(h)), backend="triton")
    assert got_h is h and torch.equal(h, ref_h)
    check_model_numerics(f"in place {dtype}", got_n, ref_n, rms_norm_ref(ref_h.float(), w.float(), EPS))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_silu_mul(shape, dtype):
    b, t, inter = shape
    gate_up = rand((b, t, 2 * inter), dtype, 3.0)
    out = torch.full((b, t, inter), float("nan"), dtype=dtype, device=DEVICE)
    got = silu_mul(gate_up, out=out, backend="triton")
    assert got.data_ptr() == out.data_ptr()
    g, u = gate_up[..., :inter], gate_up[..., inter:]
    ref = torch.nn.functional.silu(g) * u  # xqcli.model.MLP's order, on the halves of one GEMV
    assert torch.equal(silu_mul_ref(gate_up), ref)
    ref32 = torch.nn.functional.silu(g.float()) * u.float()
    check_model_numerics(f"silu_mul {shape} {dtype}", got, ref, ref32)


@needs_triton
def test_silu_mul_spans_several_blocks():
    """An intermediate size above one program's block (1024 columns): the last block is partial."""
    gate_up = rand((3, 1, 2 * 1100), torch.float32, 3.0)
    got = silu_mul(gate_up, out=torch.full((3, 1, 1100), float("nan"), device=DEVICE), backend="triton")
    check_model_numerics("silu_mul 1100", got, silu_mul_ref(gate_up), silu_mul_ref(gate_up))


def test_bad_arguments_name_the_problem():
    x, w = torch.randn(2, 72), torch.randn(72)
    with pytest.raises(ValueError, match="weight must be torch.float32 \\(72,\\)"):
        rms_norm(x, w.to(torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="delta must be torch.float32 \\(2, 72\\)"):
        add_rms_norm(x, x[:1], w, EPS)
    with pytest.raises(ValueError, match="out must be contiguous"):
        add_rms_norm(x, x, w, EPS, out=(torch.empty(2, 72), torch.empty(72, 2).T))
    with pytest.raises(ValueError, match="gate_up must be a float \\(..., 2·I\\)"):
        silu_mul(torch.randn(2, 71))
    with pytest.raises(ValueError, match="out must be torch.float32 \\(2, 36\\)"):
        silu_mul(torch.randn(2, 72), out=torch.empty(2, 72))


def test_reference_path_writes_the_out_buffers():
    """On CPU (backend auto) the ops run their references and still fill the step's static buffers."""
    h, delta, w = torch.randn(3, 1, 72), torch.randn(3, 1, 72), torch.randn(72)
    h_out, n_out = nan_like(h), nan_like(h)
    got_h, got_n = add_rms_norm(h, delta, w, EPS, out=(h_out, n_out), backend="ref")
    ref_h, ref_n = add_rms_norm_ref(h, delta, w, EPS)
    assert got_h is h_out and got_n is n_out and torch.equal(h_out, ref_h) and torch.equal(n_out, ref_n)
    out = torch.full((3, 1, 36), float("nan"))
    assert silu_mul(delta, out=out, backend="ref") is out and torch.equal(out, silu_mul_ref(delta))
