"""The Triton quantize+pack kernel equals quantize_ref bit for bit (interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

import pytest
import torch

from xqcli.kernels import _triton
from xqcli.kernels.quant import QuantSpec, packed_width, quantize, quantize_pack_triton, quantize_ref

pytestmark = pytest.mark.skipif(
    not _triton.HAS_TRITON or not (_triton.INTERPRET or torch.cuda.is_available()),
    reason="needs triton and CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BITS = [pytest.param(b, id=f"{b}bit") for b in (2, 3, 4, 8)]
AXES = [pytest.param(a, id=a) for a in ("token", "channel")]
# (..., T, C): T=1, odd T, T past one 128 block, odd widths 1/63/577, the latent width 192, batch dims.
SHAPES = [
    pytest.param(s, id="x".join(map(str, s)))
    for s in [(1, 1), (1, 577), (5, 63), (2, 33, 192), (130, 577)]
]


def assert_same(a, b) -> None:
    """Exact equality of two QTensors (codes, scales, zeros, metadata)."""
    assert a.packed.dtype == torch.uint8 and a.scale.dtype == a.zero.dtype == torch.float16
    assert torch.equal(a.packed.cpu(), b.packed.cpu()), "packed codes differ"
    assert torch.equal(a.scale.cpu().view(torch.int16), b.scale.cpu().view(torch.int16)), "scales differ"
    assert torch.equal(a.zero.cpu().view(torch.int16), b.zero.cpu().view(torch.int16)), "zeros differ"
    assert a.shape == b.shape and a.dtype == b.dtype and a.spec == b.spec


def hard_values(shape, seed: int) -> torch.Tensor:
    """Gaussian values with magnitudes spread over 1e-7 .. 1e4 per row: subnormal fp16 steps,
    values that are no fp16 number, wide and narrow ranges."""
    gen = torch.Generator().manual_seed(seed)
    mag = 10.0 ** (torch.rand(*shape[:-1], 1, generator=gen) * 11 - 7)
    return torch.randn(shape, generator=gen) * mag + torch.randn(*shape[:-1], 1, generator=gen) * mag


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_kernel_equals_ref(shape, axis, bits):
    spec = QuantSpec(bits=bits, axis=axis)
    x = hard_values(shape, seed=sum(shape) * 10 + bits)
    assert_same(quantize_pack_triton(x.to(DEVICE), spec), quantize_ref(x, spec))


@pytest.mark.parametrize("dtype", [pytest.param(d, id=str(d)[6:]) for d in (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("axis", AXES)
def test_low_precision_inputs(dtype, axis):
    spec = QuantSpec(bits=3, axis=axis)
    x = torch.randn(3, 131, 63, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert_same(quantize_pack_triton(x.to(DEVICE), spec), quantize_ref(x, spec))


@pytest.mark.parametrize(
    "group_size,clip,bits",
    [(1, 1.0, 4), (7, 1.0, 3), (64, 0.9, 2), (128, 0.5, 8), (32, 0.97, 3)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("axis", AXES)
def test_group_sizes_and_clip(group_size, clip, bits, axis):
    """Groups that straddle packing units (g=1, 7) and the clip path (no FMA contraction allowed)."""
    spec = QuantSpec(bits=bits, group_size=group_size, axis=axis, clip=clip)
    x = hard_values((2, 45, 63), seed=group_size)
    assert_same(quantize_pack_triton(x.to(DEVICE), spec), quantize_ref(x, spec))


def test_special_values():
    """Constant groups (scale 0), fp16 saturation (+-1e6, inf), values no fp16 can hold, subnormals."""
    x = torch.tensor([
        [-1.75] * 8,
        [0.0] * 8,
        [-1e6, 0.0, 3e5, float("inf"), 1.0, 2.0, 3.0, -float("inf")],
        [0.1, 0.1000001, 0.3, 1 / 3, 2 / 3, 1e-7, -1e-7, 6e-8],
        [1e-7 * i for i in range(8)],
    ])
    for bits in (2, 3, 4, 8):
        for axis in ("token", "channel"):
            spec = QuantSpec(bits=bits, group_size=4, axis=axis)
            assert_same(quantize_pack_triton(x.to(DEVICE), spec), quantize_ref(x, spec))


@pytest.mark.parametrize("axis", AXES)
def test_out_buffers_in_a_cache(axis):
    """out= writes a row range of preallocated cache buffers (filled with garbage) and nothing else."""
    spec = QuantSpec(bits=4, group_size=16, axis=axis)
    c, max_len, start, n = 40, 64, 16, 32
    codes = torch.full((2, max_len, packed_width(c, 4)), 0xAB, dtype=torch.uint8, device=DEVICE)
    rows = max_len if axis == "token" else max_len // 16
    scale = torch.full((2, rows, c if axis == "channel" else 3), float("nan"), dtype=torch.float16, device=DEVICE)
    zero = scale.clone()
    x = torch.randn(n, c)
    s0 = slice(start, start + n) if axis == "token" else slice(start // 16, (start + n) // 16)
    q = quantize_pack_triton(x.to(DEVICE), spec, out=(codes[1, start:start + n], scale[1, s0], zero[1, s0]))
    assert q.packed.data_ptr() == codes[1, start].data_ptr()
    assert_same(q, quantize_ref(x, spec))
    untouched = torch.ones(2, max_len, dtype=torch.bool)
    untouched[1, start:start + n] = False
    assert bool((codes.cpu()[untouched] == 0xAB).all())
    assert int(scale.isnan().sum()) == scale.numel() - q.scale.numel()


def test_quantize_dispatch():
    spec = QuantSpec(bits=2)
    x = torch.randn(3, 70)
    ref = quantize_ref(x, spec)
    assert_same(quantize(x.to(DEVICE), spec, backend="triton"), ref)
    assert_same(quantize(x, spec, backend="ref"), ref)
    assert_same(quantize(x.to(DEVICE), spec), ref)  # auto: the kernel on CUDA, the reference on CPU
    with pytest.raises(ValueError, match="backend"):
        quantize(x, spec, backend="cuda")


def test_validation():
    spec = QuantSpec(bits=4)
    x = torch.randn(5, 63, device=DEVICE)
    with pytest.raises(ValueError, match="T, C >= 1"):
        quantize_pack_triton(x[:0], spec)
    with pytest.raises(ValueError, match="float"):
        quantize_pack_triton(x.to(torch.int32), spec)
    good = quantize_pack_triton(x, spec)
    with pytest.raises(ValueError, match="out packed"):
        quantize_pack_triton(x, spec, out=(good.packed[:, :-1], good.scale, good.zero))
    with pytest.raises(ValueError, match="out scale"):
        quantize_pack_triton(x, spec, out=(good.packed, good.scale.float(), good.zero))
    with pytest.raises(ValueError, match="contiguous"):
        wide = torch.empty(5, 2 * good.packed.shape[1], dtype=torch.uint8, device=DEVICE)
        quantize_pack_triton(x, spec, out=(wide[:, ::2], good.scale, good.zero))
