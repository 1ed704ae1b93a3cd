"""The fused kernels reading streams from shared pages through block tables (``packed.PagedStream``, vLLM's
paged layout) against the same streams in per-row buffers (``PackedStream``).

Each stream is quantized once with ``quantize_ref``; the per-row copy and the paged copy hold the same codes,
scales and zeros, so everything a kernel computes from them must be equal bit for bit, and the paged reference
must decode the same values. Pages are shared by the rows in a shuffled order, each stream sits at an odd byte
offset of the page row between random bytes (another stream's), unused pages and rows past a row's tokens are
random, and tails are NaN past a row's tokens: a wrong address shows as a wrong or NaN result.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_kernels_attention import DEVICE, check_close, nan_like, poison_scratch, rope_tables

from xqcli.kernels import _triton
from xqcli.kernels.kivi_attention import kivi_attention, kivi_attention_ref
from xqcli.kernels.packed import PackedStream, PagedStream, PageFormat
from xqcli.kernels.quant import QuantSpec, packed_width, quantize_ref
from xqcli.kernels.xquant_attention import xquant_attention, xquant_attention_ref
from xqcli.kernels.xquant_cl import xquant_cl_update, xquant_cl_update_ref

pytestmark = pytest.mark.skipif(
    not _triton.HAS_TRITON or not (_triton.INTERPRET or torch.cuda.is_available()),
    reason="needs triton and CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
)

OFFSET = 5  # the stream's first byte in a page row (odd: fp16 scales at any alignment)


def sealed_counts(lens: list[int], spec: QuantSpec, page: int) -> list[int]:
    """What a paged cache has sealed: every token per token; whole pages per channel (the rest waits)."""
    return list(lens) if spec.axis == "token" else [n // page * page for n in lens]


def twin_streams(x: torch.Tensor, lens: list[int], spec: QuantSpec, page: int, gen: torch.Generator
                 ) -> tuple[PackedStream, PagedStream]:
    """Rows x (B, S, C): their first lens[b] tokens as a per-row PackedStream and as a PagedStream whose pages
    (shuffled, shared, with spare ones) hold the same codes, scales and zeros."""
    bsz, s, c = x.shape
    fmt = PageFormat(c, spec, page)
    sealed = sealed_counts(lens, spec, page)
    n_pages = [math.ceil(n / page) for n in lens]
    total = sum(n_pages) + 2
    row_bytes = OFFSET + fmt.row_bytes + 3
    pages = torch.randint(0, 256, (total, page, row_bytes), generator=gen, dtype=torch.uint8)
    order = torch.randperm(total, generator=gen)
    table = torch.full((bsz, max(n_pages) + 1), -1, dtype=torch.int32)
    g = spec.group_size
    codes = torch.zeros(bsz, s, packed_width(c, spec.bits), dtype=torch.uint8)
    shape = (bsz, s, math.ceil(c / g)) if spec.axis == "token" else (bsz, math.ceil(s / g), c)
    scale = torch.full(shape, float("nan"), dtype=torch.float16)
    zero = scale.clone()
    tail_rows = max(1, max(n - k for n, k in zip(lens, sealed)))
    tail = torch.full((bsz, tail_rows, c), float("nan"), dtype=x.dtype)
    used = 0
    for b, (n, k) in enumerate(zip(lens, sealed)):
        table[b, :n_pages[b]] = order[used:used + n_pages[b]]
        used += n_pages[b]
        tail[b, :n - k] = x[b, k:n]
        if not k:
            continue
        q = quantize_ref(x[b, :k], spec)
        codes[b, :k], scale[b, :q.scale.shape[0]], zero[b, :q.zero.shape[0]] = q.packed, q.scale, q.zero
        for p in range(math.ceil(k / page)):
            rows = slice(p * page, min(k, (p + 1) * page))
            part = quantize_ref(x[b, rows], spec)
            raw = fmt.encode_page(part) if spec.axis == "channel" else fmt.encode_tokens(part)
            pages[table[b, p], :raw.shape[0], OFFSET:OFFSET + fmt.row_bytes] = raw
    seal = torch.tensor(sealed, dtype=torch.int32, device=DEVICE)
    packed = PackedStream(tail=tail.to(DEVICE), sealed=seal, codes=codes.to(DEVICE), scale=scale.to(DEVICE),
                          zero=zero.to(DEVICE), spec=spec)
    paged = PagedStream(pages=pages.to(DEVICE), block_table=table.to(DEVICE), offset=OFFSET, fmt=fmt,
                        tail=tail.to(DEVICE), sealed=seal)
    return packed, paged


SPECS = [
    pytest.param(QuantSpec(4, 16, "channel"), 16, id="4bit-channel-page16"),
    pytest.param(QuantSpec(3, 16, "channel"), 16, id="3bit-channel-page16"),
    pytest.param(QuantSpec(2, 128, "channel"), 128, id="2bit-channel-page128"),
    pytest.param(QuantSpec(3, 32, "token"), 16, id="3bit-token-g32-page16"),
    pytest.param(QuantSpec(8, 128, "token"), 16, id="8bit-token-g128-page16"),
]


@pytest.mark.parametrize("spec,page", SPECS)
def test_paged_values_equal_per_row_values(spec: QuantSpec, page: int):
    gen = torch.Generator().manual_seed(1)
    lens = [1, 37, 150, 256]
    packed, paged = twin_streams(torch.randn(len(lens), 256, 72, generator=gen), lens, spec, page, gen)
    for b, n in enumerate(lens):
        assert torch.equal(paged.values_ref(b, n), packed.values_ref(b, n))


def test_page_format_round_trips_a_page():
    """A per-channel page: C fp16 scales (and zeros) spread over the rows, half_bytes each, odd here (3)."""
    spec = QuantSpec(4, 128, "channel")
    fmt = PageFormat(192, spec, 128)
    assert (fmt.code_bytes, fmt.half_bytes, fmt.row_bytes) == (96, 3, 102)
    q = quantize_ref(torch.randn(128, 192), spec)
    back = fmt.decode(fmt.encode_page(q))
    assert torch.equal(back.packed, q.packed) and torch.equal(back.scale, q.scale) and torch.equal(back.zero, q.zero)
    none = fmt.decode(torch.zeros(0, fmt.row_bytes, dtype=torch.uint8))  # a request whose first page is unsealed
    assert none.scale.shape == (0, 192) and none.packed.shape == (0, 96)
    with pytest.raises(ValueError, match="group size 128"):
        PageFormat(192, spec, 64)


def attention_inputs(lens: list[int], heads: int, kv_heads: int, hd: int, gen: torch.Generator):
    cos, sin = rope_tables(max(lens) + 1, hd)
    q = torch.randn(len(lens), heads, hd, generator=gen).to(DEVICE)
    return q, cos.to(DEVICE), sin.to(DEVICE), torch.tensor(lens, device=DEVICE)


@pytest.mark.parametrize("k_spec,page,c_k,c_v,lens", [
    pytest.param(QuantSpec(4, 16, "channel"), 16, 40, 72, [1, 37, 70], id="gqa-k4ch-v4tok-page16"),
    pytest.param(QuantSpec(3, 16, "channel"), 16, 24, 40, [19, 1, 48], id="gqa-k3ch-v3tok-page16"),
    pytest.param(QuantSpec(2, 128, "channel"), 128, 40, 24, [130, 1, 260], id="gqa-k2ch-v2tok-page128"),
    pytest.param(None, 16, 96, 96, [1, 33, 70], id="mha-x4tok-page16"),
])
def test_xquant_attention_paged(k_spec, page, c_k, c_v, lens, monkeypatch: pytest.MonkeyPatch):
    """GQA: K latents per channel, V latents per token; MHA: X per token passed as both (M = W_kᵀ, W_vᵀ views)."""
    gen = torch.Generator().manual_seed(2)
    hd, kv_heads, heads = 32, 2, 6
    bits = 4 if k_spec is None else k_spec.bits
    v_spec = QuantSpec(bits, 32 if c_v > 32 else 16, "token")
    x_k = torch.randn(len(lens), max(lens), c_k, generator=gen)
    k_packed, k_paged = twin_streams(x_k, lens, k_spec or v_spec, page, gen)
    if k_spec is None:  # MHA: one stream of X, weights as nn.Linear keeps them
        v_packed, v_paged = k_packed, k_paged
        m_k = (torch.randn(kv_heads * hd, c_k, generator=gen) / math.sqrt(c_k)).to(DEVICE).T
        m_v = (torch.randn(kv_heads * hd, c_v, generator=gen) / math.sqrt(c_v)).to(DEVICE).T
    else:
        x_v = torch.randn(len(lens), max(lens), c_v, generator=gen)
        v_packed, v_paged = twin_streams(x_v, lens, v_spec, page, gen)
        m_k = (torch.randn(c_k, kv_heads * hd, generator=gen) / math.sqrt(c_k)).to(DEVICE)
        m_v = (torch.randn(c_v, kv_heads * hd, generator=gen) / math.sqrt(c_v)).to(DEVICE)
    q, cos, sin, seq = attention_inputs(lens, heads, kv_heads, hd, gen)
    b_k, b_v = (torch.randn(kv_heads * hd, generator=gen).to(DEVICE) for _ in range(2))
    poison_scratch(monkeypatch)
    run = {"b_k": b_k, "b_v": b_v, "split_tokens": 32, "backend": "triton"}
    paged = xquant_attention(q, k_paged, v_paged, m_k, m_v, cos, sin, seq, out=nan_like(q), **run)
    per_row = xquant_attention(q, k_packed, v_packed, m_k, m_v, cos, sin, seq, out=nan_like(q), **run)
    assert torch.equal(paged, per_row)
    ref = xquant_attention_ref(q, k_paged, v_paged, m_k, m_v, cos, sin, seq, b_k=b_k, b_v=b_v)
    check_close("paged", paged, ref)


@pytest.mark.parametrize("bits,page,lens", [
    pytest.param(4, 16, [1, 37, 70], id="4bit-page16"),
    pytest.param(3, 128, [129, 1, 200], id="3bit-page128"),
])
def test_kivi_attention_paged(bits: int, page: int, lens: list[int], monkeypatch: pytest.MonkeyPatch):
    """KIVI: pre-RoPE K per channel (a page is its group), V per token."""
    gen = torch.Generator().manual_seed(3)
    hd, kv_heads, heads = 32, 3, 6
    c = kv_heads * hd
    k_packed, k_paged = twin_streams(torch.randn(len(lens), max(lens), c, generator=gen), lens,
                                     QuantSpec(bits, page, "channel"), page, gen)
    v_packed, v_paged = twin_streams(torch.randn(len(lens), max(lens), c, generator=gen), lens,
                                     QuantSpec(bits, 32, "token"), page, gen)
    q, cos, sin, seq = attention_inputs(lens, heads, kv_heads, hd, gen)
    poison_scratch(monkeypatch)
    paged = kivi_attention(q, k_paged, v_paged, cos, sin, seq, out=nan_like(q), split_tokens=32, backend="triton")
    per_row = kivi_attention(q, k_packed, v_packed, cos, sin, seq, out=nan_like(q), split_tokens=32,
                             backend="triton")
    assert torch.equal(paged, per_row)
    check_close("paged kivi", paged, kivi_attention_ref(q, k_paged, v_paged, cos, sin, seq))


@pytest.mark.parametrize("gqa,seed", [
    pytest.param(True, False, id="gqa-delta"),
    pytest.param(True, True, id="gqa-seed"),
    pytest.param(False, False, id="mha-delta"),
])
def test_xquant_cl_update_paged(gqa: bool, seed: bool):
    """X̂ += deq(Δ) (·U_kvᵀ) with Δ from pages, per token (XQuant-CL's seed and delta layers)."""
    gen = torch.Generator().manual_seed(4)
    lens, d = [1, 37, 70], 72
    c = 40 if gqa else d
    u = torch.linalg.qr(torch.randn(d, c, generator=gen))[0].to(DEVICE) if gqa else None
    packed, paged = twin_streams(torch.randn(len(lens), max(lens), c, generator=gen) * 0.1, lens,
                                 QuantSpec(3, 32, "token"), 16, gen)
    acc0 = torch.randn(len(lens), max(lens) + 2, d, generator=gen).to(DEVICE)
    seq = torch.tensor(lens, device=DEVICE)
    run = {"u_kv": u, "seed": seed, "backend": "triton"}
    paged_acc = xquant_cl_update(acc0.clone(), paged, seq, **run)
    assert torch.equal(paged_acc, xquant_cl_update(acc0.clone(), packed, seq, **run))
    ref = xquant_cl_update_ref(acc0.clone(), paged, seq, u_kv=u, seed=seed)
    torch.testing.assert_close(paged_acc.cpu(), ref.cpu(), atol=1e-5, rtol=1e-5)


def test_paged_stream_checks():
    gen = torch.Generator().manual_seed(5)
    _, paged = twin_streams(torch.randn(2, 20, 40, generator=gen), [5, 20], QuantSpec(4, 16, "channel"), 16, gen)
    q, cos, sin, seq = attention_inputs([5, 20], 4, 2, 20, gen)
    m = torch.randn(40, 40).to(DEVICE)
    bad_table = PagedStream(paged.pages, paged.block_table[:1], paged.offset, paged.fmt, paged.tail, paged.sealed)
    with pytest.raises(ValueError, match="block_table must be"):
        xquant_attention(q, bad_table, bad_table, m, m, cos, sin, seq, backend="triton")
    too_far = PagedStream(paged.pages, paged.block_table, paged.pages.shape[2] - 2, paged.fmt, paged.tail,
                          paged.sealed)
    with pytest.raises(ValueError, match="do not fit"):
        xquant_attention(q, too_far, too_far, m, m, cos, sin, seq, backend="triton")
