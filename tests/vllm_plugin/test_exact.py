"""`xq_exact`'s pieces against xq's own model code: the same bits (test_generate.py checks whole texts)."""

from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from xqcli.config import ModelConfig
from xqcli.load import Loaded
from xqcli.model import Transformer
from xqcli.rope import rotate
from xqcli.sources.hub import Source
from xqcli.vllm_plugin.exact import ExactNumerics
from xqcli.vllm_plugin.model import exact_wanted


@pytest.fixture(scope="module")
def exact() -> ExactNumerics:
    """A qwen2-shaped model (biases), 4 heads of 18 over 2 kv heads, random weights."""
    cfg = ModelConfig.from_dict({"model_type": "qwen2", "hidden_size": 72, "intermediate_size": 100,
                                 "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
                                 "vocab_size": 50, "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = Transformer(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return ExactNumerics(Loaded(model, tokenizer_dir=Path("."), source=Source("folder", Path("."))))


def test_spans_are_requests_then_padding(exact: ExactNumerics) -> None:
    exact.begin([0, 3, 3, 7], 9)  # the second request has no new token this forward; two padding tokens follow
    assert exact.spans == [slice(0, 3), slice(3, 7), slice(7, 9)]
    exact.begin(None, 5)  # vLLM's profiling forwards: one request
    assert exact.spans == [slice(0, 5)]


def test_q_is_xq_attentions_q_request_by_request(exact: ExactNumerics) -> None:
    """Each request's rotated q, bit for bit the one xq's `Attention.forward` computes on that request alone."""
    attn, hd = exact.model.layers[0].self_attn, exact.model.config.head_dim
    lengths, starts = [5, 1, 3], [0, 5, 6, 9]
    x = torch.randn(9, 72)
    positions = torch.cat([torch.arange(n) + off for n, off in zip(lengths, (0, 40, 7))])
    exact.begin(starts, 9)
    got = exact.rope(exact.linear(attn.q_proj, x), positions, hd)
    for a, b in pairwise(starts):
        want = rotate(attn.split_heads(attn.q_proj(x[a:b][None]), 4), *exact.model.rope.cos_sin(positions[None, a:b],
                                                                                                   x.dtype))
        assert torch.equal(got[a:b], want[0].transpose(0, 1).reshape(b - a, -1))


def test_logits_are_each_rows_own(exact: ExactNumerics) -> None:
    h = torch.randn(3, 72)
    got = exact.logits(h)
    assert got.dtype == torch.float32 and got.shape == (3, 50)
    for i in range(3):
        assert torch.equal(got[i], F.linear(h[i:i + 1], exact.model.output_weight())[0])


def vllm_config(exact=True, tp: int = 1, pp: int = 1, device: str = "cpu") -> SimpleNamespace:
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(xq_exact=exact)),
                           parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                           device_config=SimpleNamespace(device_type=device))


@pytest.mark.parametrize(("config", "why"), [(vllm_config(tp=2), "one rank"), (vllm_config(pp=2), "one rank"),
                                             (vllm_config(device="cuda"), "on the CPU"),
                                             (vllm_config(exact="yes"), "true or false")])
def test_exact_refuses_what_xq_does_not_compute(config: SimpleNamespace, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        exact_wanted(config)


def test_exact_is_off_unless_asked() -> None:
    assert exact_wanted(vllm_config()) is True
    assert exact_wanted(vllm_config(exact=False, tp=2, device="cuda")) is False
    assert exact_wanted(SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace()))) is False
