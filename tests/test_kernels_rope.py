"""``rope_q``: the decode query's RoPE with positions on the device, bit-equal to ``Rope.apply``."""

from __future__ import annotations

import pytest
import torch
from xqcli.kernels import _triton
from xqcli.kernels.rope_q import rope_q, rope_q_ref

from xqcli.config import ModelConfig
from xqcli.rope import Rope

pytestmark = pytest.mark.skipif(
    not _triton.HAS_TRITON or not (_triton.INTERPRET or torch.cuda.is_available()),
    reason="needs triton and CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rope_for(heads: int, hd: int) -> Rope:
    cfg = ModelConfig("llama", hidden_size=heads * hd, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=1, head_dim=hd, vocab_size=16)
    return Rope(cfg, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bsz,heads,hd,positions", [(1, 1, 2, [0]), (3, 9, 24, [0, 37, 5]), (2, 4, 64, [511, 3])])
def test_rope_q_equals_rope_apply(dtype, bsz, heads, hd, positions):
    """Odd head counts, half widths not powers of two, rows at different positions, a strided view of
    a GEMV output: the kernel gives `Rope.apply`'s bits (the model's query RoPE)."""
    rope = rope_for(heads, hd)
    cos, sin = rope.tables(512)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(bsz, heads * hd + 7, generator=gen).to(DEVICE, dtype)  # q is a view: row stride != H·D
    q = y[:, 3:3 + heads * hd].view(bsz, heads, hd)
    pos = torch.tensor(positions, device=DEVICE)
    want = rope.apply(q[:, :, None], pos[:, None], 512)[:, :, 0]
    assert torch.equal(rope_q_ref(q, cos, sin, pos), want)
    out = torch.full_like(want, float("nan"))
    got = rope_q(q, cos, sin, pos.to(torch.int32), out=out, backend="triton")
    assert got is out and torch.equal(got, want)


def test_rope_q_refuses_bad_shapes():
    rope = rope_for(2, 8)
    cos, sin = rope.tables(16)
    with pytest.raises(ValueError, match="rope_q: q must be"):
        rope_q(torch.zeros(2, 8, device=DEVICE), cos, sin, torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="seq_lens must be"):
        rope_q(torch.zeros(2, 2, 8, device=DEVICE), cos, sin, torch.zeros(3, dtype=torch.long, device=DEVICE))
