"""Plain KV decode kernels: ``kv_append_rope`` and ``kv_attention`` against their references,
``xqcli.rope.Rope.apply`` and SDPA with ``xqcli.rope.causal_mask`` over the whole buffer.

Every byte the kernels must not touch is NaN: buffer slots past a row's length (and before its
sliding window), the output, the launchers' scratch buffers. Shapes follow SmolLM2's odd grouping
(9 query heads over 3 kv heads) and rows of very different lengths under a larger capacity.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_kernels_attention import (
    DEVICE,
    OTHER_LENS,
    STATIC_LENS,
    check_close,
    nan_like,
    poison_scratch,
    record_launches,
)

from xqcli.config import ModelConfig
from xqcli.kernels import _triton
from xqcli.kernels.kv_attention import kv_append_rope, kv_append_rope_ref, kv_attention, kv_attention_ref
from xqcli.rope import Rope, causal_mask

pytestmark = pytest.mark.skipif(
    not _triton.HAS_TRITON or not (_triton.INTERPRET or torch.cuda.is_available()),
    reason="needs triton and CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
)

CAPACITY = 512


def rope_for(heads: int, kv_heads: int, hd: int) -> Rope:
    cfg = ModelConfig("llama", hidden_size=heads * hd, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hd, vocab_size=16)
    return Rope(cfg, DEVICE)


def kv_buffers(lens: tuple[int, ...], kv_heads: int, hd: int, dtype: torch.dtype, window: int | None,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean K/V buffers (B, H_kv, CAPACITY, D), zero past each row, and copies NaN wherever a row's
    query must not look: past its length and before its window."""
    gen = torch.Generator().manual_seed(seed)
    shape = (len(lens), kv_heads, CAPACITY, hd)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    k_bad, v_bad = k.clone(), v.clone()
    for b, n in enumerate(lens):
        k[b, :, n:] = v[b, :, n:] = 0
        k_bad[b, :, n:] = v_bad[b, :, n:] = float("nan")
        if window is not None:
            k_bad[b, :, : max(0, n - window)] = v_bad[b, :, : max(0, n - window)] = float("nan")
    return k.to(DEVICE), v.to(DEVICE), k_bad.to(DEVICE), v_bad.to(DEVICE)


# ----------------------------------------------------------------------------- attention

ATT_CASES = [  # (id, lens, heads, kv_heads, head_dim, window, dtype, bound, split_tokens)
    ("smollm-9q3kv-d64-static", STATIC_LENS, 9, 3, 64, None, torch.float32, "capacity", None),
    ("smollm-9q3kv-d64-window40-static-split32", STATIC_LENS, 9, 3, 64, 40, torch.float32, "capacity", 32),
    ("gqa-4q2kv-d128-window7-eager", (1, 37, 300), 4, 2, 128, 7, torch.float32, "max_seq_len", None),
    ("mha-3q3kv-d64-bf16-static", STATIC_LENS, 3, 3, 64, None, torch.bfloat16, "capacity", 32),
    ("gqa-4q2kv-d128-window300-fp16-device-max", (300, 299, 1), 4, 2, 128, 300, torch.float16, None, None),
    ("T1-9q3kv-d64-static", (1,), 9, 3, 64, None, torch.float32, "capacity", None),
]


@pytest.mark.parametrize("name,lens,heads,kv_heads,hd,window,dtype,bound,split", ATT_CASES,
                         ids=[c[0] for c in ATT_CASES])
def test_kv_attention(name, lens, heads, kv_heads, hd, window, dtype, bound, split,
                      monkeypatch: pytest.MonkeyPatch):
    """The kernel over NaN-poisoned buffers equals the reference, and SDPA over the whole clean
    buffer with causal_mask (the captured `kv` path today): only each row's own tokens matter."""
    k, v, k_bad, v_bad = kv_buffers(lens, kv_heads, hd, dtype, window)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(len(lens), heads, hd, generator=gen).to(dtype).to(DEVICE)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ref = kv_attention_ref(q, k_bad, v_bad, seq, window=window)
    ref_lp = None
    if dtype != torch.float32:
        ref_lp = kv_attention_ref(q, k, v, seq, window=window, compute_dtype=dtype)
    kw = {"capacity": CAPACITY} if bound == "capacity" else {"max_seq_len": max(lens)} if bound else {}
    poison_scratch(monkeypatch)
    out = nan_like(q)
    tri = kv_attention(q, k_bad, v_bad, seq, window=window, out=out, split_tokens=split, backend="triton",
                       **kw)
    assert tri.data_ptr() == out.data_ptr()
    check_close(name, tri, ref, ref_lp)

    mask = causal_mask((seq.long() - 1)[:, None], CAPACITY, window)[:, None]  # (B, 1, T=1, S)
    sdpa = F.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=heads != kv_heads)[:, :, 0]
    check_close(f"{name} vs SDPA", tri, sdpa.to(dtype), ref_lp)


def test_kv_attention_launches_do_not_depend_on_lengths(monkeypatch: pytest.MonkeyPatch):
    """With a capacity, steps with other row lengths launch the same kernels, grids, scalars and shapes."""
    calls = record_launches(monkeypatch)
    launches = []
    for lens in (STATIC_LENS, OTHER_LENS):
        _k, _v, k_bad, v_bad = kv_buffers(lens, 3, 64, torch.float32, 40)
        q = torch.randn(len(lens), 9, 64).to(DEVICE)
        kv_attention(q, k_bad, v_bad, torch.tensor(lens, device=DEVICE), window=40, capacity=CAPACITY,
                     backend="triton")
        launches.append(list(calls))
        calls.clear()
    assert launches[0] and launches[0] == launches[1]


def test_kv_attention_validation():
    q = torch.zeros(2, 9, 64, device=DEVICE)
    buf = torch.zeros(2, 3, 16, 64, device=DEVICE)
    seq = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="H_kv dividing the 9 query heads"):
        kv_attention(q, buf[:, :2], buf[:, :2], seq)
    with pytest.raises(ValueError, match="one shape and dtype"):
        kv_attention(q, buf, buf.half(), seq)
    with pytest.raises(ValueError, match="window must be >= 1"):
        kv_attention(q, buf, buf, seq, window=0)
    with pytest.raises(ValueError, match="the K/V buffers hold 16 positions but rows may reach 17"):
        kv_attention(q, buf, buf, seq, capacity=17, backend="triton")
    with pytest.raises(ValueError, match="RoPE tables hold 8 positions but the buffers hold 16"):
        kv_append_rope(buf, buf, buf[:, :, 0], buf[:, :, 0], buf[0, 0, :8], buf[0, 0, :8], seq)
    with pytest.raises(ValueError, match=r"k_new must be a float \(2, 3, 64\)"):
        kv_append_rope(buf, buf, buf[:, :, :1], buf[:, :, 0], buf[0, 0], buf[0, 0], seq)


# ----------------------------------------------------------------------------- append


@pytest.mark.parametrize("heads,kv_heads,hd,new_dtype,buf_dtype", [
    pytest.param(9, 3, 64, torch.float32, torch.float32, id="smollm-d64-fp32"),
    pytest.param(9, 3, 64, torch.bfloat16, torch.bfloat16, id="smollm-d64-bf16"),
    pytest.param(4, 2, 128, torch.float16, torch.float16, id="gqa-d128-fp16"),
    pytest.param(4, 2, 128, torch.float32, torch.bfloat16, id="gqa-d128-fp32-into-bf16"),
])
def test_kv_append_rope(heads, kv_heads, hd, new_dtype, buf_dtype):
    """Each row's new token lands at its position, K rotated exactly as Rope.apply rotates it (then
    cast to the buffer); nothing else changes. A row already at capacity writes nothing."""
    gen = torch.Generator().manual_seed(2)
    rope = rope_for(heads, kv_heads, hd)
    cos, sin = rope.tables(CAPACITY)
    positions = torch.tensor([0, 36, 299, CAPACITY], device=DEVICE)  # the last row is full
    k_new = (torch.randn(4, kv_heads, hd, generator=gen) * 3).to(new_dtype).to(DEVICE)
    v_new = torch.randn(4, kv_heads, hd, generator=gen).to(new_dtype).to(DEVICE)
    k_buf = torch.full((4, kv_heads, CAPACITY, hd), float("nan"), dtype=buf_dtype, device=DEVICE)
    v_buf = k_buf.clone()
    k0, v0 = k_buf.clone(), v_buf.clone()
    kv_append_rope(k_buf, v_buf, k_new, v_new, cos, sin, positions, backend="triton")

    want_k = rope.apply(k_new[:3, :, None], positions[:3, None])[:, :, 0].to(buf_dtype)
    ref_k, ref_v = k0[:3].clone(), v0[:3].clone()
    kv_append_rope_ref(ref_k, ref_v, k_new[:3], v_new[:3], cos, sin, positions[:3])
    as_int = torch.int32 if buf_dtype == torch.float32 else torch.int16
    assert torch.equal(k_buf[:3].view(as_int), ref_k.view(as_int))
    assert torch.equal(v_buf[:3].view(as_int), ref_v.view(as_int))
    for b, p in enumerate(positions[:3].tolist()):
        assert torch.equal(k_buf[b, :, p], want_k[b])
        assert torch.equal(v_buf[b, :, p], v_new[b].to(buf_dtype))
        written = torch.zeros(CAPACITY, dtype=torch.bool)
        written[p] = True
        assert k_buf[b, :, ~written].isnan().all() and v_buf[b, :, ~written].isnan().all()
    assert k_buf[3].isnan().all() and v_buf[3].isnan().all()
    with pytest.raises(ValueError, match="must be below the buffers' 512 tokens"):
        kv_append_rope_ref(k0, v0, k_new, v_new, cos, sin, positions)


def test_kv_append_then_attend_matches_sdpa():
    """One decode step the way the `kv` cache will run it: append with RoPE, attend over the rows' own
    tokens; equals HF-style SDPA on the rotated keys with causal_mask (batch 3, different lengths)."""
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, hd, lens = 9, 3, 64, STATIC_LENS
    rope = rope_for(heads, kv_heads, hd)
    cos, sin = rope.tables(CAPACITY)
    k, v, k_bad, v_bad = kv_buffers(lens, kv_heads, hd, torch.float32, None)
    before = torch.tensor(lens, device=DEVICE) - 1  # the new token's position
    k_new = torch.randn(3, kv_heads, hd, generator=gen).to(DEVICE)
    v_new = torch.randn(3, kv_heads, hd, generator=gen).to(DEVICE)
    q = rope.apply(torch.randn(3, heads, 1, hd, generator=gen).to(DEVICE), before[:, None])[:, :, 0]
    kv_append_rope(k_bad, v_bad, k_new, v_new, cos, sin, before, backend="triton")
    tri = kv_attention(q, k_bad, v_bad, before + 1, capacity=CAPACITY, backend="triton")
    rows = torch.arange(3, device=DEVICE)
    k[rows, :, before] = rope.apply(k_new[:, :, None], before[:, None])[:, :, 0]
    v[rows, :, before] = v_new
    mask = causal_mask(before[:, None], CAPACITY)[:, None]
    sdpa = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)[:, :, 0]
    check_close("append+attend vs SDPA", tri, sdpa)
