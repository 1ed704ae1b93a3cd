"""The fused Triton decode kernels inside the caches give the reference path's logits and tokens.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest), forced with `kernels="triton"`; small
models keep the interpreter fast. On a GPU the SmolLM2 test runs them compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

from xqcli.caches import make_cache
from xqcli.config import ModelConfig
from xqcli.model import Transformer

needs_triton = pytest.mark.skipif(
    not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()), reason="needs Triton")


def latent_model() -> Transformer:
    """A tiny GQA model whose latents are narrower than X (2·16 < 64), so xquant caches latents."""
    cfg = ModelConfig.from_dict({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                                 "vocab_size": 128, "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


def decode(model, kind: str, kernels: str, tokens: torch.Tensor, prefix: int) -> tuple[torch.Tensor, list[int]]:
    cache = make_cache(model, kind, tokens.shape[0], tokens.shape[1] + 4, kernels=kernels)
    cache.spec.check()
    logits = [model(tokens[:, :prefix], cache)]
    logits += [model(tokens[:, i:i + 1], cache) for i in range(prefix, tokens.shape[1])]
    out = torch.cat(logits, 1)
    return out, out[0, prefix - 1:].argmax(-1).tolist()


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Wrap the kernel entry points so a test can tell that the fused path really ran."""
    import xqcli.kernels.kivi_attention as kivi
    import xqcli.kernels.xquant_attention as xq

    calls = {"xquant": 0, "kivi": 0}
    for mod, name, key in ((xq, "xquant_attention", "xquant"), (kivi, "kivi_attention", "kivi")):
        fn = getattr(mod, name)

        def wrapped(*a, _fn=fn, _key=key, **k):
            calls[_key] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(mod, name, wrapped)
    return calls


@needs_triton
@pytest.mark.parametrize("kind", ["xquant-4", "xquant-2+ch0", "xquant-3+rot", "kivi-4", "xquant-cl-3", "xquant-fp"])
@pytest.mark.parametrize("which", ["latent", "mha"])
def test_fused_kernels_match_reference(tiny_models, kind, which, monkeypatch):
    model = latent_model() if which == "latent" else tiny_models["mha"]
    tokens = torch.randint(0, model.config.vocab_size, (2, 21))
    from xqcli.caches import CacheSpec

    spec = CacheSpec.parse(kind, window=4, group_size=8)
    ref, ref_tokens = decode(model, spec, "off", tokens, prefix=17)
    calls = count_kernel_calls(monkeypatch)
    got, got_tokens = decode(model, spec, "triton", tokens, prefix=17)
    assert sum(calls.values()) == (4 if kind.startswith("xquant-cl") else 2 * 4)  # decode steps × layers that fuse
    assert (got - ref).abs().max() <= 2e-3  # fp32 kernels vs fp32 reference: summation order only
    assert got_tokens == ref_tokens


def greedy_tokens(model, kind: str, kernels: str, prompt: list[int], n: int) -> list[int]:
    cache = make_cache(model, kind, 1, len(prompt) + n, kernels=kernels)
    logits = model(torch.tensor([prompt], device=model.device), cache)[:, -1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax(-1)))
        logits = model(torch.tensor([[out[-1]]], device=model.device), cache)[:, -1]
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="32 interpreted SmolLM2 steps take too long on a CPU")
@pytest.mark.parametrize("kind", ["xquant-4", "kivi-4", "xquant-cl-3"])
def test_smollm2_greedy_tokens_with_kernels(smollm2_dir, kind):
    from xqcli.weights import load_hf_folder

    model = load_hf_folder(smollm2_dir, device="cuda")
    prompt = list(range(100, 240))  # past the 128-token window: quantized tokens are read
    assert greedy_tokens(model, kind, "auto", prompt, 32) == greedy_tokens(model, kind, "off", prompt, 32)
