"""Fused decode attention (XQuant, KIVI*) and the XQuant-CL accumulator update against their references.

Run under TRITON_INTERPRET=1 on CPU (tests/conftest.py) or compiled on a GPU. Streams are built the
way ``xqcli.cache.stream.Stream`` stores them, and every byte the kernels must not read is poisoned: codes
past a row's sealed tokens are random, scales/zeros and tail slots past it are NaN, outputs and the
launchers' scratch buffers are prefilled with NaN. Shapes stay small because the interpreter costs
~0.1-0.3 s per launch.

Static launches (``capacity``): rows of very different lengths under a larger allocated context, and
the recorded launches (grid, scalar arguments, tensor shapes) of two steps with other lengths must be
equal: what a CUDA graph replays.

Tolerances (float outputs): a fixed (atol, rtol) per output dtype, plus for low precision the
flash-attention rule: error to the float32 reference <= 2 x the error of the same reference computed
in that dtype + atol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch

from xqcli.kernels import _common, _triton
from xqcli.kernels._common import plan_splits
from xqcli.kernels.kivi_attention import kivi_attention, kivi_attention_ref
from xqcli.kernels.packed import PackedStream
from xqcli.kernels.quant import QuantSpec, packed_width, quantize_ref
from xqcli.kernels.xquant_attention import xquant_attention, xquant_attention_ref
from xqcli.kernels.xquant_cl import (
    xquant_cl_attention,
    xquant_cl_attention_ref,
    xquant_cl_project,
    xquant_cl_project_ref,
    xquant_cl_update,
    xquant_cl_update_ref,
)

pytestmark = pytest.mark.skipif(
    not _triton.HAS_TRITON or not (_triton.INTERPRET or torch.cuda.is_available()),
    reason="needs triton and CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# output dtype -> (atol, rtol). bf16 also covers the GPU's bf16 rebuild and tf32 products, and the
# interpreter, which truncates (not rounds) float32 -> bf16 on stores.
TOL = {torch.float32: (2e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}


# ----------------------------------------------------------------------------- helpers


def rope_tables(n: int, d: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """HF rotate-half tables (n, d), float32, as xqcli.rope builds them."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    emb = torch.outer(torch.arange(n).float(), inv)
    emb = torch.cat([emb, emb], dim=-1)
    return emb.cos(), emb.sin()


def make_stream(x: torch.Tensor, lens: list[int], sealed: list[int], spec: QuantSpec | None,
                tail_cap: int, *, seed: int = 0) -> PackedStream:
    """Row b: x[b, :sealed[b]] quantized with quantize_ref into (B, S, ...) buffers, then the tail."""
    bsz, s, c = x.shape
    tails = torch.full((bsz, tail_cap, c), float("nan"), dtype=x.dtype)
    for b in range(bsz):
        tails[b, : lens[b] - sealed[b]] = x[b, sealed[b]: lens[b]]
    sealed_t = torch.tensor(sealed, dtype=torch.int32)
    if spec is None:
        return PackedStream(tail=tails.to(DEVICE), sealed=sealed_t.to(DEVICE))
    g = spec.group_size
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (bsz, s, packed_width(c, spec.bits)), generator=gen, dtype=torch.uint8)
    sz = (bsz, s, math.ceil(c / g)) if spec.axis == "token" else (bsz, math.ceil(s / g), c)
    scale = torch.full(sz, float("nan"), dtype=torch.float16)
    zero = torch.full(sz, float("nan"), dtype=torch.float16)
    for b in range(bsz):
        if sealed[b]:
            q = quantize_ref(x[b, : sealed[b]], spec)
            codes[b, : sealed[b]] = q.packed
            scale[b, : q.scale.shape[0]] = q.scale
            zero[b, : q.zero.shape[0]] = q.zero
    return PackedStream(tail=tails.to(DEVICE), sealed=sealed_t.to(DEVICE), codes=codes.to(DEVICE),
                        scale=scale.to(DEVICE), zero=zero.to(DEVICE), spec=spec)


def kivi_sealed(lens: list[int], window: int, g: int, axis: str) -> list[int]:
    """Sealed counts the way xqcli.cache.stream.Stream seals: per token past the window, per-channel in whole blocks."""
    if axis == "token":
        return [max(0, n - window) for n in lens]
    return [max(0, n - window) // g * g for n in lens]


def tail_cap(window: int, g: int, axis: str) -> int:
    return max(1, window if axis == "token" else window + g - 1)


def nan_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


def poison_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every float ``torch.empty`` NaN for the rest of the test: scratch a kernel reads before it
    writes (a split past a row's end, say) then shows up as NaN in the output."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def _describe(arg: object) -> object:
    if isinstance(arg, torch.Tensor):
        return ("tensor", arg.dtype, tuple(arg.shape), arg.stride())
    return arg


def record_launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Record every Triton launch from now on (kernel, grid, scalar arguments, tensor dtypes, shapes and
    strides; not addresses), still running it. The list fills as launches happen."""
    calls: list[tuple] = []
    cls = type(_common.merge_splits_kernel)  # JITFunction, or the interpreter's InterpretedFunction
    run = cls.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        calls.append((self.fn.__name__, tuple(grid), tuple(map(_describe, args)),
                      tuple(sorted((k, _describe(v)) for k, v in kwargs.items()))))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(cls, "run", recording_run)
    return calls


def check_close(name: str, tri: torch.Tensor, ref32: torch.Tensor, ref_lp: torch.Tensor | None = None) -> None:
    """Table tolerance, no NaN, and for low precision the 2x rule against the same-dtype reference."""
    assert tri.dtype == ref32.dtype and tri.shape == ref32.shape
    assert not bool(tri.isnan().any()), f"{name}: NaN in the output (unwritten or poisoned bytes read)"
    atol, rtol = TOL[tri.dtype]
    tri32, r32 = tri.float().cpu(), ref32.float().cpu()
    err = (tri32 - r32).abs().max().item()
    torch.testing.assert_close(tri32, r32, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    if ref_lp is not None:
        base = (ref_lp.float().cpu() - r32).abs().max().item()
        assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x {base:.3g} (torch in {tri.dtype}) + {atol}"


# ----------------------------------------------------------------------------- XQuant attention


@dataclass(frozen=True)
class XqCase:
    """One fused XQuant attention configuration."""

    name: str
    lens: tuple[int, ...]  # tokens per row (cached length T)
    heads: int
    kv_heads: int
    head_dim: int
    width: int  # latent width C (MHA: d = hidden size)
    k_spec: QuantSpec | None
    v_spec: QuantSpec | None
    window: int = 0
    mha: bool = False  # X cached once, K/V via W_k^T, W_v^T (strided views)
    bias: bool = False
    ch0: bool = False
    dtype: torch.dtype = torch.float32
    split: int | None = 32
    capacity: int | None = None  # a static launch for this many allocated tokens (else max_seq_len)

    def __str__(self) -> str:
        return self.name


STATIC_LENS = (1, 37, 300)  # one step's rows under a 512-token capacity
OTHER_LENS = (300, 2, 150)  # another step's, for the launch comparison

XQ_CASES = [
    XqCase("gqa-d64-c192-k4ch-v3tok-g32-b3", (1, 45, 97), 4, 2, 64, 192,
           QuantSpec(4, 32, "channel"), QuantSpec(3, 32, "token"), window=5),
    XqCase("gqa-d128-c192-k2ch-v8tok-g128-b3", (1, 130, 259), 4, 1, 128, 192,
           QuantSpec(2, 128, "channel"), QuantSpec(8, 128, "token"), window=2, split=64),
    XqCase("gqa-d64-c1024-k3g4-v4g256-smallT", (1, 7), 2, 1, 64, 1024,
           QuantSpec(3, 4, "channel"), QuantSpec(4, 256, "token")),
    XqCase("mha-d64-c192-x4tok-g128-b3", (1, 33, 70), 3, 3, 64, 192,
           QuantSpec(4, 128, "token"), None, window=9, mha=True),
    XqCase("mha-d64-c192-x2tok-bias-bf16", (3, 50), 3, 3, 64, 192,
           QuantSpec(2, 64, "token"), None, window=4, mha=True, bias=True, dtype=torch.bfloat16),
    XqCase("gqa-d128-c192-bias-ch0-bf16", (1, 70, 36), 2, 1, 128, 192,
           QuantSpec(3, 16, "channel"), QuantSpec(2, 16, "token"), window=3, bias=True, ch0=True,
           dtype=torch.bfloat16),
    XqCase("gqa-d64-c192-T1-sealed", (1,), 4, 2, 64, 192,
           QuantSpec(8, 1, "channel"), QuantSpec(2, 32, "token"), split=None),
    XqCase("gqa-d64-c192-dense", (1, 20, 41), 4, 2, 64, 192, None, None, split=None),
    XqCase("static-gqa-d64-c136-k4ch-v3tok", STATIC_LENS, 4, 2, 64, 136,
           QuantSpec(4, 32, "channel"), QuantSpec(3, 32, "token"), window=5, split=None, capacity=512),
    XqCase("static-mha-d128-c200-x4tok-split32-bf16", STATIC_LENS, 2, 2, 128, 200,
           QuantSpec(4, 64, "token"), None, window=3, mha=True, dtype=torch.bfloat16, capacity=512),
]


def build_xq(case: XqCase, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    bsz, s = len(case.lens), case.capacity or max(case.lens)
    hd, n_kv, c = case.head_dim, case.kv_heads, case.width
    lens = list(case.lens)
    k_width = c - 1 if case.ch0 else c
    x_k = torch.randn(bsz, s, c, generator=gen)
    x_v = x_k if case.mha else torch.randn(bsz, s, c, generator=gen)

    def stream(x, spec, seed):
        if spec is None:  # dense: every token full precision
            return make_stream(x.to(case.dtype), lens, [0] * bsz, None, s)
        sealed = kivi_sealed(lens, case.window, spec.group_size, spec.axis)
        return make_stream(x.to(case.dtype), lens, sealed, spec, tail_cap(case.window, spec.group_size, spec.axis),
                           seed=seed)

    k = stream(x_k[..., c - k_width:], case.k_spec, 1)
    v = k if case.mha else stream(x_v, case.v_spec, 2)
    if case.mha:  # the cache holds nn.Linear weights; the kernel reads their transposes as strided views
        w_k = (torch.randn(n_kv * hd, c, generator=gen) / math.sqrt(c)).to(case.dtype).to(DEVICE)
        w_v = (torch.randn(n_kv * hd, c, generator=gen) / math.sqrt(c)).to(case.dtype).to(DEVICE)
        m_k, m_v = w_k.T, w_v.T
    else:
        m_k = (torch.randn(c, n_kv * hd, generator=gen) / math.sqrt(c)).to(case.dtype).to(DEVICE)
        m_v = (torch.randn(c, n_kv * hd, generator=gen) / math.sqrt(c)).to(case.dtype).to(DEVICE)
    kw = {}
    if case.bias:
        kw["b_k"] = torch.randn(n_kv * hd, generator=gen).to(case.dtype).to(DEVICE)
        kw["b_v"] = torch.randn(n_kv * hd, generator=gen).to(case.dtype).to(DEVICE)
    if case.ch0:  # the appendix-B outlier channel, large, full precision
        kw["k_ch0"] = (x_k[..., 0] * 20).to(torch.float16).to(DEVICE)
    cos, sin = rope_tables(s + 3, hd)
    q = torch.randn(bsz, case.heads, hd, generator=gen).to(case.dtype).to(DEVICE)
    seq = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    return q, k, v, m_k, m_v, cos.to(DEVICE), sin.to(DEVICE), seq, kw


def bound(case: XqCase | KiviCase) -> dict:
    """The launch bound of a case: its static capacity, else the longest row."""
    return {"capacity": case.capacity} if case.capacity else {"max_seq_len": max(case.lens)}


@pytest.mark.parametrize("case", XQ_CASES, ids=str)
def test_xquant_attention(case: XqCase, monkeypatch: pytest.MonkeyPatch):
    q, k, v, m_k, m_v, cos, sin, seq, kw = build_xq(case)
    poison_scratch(monkeypatch)
    ref = xquant_attention_ref(q, k, v, m_k, m_v, cos, sin, seq, **kw)
    ref_lp = None
    if case.dtype != torch.float32:
        ref_lp = xquant_attention_ref(q, k, v, m_k, m_v, cos, sin, seq, compute_dtype=case.dtype, **kw)
    out = nan_like(q)
    tri = xquant_attention(q, k, v, m_k, m_v, cos, sin, seq, out=out, split_tokens=case.split,
                           backend="triton", **bound(case), **kw)
    assert tri.data_ptr() == out.data_ptr()
    check_close(case.name, tri, ref, ref_lp)


def test_xquant_reference_is_plain_attention():
    """The reference itself: rebuilt K/V + RoPE + softmax equals SDPA over explicitly built K/V."""
    case = XQ_CASES[0]
    q, k, v, m_k, m_v, cos, sin, seq, _kw = build_xq(case)
    out = xquant_attention_ref(q, k, v, m_k, m_v, cos, sin, seq)
    b, n = 2, case.lens[2]
    kk = (k.values_ref(b, n) @ m_k.float()).view(n, case.kv_heads, -1).transpose(0, 1)
    vv = (v.values_ref(b, n) @ m_v.float()).view(n, case.kv_heads, -1).transpose(0, 1)
    half = kk.shape[-1] // 2
    kk = kk * cos[:n] + torch.cat([-kk[..., half:], kk[..., :half]], -1) * sin[:n]
    rep = case.heads // case.kv_heads
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q[b:b + 1, :, None].float(), kk.repeat_interleave(rep, 0)[None], vv.repeat_interleave(rep, 0)[None])
    torch.testing.assert_close(out[b], sdpa[0, :, 0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- KIVI*


@dataclass(frozen=True)
class KiviCase:
    name: str
    lens: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    k_bits: int
    v_bits: int
    group: int
    window: int
    dtype: torch.dtype = torch.float32
    split: int | None = 32
    capacity: int | None = None

    def __str__(self) -> str:
        return self.name


KIVI_CASES = [
    KiviCase("gqa-d64-k2-v8-g32-b3", (1, 45, 97), 4, 2, 64, 2, 8, 32, 5),
    KiviCase("gqa-d128-k4-v3-g128-b3", (1, 129, 200), 4, 1, 128, 4, 3, 128, 0, split=64),
    KiviCase("mha-d64-k3-v2-g16", (17, 1, 40), 2, 2, 64, 3, 2, 16, 3),
    KiviCase("gqa-d128-k4-v4-g64-bf16", (70, 9), 2, 1, 128, 4, 4, 64, 2, dtype=torch.bfloat16, split=None),
    KiviCase("gqa-d64-k8-v4-g32-fp16", (33, 64, 2), 4, 2, 64, 8, 4, 32, 1, dtype=torch.float16),
    KiviCase("static-gqa-d128-k4-v2-g32", STATIC_LENS, 4, 2, 128, 4, 2, 32, 5, split=None, capacity=512),
    KiviCase("static-mha-d64-k2-v4-g64-split32", STATIC_LENS, 3, 3, 64, 2, 4, 64, 3, capacity=512),
]


def build_kivi(case: KiviCase):
    gen = torch.Generator().manual_seed(3)
    bsz, s, hd = len(case.lens), case.capacity or max(case.lens), case.head_dim
    lens, c = list(case.lens), case.kv_heads * case.head_dim
    ks, vs = QuantSpec(case.k_bits, case.group, "channel"), QuantSpec(case.v_bits, case.group, "token")
    x_k = (torch.randn(bsz, s, c, generator=gen) * 2).to(case.dtype)
    x_v = torch.randn(bsz, s, c, generator=gen).to(case.dtype)
    k = make_stream(x_k, lens, kivi_sealed(lens, case.window, case.group, "channel"), ks,
                    tail_cap(case.window, case.group, "channel"), seed=1)
    v = make_stream(x_v, lens, kivi_sealed(lens, case.window, case.group, "token"), vs,
                    tail_cap(case.window, case.group, "token"), seed=2)
    cos, sin = (t.to(DEVICE) for t in rope_tables(s, hd))
    q = torch.randn(bsz, case.heads, hd, generator=gen).to(case.dtype).to(DEVICE)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, k, v, cos, sin, seq


@pytest.mark.parametrize("case", KIVI_CASES, ids=str)
def test_kivi_attention(case: KiviCase, monkeypatch: pytest.MonkeyPatch):
    q, k, v, cos, sin, seq = build_kivi(case)
    poison_scratch(monkeypatch)
    ref = kivi_attention_ref(q, k, v, cos, sin, seq)
    ref_lp = None
    if case.dtype != torch.float32:
        ref_lp = kivi_attention_ref(q, k, v, cos, sin, seq, compute_dtype=case.dtype)
    kw = bound(case) if case.capacity else {}  # eager cases read the longest row from the device
    tri = kivi_attention(q, k, v, cos, sin, seq, out=nan_like(q), split_tokens=case.split, backend="triton",
                         **kw)
    check_close(case.name, tri, ref, ref_lp)


# ----------------------------------------------------------------------------- XQuant-CL


def build_cl_update(gqa: bool, bits: int, group: int, dtype: torch.dtype, lens: tuple[int, ...], d: int,
                    s: int):
    """An accumulator (B, s + 2, d) and a delta stream for rows of ``lens`` tokens."""
    gen = torch.Generator().manual_seed(bits)
    window = 6
    c = 128 if gqa else d  # GQA: 2·d_kv-wide deltas on U_kv (d x 2·d_kv)
    u = torch.linalg.qr(torch.randn(d, c, generator=gen))[0].to(dtype).to(DEVICE) if gqa else None
    deltas = (torch.randn(len(lens), s, c, generator=gen) * 0.1).to(dtype)
    sealed = kivi_sealed(list(lens), window, 1, "token")
    delta = make_stream(deltas, list(lens), sealed, QuantSpec(bits, group, "token"), window, seed=4)
    acc0 = torch.randn(len(lens), s + 2, d, generator=gen).to(dtype).to(DEVICE)
    acc0[0, 30] = float("nan")  # past row 0's length: must stay untouched (and unread)
    return acc0, delta, u, torch.tensor(lens, device=DEVICE)


def cl_tail_sub(delta: PackedStream, lens: tuple[int, ...]) -> torch.Tensor:
    """A ``tail_sub`` for ``delta``: a strided view (as the decode step's projection slice), NaN past each
    row's tail tokens (must stay unread)."""
    gen = torch.Generator().manual_seed(11)
    bsz, tl_rows, c = delta.tail.shape
    full = (torch.randn(bsz, tl_rows + 1, c, generator=gen) * 0.1).to(delta.tail.dtype)
    for b, n in enumerate(lens):
        full[b, 1 + n - int(delta.sealed[b]):] = float("nan")
    return full.to(DEVICE)[:, 1:]


@pytest.mark.parametrize(
    "gqa,bits,group,seed,dtype,static,sub",
    [
        pytest.param(False, 3, 32, False, torch.float32, False, False, id="mha-3bit-g32-fp32"),
        pytest.param(False, 8, 256, True, torch.bfloat16, False, False, id="mha-8bit-g256-seed-bf16"),
        pytest.param(True, 4, 128, False, torch.float32, False, False, id="gqa-4bit-g128-fp32"),
        pytest.param(True, 2, 32, True, torch.float32, False, False, id="gqa-2bit-g32-seed-fp32"),
        pytest.param(True, 2, 64, False, torch.bfloat16, False, False, id="gqa-2bit-g64-bf16"),
        pytest.param(False, 4, 64, False, torch.float32, True, False, id="static-mha-d200-4bit-g64-fp32"),
        pytest.param(True, 3, 32, True, torch.bfloat16, True, False, id="static-gqa-d200-3bit-g32-seed-bf16"),
        pytest.param(True, 3, 32, False, torch.float32, False, True, id="gqa-3bit-g32-fp32-tail-sub"),
        pytest.param(False, 4, 64, False, torch.bfloat16, True, True, id="static-mha-d200-4bit-g64-bf16-tail-sub"),
    ],
)
def test_xquant_cl_update(gqa, bits, group, seed, dtype, static, sub):
    """X̂ += Δ (·U_kvᵀ) in place: quantized deltas for sealed tokens, full-precision deltas in the tail
    (sub: the raw tail minus ``tail_sub``). Static: rows of 1, 37 and 400 tokens under a 510-token capacity
    (under the interpreter's stand-in SM count, the 400-token row has more tiles than the launch has token
    slots)."""
    lens, d, s = ((1, 37, 400), 200, 510) if static else ((1, 37, 70), 192, 70)
    acc0, delta, u, seq = build_cl_update(gqa, bits, group, dtype, lens, d, s)
    tail_sub = cl_tail_sub(delta, lens) if sub else None
    ref = xquant_cl_update_ref(acc0.clone(), delta, seq, u_kv=u, seed=seed, tail_sub=tail_sub)
    if sub:  # the subtraction reaches the result
        assert not torch.allclose(ref, xquant_cl_update_ref(acc0.clone(), delta, seq, u_kv=u, seed=seed),
                                  equal_nan=True)
    tri = acc0.clone()
    bound = {"capacity": s} if static else {}
    assert xquant_cl_update(tri, delta, seq, u_kv=u, seed=seed, tail_sub=tail_sub, backend="triton", **bound) is tri
    valid = torch.zeros(tri.shape[:2], dtype=torch.bool)
    for b, n in enumerate(lens):
        valid[b, :n] = True
    as_int = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(tri.cpu()[~valid].view(as_int), acc0.cpu()[~valid].view(as_int))
    if dtype == torch.float32:
        torch.testing.assert_close(tri.cpu(), ref.cpu(), atol=1e-5, rtol=1e-5, equal_nan=True)
    else:  # one bf16 ulp: the interpreter truncates float32 -> bf16 on stores, the reference rounds
        torch.testing.assert_close(tri.cpu()[valid].float(), ref.cpu()[valid].float(), atol=1e-2, rtol=2**-7)


@pytest.mark.parametrize("seed,dtype,static", [
    pytest.param(False, torch.float32, False, id="fp32"),
    pytest.param(True, torch.float32, True, id="static-seed-fp32"),
    pytest.param(False, torch.bfloat16, True, id="static-bf16"),
])
def test_xquant_cl_update_sealing(seed, dtype, static):
    """The sealed token's float64 chain (GQA): sealing[b] becomes (seed) or gains Δ[pos]·U_kvᵀ, products and sums
    in float64, for a row whose pos lies below its length: row 1's at its last sealed token (codes), row 2's in
    its tail (raw tail − tail_sub); row 0 (1 token) is left as is. The accumulator is the one without it."""
    lens, d, s = ((1, 37, 400), 200, 510) if static else ((1, 37, 70), 192, 70)
    acc0, delta, u, seq = build_cl_update(True, 3, 32, dtype, lens, d, s)
    tail_sub = cl_tail_sub(delta, lens)
    pos = torch.tensor([5, 30, lens[2] - 3], device=DEVICE)  # window 6: row 1 sealed 31, row 2's last 6 wait
    assert int(delta.sealed[1]) == 31 and int(delta.sealed[2]) <= lens[2] - 3
    sealing0 = torch.randn(3, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEVICE)
    bound = {"capacity": s} if static else {}
    ref_s, tri_s = sealing0.clone(), sealing0.clone()
    ref = xquant_cl_update_ref(acc0.clone(), delta, seq, u_kv=u, seed=seed, tail_sub=tail_sub, sealing=ref_s,
                               sealing_pos=pos)
    tri = xquant_cl_update(acc0.clone(), delta, seq, u_kv=u, seed=seed, tail_sub=tail_sub, sealing=tri_s,
                           sealing_pos=pos, backend="triton", **bound)
    plain = xquant_cl_update(acc0.clone(), delta, seq, u_kv=u, seed=seed, tail_sub=tail_sub, backend="triton", **bound)
    plain_ref = xquant_cl_update_ref(acc0.clone(), delta, seq, u_kv=u, seed=seed, tail_sub=tail_sub)
    as_int = torch.int16 if dtype != torch.float32 else torch.int32  # bitwise, NaN past row 0 included
    assert torch.equal(tri.cpu().view(as_int), plain.cpu().view(as_int))
    assert torch.equal(ref.cpu().view(as_int), plain_ref.cpu().view(as_int))
    assert torch.equal(tri_s[0], sealing0[0]) and torch.equal(ref_s[0], sealing0[0])
    for b in (1, 2):  # the reference: this token's delta (dequantized code, or tail − tail_sub), float64 product
        d_b = delta.values_ref(b, lens[b])[pos[b]] - (tail_sub[b, pos[b] - int(delta.sealed[b])].float()
                                                     if pos[b] >= delta.sealed[b] else 0)
        want = d_b.double() @ u.double().T + (0 if seed else sealing0[b])
        torch.testing.assert_close(ref_s[b], want, rtol=1e-12, atol=1e-12)
        assert not torch.equal(tri_s[b], sealing0[b])
    torch.testing.assert_close(tri_s.cpu(), ref_s.cpu(), rtol=1e-12, atol=1e-12)  # float64: any summation order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [0, 1, 19])
def test_xquant_cl_project(dtype, r):
    """Rows 1 + j: the accumulator at index[b, j] projected on U_kv (float32 products, table tolerance); row 0:
    the float64 chain's projection rounded once: bit-identical to the reference in float32, although the kernel
    sums in another order than torch. Index as the decode step passes it (a transposed view), d and C not
    multiples of 64, three rows."""
    gen = torch.Generator().manual_seed(r)
    bsz, s, d, c = 3, 37, 200, 72
    acc = torch.randn(bsz, s, d, generator=gen).to(dtype).to(DEVICE)
    index = torch.randint(0, s, (r, bsz), generator=gen).to(DEVICE).T
    sealing = (torch.randn(bsz, d, generator=gen, dtype=torch.float64) * 3).to(DEVICE)
    u = torch.linalg.qr(torch.randn(d, c, generator=gen))[0].to(dtype).to(DEVICE)
    ref = xquant_cl_project_ref(acc, index, sealing, u)
    tri = xquant_cl_project(acc, index, sealing, u, backend="triton")
    assert tri.shape == ref.shape == (bsz, 1 + r, c) and tri.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(tri[:, 0].cpu(), ref[:, 0].cpu())
        assert torch.equal(ref[:, 0], (sealing @ u.double()).float())
    else:  # one bf16 ulp: the interpreter truncates float32 -> bf16 on stores, the reference rounds
        torch.testing.assert_close(tri[:, 0].float().cpu(), ref[:, 0].float().cpu(), atol=0, rtol=2**-7)
    if r:
        rows = acc.gather(1, index[..., None].expand(-1, -1, d))
        check_close("indexed rows", tri[:, 1:], (rows.double() @ u.double()).to(dtype))


def build_cl_attention(dtype: torch.dtype, lens: tuple[int, ...], d: int, hd: int, s: int):
    gen = torch.Generator().manual_seed(7)
    n_kv, heads = 2, 4
    acc = torch.randn(3, s, d, generator=gen).to(dtype).to(DEVICE)
    w_k = (torch.randn(n_kv * hd, d, generator=gen) / math.sqrt(d)).to(dtype).to(DEVICE)
    w_v = (torch.randn(n_kv * hd, d, generator=gen) / math.sqrt(d)).to(dtype).to(DEVICE)
    b_k = torch.randn(n_kv * hd, generator=gen).to(dtype).to(DEVICE)
    b_v = torch.randn(n_kv * hd, generator=gen).to(dtype).to(DEVICE)
    q = torch.randn(3, heads, hd, generator=gen).to(dtype).to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_tables(s, hd))
    return q, acc, w_k, w_v, cos, sin, torch.tensor(lens, device=DEVICE), b_k, b_v


@pytest.mark.parametrize("dtype,static", [
    pytest.param(torch.float32, False, id="float32"),
    pytest.param(torch.bfloat16, False, id="bfloat16"),
    pytest.param(torch.float32, True, id="static-d200-hd128-float32"),
])
def test_xquant_cl_attention(dtype, static, monkeypatch: pytest.MonkeyPatch):
    """Attention over the dense accumulator in MHA form: GQA grouping, W_k/W_v as strided views, biases."""
    lens, d, hd, s = (STATIC_LENS, 200, 128, 512) if static else ((1, 40, 77), 192, 64, 80)
    q, acc, w_k, w_v, cos, sin, seq, b_k, b_v = build_cl_attention(dtype, lens, d, hd, s)
    poison_scratch(monkeypatch)
    ref = xquant_cl_attention_ref(q, acc, w_k, w_v, cos, sin, seq, b_k=b_k, b_v=b_v)
    ref_lp = None if dtype == torch.float32 else xquant_cl_attention_ref(q, acc, w_k, w_v, cos, sin, seq, b_k=b_k,
                                                                         b_v=b_v, compute_dtype=dtype)
    bound = {"capacity": s} if static else {}
    tri = xquant_cl_attention(q, acc, w_k, w_v, cos, sin, seq, b_k=b_k, b_v=b_v, out=nan_like(q), split_tokens=32,
                              backend="triton", **bound)
    check_close(f"cl-{dtype}", tri, ref, ref_lp)


# ----------------------------------------------------------------------------- launchers


def test_auto_backend_on_cpu_runs_the_reference():
    case = XQ_CASES[0]
    q, k, v, m_k, m_v, cos, sin, seq, _kw = build_xq(case)
    if q.is_cuda:
        pytest.skip("auto picks the kernel on CUDA")
    ref = xquant_attention_ref(q, k, v, m_k, m_v, cos, sin, seq)
    assert torch.equal(xquant_attention(q, k, v, m_k, m_v, cos, sin, seq), ref)
    out = nan_like(q)
    assert torch.equal(xquant_attention(q, k, v, m_k, m_v, cos, sin, seq, out=out, backend="ref"), ref)
    assert torch.equal(out, ref)


def test_validation_messages():
    case = XQ_CASES[0]
    q, k, v, m_k, m_v, cos, sin, seq, _kw = build_xq(case)
    with pytest.raises(ValueError, match="q must be"):
        xquant_attention(q[0], k, v, m_k, m_v, cos, sin, seq)
    with pytest.raises(ValueError, match="m_k must have 192 rows"):
        xquant_attention(q, k, v, m_k[1:], m_v, cos, sin, seq)
    with pytest.raises(ValueError, match="H_kv dividing"):  # 4 query heads over 3 kv heads
        xquant_attention(q, k, v, torch.cat([m_k, m_k[:, :64]], 1), torch.cat([m_v, m_v[:, :64]], 1), cos, sin, seq)
    with pytest.raises(ValueError, match="seq_lens"):
        xquant_attention(q, k, v, m_k, m_v, cos, sin, seq[:2])
    with pytest.raises(ValueError, match="scale must be fp16"):
        bad = PackedStream(k.tail, k.sealed, k.codes, k.scale.float(), k.zero, k.spec)
        xquant_attention(q, bad, v, m_k, m_v, cos, sin, seq)
    with pytest.raises(ValueError, match="codes must be uint8"):
        bad = PackedStream(k.tail, k.sealed, k.codes[..., :-1], k.scale, k.zero, k.spec)
        xquant_attention(q, bad, v, m_k, m_v, cos, sin, seq)
    with pytest.raises(ValueError, match="RoPE tables hold"):
        xquant_attention(q, k, v, m_k, m_v, cos[:50], sin[:50], seq, backend="triton")
    with pytest.raises(ValueError, match="RoPE tables hold 100 positions but rows may reach 512"):
        xquant_attention(q, k, v, m_k, m_v, cos, sin, seq, capacity=512, backend="triton")
    with pytest.raises(ValueError, match="capacity .* or max_seq_len .*, not both"):
        xquant_attention(q, k, v, m_k, m_v, cos, sin, seq, capacity=64, max_seq_len=64, backend="triton")
    with pytest.raises(ValueError, match="acc's buffers hold 100 positions"):
        xquant_cl_update(torch.zeros(3, 100, 192, device=DEVICE), v, seq, u_kv=None, capacity=101,
                         backend="triton")
    with pytest.raises(ValueError, match="out must be"):
        xquant_attention(q, k, v, m_k, m_v, cos, sin, seq, out=q.double())
    with pytest.raises(ValueError, match="backend"):
        xquant_attention(q, k, v, m_k, m_v, cos, sin, seq, backend="cuda")
    with pytest.raises(ValueError, match="k and v must both be"):
        kivi_attention(q, k, v, cos, sin, seq)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        xquant_attention(q, k, v, m_k, m_v, cos, sin, seq, capacity=0, backend="triton")
    with pytest.raises(ValueError, match="per token"):
        xquant_cl_update(torch.zeros(3, 100, 192, device=DEVICE), k, seq, u_kv=None)
    with pytest.raises(ValueError, match="u_kv must be"):
        xquant_cl_update(torch.zeros(3, 100, 256, device=DEVICE), v, seq, u_kv=torch.zeros(192, 256, device=DEVICE))
    with pytest.raises(ValueError, match="tail_sub must be a float tensor shaped like delta's tail"):
        xquant_cl_update(torch.zeros(3, 100, 192, device=DEVICE), v, seq, tail_sub=v.tail[:, 1:])
    sealing = torch.zeros(3, 192, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="sealing is the GQA chain through U_kv; it needs u_kv"):
        xquant_cl_update(torch.zeros(3, 100, 192, device=DEVICE), v, seq, sealing=sealing, sealing_pos=seq)
    with pytest.raises(ValueError, match=r"sealing must be a float64 \(3, 192\) tensor"):
        xquant_cl_project(torch.zeros(3, 100, 192, device=DEVICE), seq[:, None], sealing.float(),
                          torch.zeros(192, 64, device=DEVICE))


def test_plan_splits():
    dev = torch.device("cpu")
    assert plan_splits(100, 4, dev, 32, split_tokens=32) == (32, 4)
    assert plan_splits(100, 4, dev, 32, split_tokens=40) == (64, 2)
    assert plan_splits(1, 4, dev, 32) == (32, 1)
    # Without split_tokens: one-tile least splits (rows spread on the device), about 2 programs per
    # SM (the interpreter's stand-in has 4), never more splits than the bound has tiles.
    assert plan_splits(10_000, 1, dev, 64) == (64, 8)
    assert plan_splits(10_000, 3, dev, 64) == (64, 3)
    assert plan_splits(100, 1, dev, 32) == (32, 4)
    assert plan_splits(10_000, 1, dev, 64, per_sm=8) == (64, 32)


def static_launches(op: str, lens: tuple[int, ...]) -> None:
    """Run one static (capacity 512) launch of ``op`` on inputs built for rows of ``lens`` tokens."""
    if op == "xquant":
        case = replace(XQ_CASES[-2], lens=lens)  # static GQA, k_ch0 absent
        q, k, v, m_k, m_v, cos, sin, seq, kw = build_xq(case)
        xquant_attention(q, k, v, m_k, m_v, cos, sin, seq, capacity=512, backend="triton", **kw)
    elif op == "kivi":
        q, k, v, cos, sin, seq = build_kivi(replace(KIVI_CASES[-1], lens=lens))
        kivi_attention(q, k, v, cos, sin, seq, capacity=512, split_tokens=32, backend="triton")
    elif op == "cl_update":
        acc, delta, u, seq = build_cl_update(True, 3, 32, torch.float32, lens, 200, 512)
        xquant_cl_update(acc, delta, seq, u_kv=u, capacity=512, backend="triton")
    else:
        q, acc, w_k, w_v, cos, sin, seq, b_k, b_v = build_cl_attention(torch.float32, lens, 200, 128, 512)
        xquant_cl_attention(q, acc, w_k, w_v, cos, sin, seq, b_k=b_k, b_v=b_v, capacity=512, backend="triton")


@pytest.mark.parametrize("op", ["xquant", "kivi", "cl_update", "cl_attention"])
def test_static_launches_do_not_depend_on_lengths(op: str, monkeypatch: pytest.MonkeyPatch):
    """With a capacity, two steps with other row lengths launch the same kernels with the same grids,
    scalar arguments and tensor shapes and strides: one CUDA graph capture serves both."""
    calls = record_launches(monkeypatch)
    static_launches(op, STATIC_LENS)
    first = list(calls)
    calls.clear()
    static_launches(op, OTHER_LENS)
    assert first and calls == first
