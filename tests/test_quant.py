"""Exact tests of the reference quantizer and packer (xqcli.kernels.quant)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from xqcli.kernels.quant import (
    QBytes,
    QuantSpec,
    bytes_per_row,
    dequantize,
    fake_quantize,
    nominal_bits_per_element,
    pack,
    packed_width,
    qtensor_nbytes,
    quantize,
    unpack,
)

BITS = [pytest.param(b, id=f"{b}bit") for b in (2, 3, 4, 8)]
AXES = [pytest.param(a, id=a) for a in ("token", "channel")]
DTYPES = [
    pytest.param(d, id=str(d).removeprefix("torch."))
    for d in (torch.float32, torch.bfloat16, torch.float16)
]
# (..., T, C): T=1 (decode step), odd T and C, C and T around the group size, batch dims.
SHAPES = [
    pytest.param(s, id="x".join(map(str, s)))
    for s in [(1, 1), (1, 577), (5, 63), (128, 192), (130, 576), (2, 130, 577), (2, 3, 5, 1), (2, 1, 63)]
]


def _codes(q) -> torch.Tensor:
    return unpack(q.packed, q.spec.bits, q.shape[-1])


def _per_element(grouped: torch.Tensor, spec: QuantSpec, shape: torch.Size) -> torch.Tensor:
    """Broadcast a per-group tensor (shaped like q.scale) back to the (..., T, C) elements."""
    g = spec.group_size
    if spec.axis == "token":
        return grouped.repeat_interleave(g, dim=-1)[..., : shape[-1]]
    return grouped.repeat_interleave(g, dim=-2)[..., : shape[-2], :]


def _group_any(mask: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-group any() of an elementwise (..., T, C) mask, shaped like q.scale."""
    g = spec.group_size
    m = mask if spec.axis == "token" else mask.mT
    n = m.shape[-1]
    groups = -(-n // g)
    m = torch.nn.functional.pad(m, (0, groups * g - n)).unflatten(-1, (groups, g)).any(-1)
    return m if spec.axis == "token" else m.mT


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 5, 7, 63, 192, 577])
def test_pack_round_trip(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(n * 10 + bits)
    codes = torch.randint(0, 1 << bits, (2, 3, n), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 3, packed_width(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize(
    "bits,codes,expected",
    [
        pytest.param(8, [7, 255, 0], [7, 255, 0], id="8bit-identity"),
        pytest.param(4, [1, 2, 15], [0x21, 0x0F], id="4bit-low-nibble-first"),
        pytest.param(2, [0, 1, 2, 3, 0, 3], [0b11100100, 0b00001100], id="2bit-lsb-first"),
        # word = sum(c_j << 3j) = 0x1F58D1 for codes 1..7,0; bytes little-endian, then 3 zero-padded bytes.
        pytest.param(3, [1, 2, 3, 4, 5, 6, 7, 0, 7], [0xD1, 0x58, 0x1F, 7, 0, 0], id="3bit-24bit-words"),
    ],
)
def test_pack_layout(bits: int, codes: list[int], expected: list[int]) -> None:
    packed = pack(torch.tensor([codes], dtype=torch.uint8), bits)
    assert packed.tolist() == [expected]


@pytest.mark.parametrize("bits", BITS)
def test_packed_width(bits: int) -> None:
    per_unit, unit_bytes = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}[bits]
    for n in (1, 5, 7, 63, 128, 577):
        assert packed_width(n, bits) == math.ceil(n / per_unit) * unit_bytes


def test_pack_validation() -> None:
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="uint8"):
        pack(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="packed_width"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 7)


# ----------------------------------------------------------------------------- spec validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        pytest.param({"bits": 5}, "bits", id="bits-5"),
        pytest.param({"bits": 4.0}, "bits", id="bits-float"),
        pytest.param({"bits": 4, "group_size": 0}, "group_size", id="group-0"),
        pytest.param({"bits": 4, "axis": "head"}, "axis", id="axis"),
        pytest.param({"bits": 4, "clip": 0.0}, "clip", id="clip-0"),
        pytest.param({"bits": 4, "clip": 1.5}, "clip", id="clip-1.5"),
        pytest.param({"bits": 4, "clip": -0.5}, "clip", id="clip-negative"),
        pytest.param({"bits": 4, "clip": float("nan")}, "clip", id="clip-nan"),
    ],
)
def test_spec_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_quantize_validation() -> None:
    spec = QuantSpec(4)
    with pytest.raises(ValueError, match=r"\(\.\.\., T, C\)"):
        quantize(torch.zeros(8), spec)
    with pytest.raises(ValueError, match="T, C >= 1"):
        quantize(torch.zeros(0, 8), spec)
    with pytest.raises(ValueError, match="float"):
        quantize(torch.zeros(2, 8, dtype=torch.int32), spec)


# ----------------------------------------------------------------------------- hand-computed examples


def test_hand_example_token() -> None:
    # g=4, 2-bit: group [0, .5, 1.5, 3] -> zero 0, scale 1, halves round up;
    # group [-1, 2] -> zero -1, scale 1.
    x = torch.tensor([[0.0, 0.5, 1.5, 3.0, -1.0, 2.0]])
    q = quantize(x, QuantSpec(bits=2, group_size=4))
    assert q.scale.dtype == q.zero.dtype == torch.float16
    assert q.scale.tolist() == [[1.0, 1.0]]
    assert q.zero.tolist() == [[0.0, -1.0]]
    assert _codes(q).tolist() == [[0, 1, 2, 3, 0, 3]]
    assert q.packed.tolist() == [[0b11100100, 0b00001100]]
    assert dequantize(q).tolist() == [[0.0, 1.0, 2.0, 3.0, -1.0, 2.0]]


def test_hand_example_directed_rounding() -> None:
    # fp32 0.1 is no fp16 value: zero is the fp16 just below it, 0x2E66 = 0.0999755859375. The gap
    # 0.1 - zero = 409.625 * 2**-24, / 3 = 136.54 subnormal steps, rounds to 137 * 2**-24; the grid top
    # zero + 411 * 2**-24 covers 0.1, so no bump. code = floor(409.625 / 137 + 0.5) = 3.
    q = quantize(torch.tensor([[0.1]]), QuantSpec(bits=2))
    assert q.zero.view(torch.int16).item() == 0x2E66
    assert q.scale.item() == 137 * 2**-24
    assert _codes(q).tolist() == [[3]]
    assert abs(dequantize(q).item() - 0.1) <= q.scale.item() / 2


def test_hand_example_clip_and_scale_bump() -> None:
    # [0, 4] with clip 0.5 -> range [1, 3]; (3 - 1) / 3 rounds to fp16 1365/2048 < 2/3, whose grid top
    # 1 + 3 * 1365/2048 < 3, so the scale is bumped to 1366/2048. 0 and 4 saturate to codes 0 and 3.
    q = quantize(torch.tensor([[0.0, 4.0]]), QuantSpec(bits=2, group_size=2, clip=0.5))
    assert q.zero.tolist() == [[1.0]]
    assert q.scale.item() == 1366 / 2048
    assert _codes(q).tolist() == [[0, 3]]


def test_hand_example_channel() -> None:
    # Channel axis, 2 tokens x 2 channels, one block: channel 0 over [0, 3], channel 1 over [2, 2].
    x = torch.tensor([[0.0, 2.0], [3.0, 2.0]])
    q = quantize(x, QuantSpec(bits=2, axis="channel"))
    assert q.scale.tolist() == [[1.0, 0.0]]
    assert q.zero.tolist() == [[0.0, 2.0]]
    assert _codes(q).tolist() == [[0, 0], [3, 0]]
    assert torch.equal(dequantize(q), x)


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_requantize_is_idempotent(shape: tuple, axis: str, bits: int, dtype: torch.dtype) -> None:
    """dequantize -> quantize gives back the codes, scale and zero of groups whose codes reach 0 and n."""
    spec = QuantSpec(bits=bits, axis=axis)
    gen = torch.Generator().manual_seed(sum(shape) + bits)
    x = torch.randn(shape, generator=gen).to(dtype)
    q = quantize(x, spec)
    q2 = quantize(dequantize(q, torch.float32), spec)
    codes = _codes(q)
    spanning = (_group_any(codes == 0, spec) & _group_any(codes == spec.levels, spec)) | (q.scale == 0)
    if dtype != torch.float32 or min(shape[-2:]) > 1:  # single fp32 values never span (see module docs)
        assert spanning.float().mean() >= 0.9
    assert torch.equal(q2.scale[spanning], q.scale[spanning])
    assert torch.equal(q2.zero[spanning], q.zero[spanning])
    elem = _per_element(spanning, spec, x.shape)
    assert torch.equal(_codes(q2)[elem], codes[elem])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_error_within_half_scale(shape: tuple, axis: str, bits: int) -> None:
    spec = QuantSpec(bits=bits, axis=axis)
    gen = torch.Generator().manual_seed(sum(shape) * 7 + bits)
    x = torch.randn(shape, generator=gen) * 3
    q = quantize(x, spec)
    x_hat = dequantize(q, torch.float32)
    s = _per_element(q.scale.float(), spec, x.shape)
    # s / 2 plus float32 rounding of the division and of code * s + zero.
    tol = 0.5 * s * (1 + 2**-14) + 2**-23 * x.abs()
    assert bool(((x_hat - x).abs() <= tol).all())
    assert bool((_codes(q) <= spec.levels).all())


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(axis: str, bits: int, dtype: torch.dtype) -> None:
    """The quantizer works in float32: low-precision inputs give the codes of their float32 values."""
    spec = QuantSpec(bits=bits, axis=axis)
    x = torch.randn(2, 130, 63, generator=torch.Generator().manual_seed(bits)).to(dtype)
    q = quantize(x, spec)
    ref = quantize(x.float(), spec)
    assert torch.equal(q.packed, ref.packed)
    assert torch.equal(q.scale, ref.scale) and torch.equal(q.zero, ref.zero)
    assert q.dtype == dtype and dequantize(q).dtype == dtype
    assert torch.equal(dequantize(q), dequantize(ref, torch.float32).to(dtype))
    fq = fake_quantize(x, spec)
    assert fq.dtype == dtype and fq.shape == x.shape


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups_exact(axis: str, dtype: torch.dtype) -> None:
    # fp16-representable constants: scale 0, codes 0, exact decode, no division by zero.
    x = torch.full((2, 5, 130), -1.75, dtype=dtype)
    x[1] = 0.0
    for bits in (2, 3, 4, 8):
        q = quantize(x, QuantSpec(bits=bits, axis=axis))
        assert bool((q.scale == 0).all())
        assert bool((_codes(q) == 0).all())
        assert torch.equal(dequantize(q), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp16_range_saturates(dtype: torch.dtype) -> None:
    x = torch.tensor([[-1e6, 0.0, 3e5, float("inf")]], dtype=dtype)
    q = quantize(x, QuantSpec(bits=8))
    assert bool(torch.isfinite(q.scale).all()) and bool(torch.isfinite(q.zero).all())
    assert q.zero.item() == -65504.0
    x_hat = dequantize(q, torch.float32)
    assert bool(torch.isfinite(x_hat).all())
    assert x_hat[0, 0].item() == -65504.0 and x_hat[0, -1].item() >= 65504.0


def test_channel_blocks_split_at_group_size() -> None:
    """T > g on the channel axis equals quantizing consecutive g-token blocks separately."""
    spec = QuantSpec(bits=3, group_size=32, axis="channel")
    x = torch.randn(2, 70, 63, generator=torch.Generator().manual_seed(1))
    q = quantize(x, spec)
    assert q.scale.shape == (2, 3, 63)
    parts = [quantize(x[:, i : i + 32], spec) for i in range(0, 70, 32)]
    assert torch.equal(q.scale, torch.cat([p.scale for p in parts], dim=1))
    assert torch.equal(q.zero, torch.cat([p.zero for p in parts], dim=1))
    assert torch.equal(_codes(q), torch.cat([_codes(p) for p in parts], dim=1))


def test_token_groups_are_independent() -> None:
    """The short last group of a row equals quantizing that slice alone; shapes follow the axis."""
    spec = QuantSpec(bits=4, group_size=128)
    x = torch.randn(3, 5, 577, generator=torch.Generator().manual_seed(2))
    q = quantize(x, spec)
    assert q.scale.shape == q.zero.shape == (3, 5, 5)
    tail = quantize(x[..., 512:], spec)
    assert torch.equal(q.scale[..., -1:], tail.scale)
    assert torch.equal(_codes(q)[..., 512:], _codes(tail))


@pytest.mark.parametrize("group_size", [pytest.param(g, id=f"g{g}") for g in (1, 7, 64, 128)])
@pytest.mark.parametrize("axis", AXES)
def test_group_sizes(group_size: int, axis: str) -> None:
    spec = QuantSpec(bits=4, group_size=group_size, axis=axis)
    x = torch.randn(2, 130, 63, generator=torch.Generator().manual_seed(group_size))
    q = quantize(x, spec)
    groups = (130, -(-63 // group_size)) if axis == "token" else (-(-130 // group_size), 63)
    assert q.scale.shape == (2, *groups)
    s = _per_element(q.scale.float(), spec, x.shape)
    assert bool(((dequantize(q) - x).abs() <= 0.5 * s * (1 + 2**-14) + 2**-23 * x.abs()).all())


def test_noncontiguous_input() -> None:
    x = torch.randn(63, 130, generator=torch.Generator().manual_seed(3))
    for axis in ("token", "channel"):
        spec = QuantSpec(bits=3, axis=axis)
        a, b = quantize(x.mT, spec), quantize(x.mT.contiguous(), spec)
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale)
        assert dequantize(a).is_contiguous()


# ----------------------------------------------------------------------------- memory accounting


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_nbytes_matches_tensors_and_formula(shape: tuple, axis: str, bits: int) -> None:
    spec = QuantSpec(bits=bits, axis=axis)
    q = quantize(torch.randn(shape), spec)
    real = QBytes(
        payload=q.packed.numel() * q.packed.element_size(),
        scale_zero=q.scale.numel() * 2 + q.zero.numel() * 2,
    )
    assert q.nbytes == real == qtensor_nbytes(shape, spec)
    *batch, t, c = shape
    groups = t * math.ceil(c / 128) if axis == "token" else math.ceil(t / 128) * c
    assert real.payload == math.prod(batch) * t * packed_width(c, bits)
    assert real.scale_zero == math.prod(batch) * groups * 4


def test_paper_accounting() -> None:
    """Spec section 6: per-token bytes for 32 layers, one fp16 scale + one fp16 zero per 128 values."""
    mha = {b: 32 * bytes_per_row(4096, QuantSpec(bits=b)) for b in (4, 2)}
    assert mha == {4: 69_632, 2: 36_864}  # Llama-2-7B XQuant (one X of d = 4096 per layer)
    for bits, expected in ((4, 34_816), (3, 26_624), (2, 18_432)):  # Llama-3.1-8B GQA latents, d/g = 1024
        k = bytes_per_row(1024, QuantSpec(bits=bits, axis="channel"))
        v = bytes_per_row(1024, QuantSpec(bits=bits, axis="token"))
        assert 32 * (k + v) == expected
    assert nominal_bits_per_element(QuantSpec(bits=4)) == 4.25
    # Exact accounting counts padding: 577 channels at 3 bits = 73 units of 3 bytes, 5 groups.
    assert bytes_per_row(577, QuantSpec(bits=3)) == 219 + 20
    # Channel axis: a full 128-row block shares 63 scale/zero pairs, so a row costs 32 + 252/128 bytes.
    assert bytes_per_row(63, QuantSpec(bits=4, axis="channel")) == Fraction(128 * 32 + 4 * 63, 128)
