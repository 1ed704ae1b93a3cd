"""Decode weights concatenated once (`xqcli.engine.fused`): one GEMV gives what the caches project today,
and the fused layer tail computes the decoder layer's math.

Two small models with odd widths: a GQA Qwen2 (d = 72, attention biases, latents 18 wide, so xquant
caches latents) and an MHA Llama (d = 200, X cached). The "today" side is recorded from the caches
themselves: every tensor a cache appends to a stream (or, for `kv`, projects) during one step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_kernels_attention import TOL
from test_kernels_attention import pytestmark as needs_triton  # triton, and CUDA or the interpreter

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.cache.stream import StreamCache
from xqcli.config import ModelConfig
from xqcli.engine.fused import DecodeWeights, fused_layer_tail, layer_head, layer_inputs
from xqcli.kernels import _triton
from xqcli.kernels.decode_ops import rms_norm
from xqcli.load import make_cache, model_projections
from xqcli.model import Transformer

KINDS = ["kv", "kivi-4", "xquant-4", "xquant-4+rot", "xquant-4+ch0", "xquant-cl-3", "xquant-cl-3+rot"]
DTYPES = [torch.float32, torch.bfloat16]


def small_model(kind: str, dtype: torch.dtype) -> Transformer:
    """"gqa": qwen2, d 72, 4 heads over 1 kv head of 18 (2·18 < 72: latents), biases; "mha": llama, d 200;
    "gqa-wide": llama, d 576 (SmolLM2's), 8 heads over 2 kv heads of 72: 288-wide latents, more than one of the
    interpreted kernels' 128-channel blocks."""
    raw = {"gqa": {"model_type": "qwen2", "hidden_size": 72, "intermediate_size": 200,
                   "num_attention_heads": 4, "num_key_value_heads": 1},
           "gqa-wide": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1152,
                        "num_attention_heads": 8, "num_key_value_heads": 2},
           "mha": {"model_type": "llama", "hidden_size": 200, "intermediate_size": 328,
                   "num_attention_heads": 4, "num_key_value_heads": 4}}[kind]
    cfg = ModelConfig.from_dict(raw | {"num_hidden_layers": 4, "vocab_size": 96, "rope_theta": 10000.0})
    torch.manual_seed(1)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model.to(dtype).eval().requires_grad_(False)


@pytest.fixture(scope="module", params=[(k, d) for k in ("gqa", "mha") for d in DTYPES],
                ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}")
def model_and_artifacts(request) -> tuple[Transformer, Artifacts]:
    model = small_model(*request.param)
    assert uses_latents(model.config) == (request.param[0] == "gqa")
    return model, Artifacts()


def recorded_stream_inputs(model: Transformer, spec: CacheSpec, artifacts: Artifacts,
                           xs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per layer, what a cache of `spec` appends to its streams (kv: projects) for X = xs[layer], in order."""
    cache = make_cache(model, spec, xs[0].shape[0], 8, artifacts=artifacts, kernels="off")
    seen: list[torch.Tensor] = []
    if isinstance(cache, StreamCache):
        append = cache.append

        def recording_append(stream, new, *rest):
            seen.append(new.clone())
            append(stream, new, *rest)

        cache.append = recording_append
    else:  # `kv` projects K and V itself
        project = cache.project

        def recording_project(layer, x):
            k, v = project(layer, x)
            seen.extend((k, v))
            return k, v

        cache.project = recording_project
    cache.begin([1] * xs[0].shape[0], 1)
    out = []
    for i, x in enumerate(xs):
        cache.update_and_fetch(i, x)
        out.append(list(seen))
        seen.clear()
    cache.end()
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_one_gemv_gives_q_and_what_the_caches_store(model_and_artifacts, kind):
    if "+ch0" in kind and not uses_latents(model_and_artifacts[0].config):
        pytest.skip("+ch0 needs latents: refused on MHA (test_ch0_needs_latents)")
    model, artifacts = model_and_artifacts
    spec = CacheSpec.parse(kind)
    cfg, dtype = model.config, model.dtype
    dw = DecodeWeights.build(model, spec, artifacts)
    xs = [torch.randn(3, 1, cfg.hidden_size).to(dtype) for _ in range(cfg.num_hidden_layers)]
    today = recorded_stream_inputs(model, spec, artifacts, xs)
    atol, rtol = TOL[dtype]
    for i, (x, layer) in enumerate(zip(xs, dw.layers)):
        got = layer_head(x, layer)
        assert list(got) == list(layer_inputs(spec, cfg, i)) == list(layer.slots)
        assert got["q"].shape == (3, 1, cfg.q_dim)
        torch.testing.assert_close(got["q"], model.layers[i].self_attn.q_proj(x), atol=atol, rtol=rtol)
        streams = [name for name in got if name != "q"]
        assert len(streams) == len(today[i]), f"layer {i}: {streams} vs {len(today[i])} tensors stored"
        for name, want in zip(streams, today[i]):
            if layer.slots[name] is None:  # X stored as it is: no rows, the input itself
                assert got[name] is x and torch.equal(want, x)
            else:
                torch.testing.assert_close(got[name], want, atol=atol, rtol=rtol,
                                           msg=lambda m, i=i, name=name: f"{kind} layer {i} {name}: {m}")


def expected_rows(model: Transformer, spec: CacheSpec, artifacts: Artifacts,
                  layer: int) -> dict[str, torch.Tensor]:
    """The rows each un-rotated slot must hold, bit for bit: the model's weights or the SVD factors in use."""
    attn = model.layers[layer].self_attn
    rows = {"q": attn.q_proj.weight}
    if spec.method in ("kv", "kivi"):
        return rows | {"k": attn.k_proj.weight, "v": attn.v_proj.weight}
    if uses_latents(model.config):
        p = model_projections(model, artifacts)[layer]
        ch0 = int(spec.fp16_channel0)
        rows |= {"k": p.k.u[:, ch0:].T, "ch0": p.k.u[:, :1].T, "v": p.v.u.T, "x": p.kv.u.T}
    return rows


@pytest.mark.parametrize("kind", ["kv", "xquant-4+ch0", "xquant-cl-3"])
def test_rows_are_the_weights_and_the_model_shares_them(kind):
    """Unrotated rows are copied bit for bit; afterwards the model's q/k/v and gate/up weights are views of
    the concatenations (no second copy) and the model computes the same logits bit for bit."""
    model = small_model("gqa", torch.float32)
    artifacts = Artifacts()
    spec = CacheSpec.parse(kind)
    tokens = torch.tensor([[3, 14, 15, 92, 65]])
    before = model(tokens)
    old = {i: expected_rows(model, spec, artifacts, i) for i in range(model.config.num_hidden_layers)}
    dw = DecodeWeights.build(model, spec, artifacts)
    assert torch.equal(model(tokens), before)
    for i, (block, layer) in enumerate(zip(model.layers, dw.layers)):
        y = layer.w_in
        for name, s in layer.slots.items():
            if name in old[i] and s is not None:
                assert torch.equal(y[s], old[i][name]), f"layer {i} {name}"
        assert torch.equal(layer.b_in[layer.slots["q"]], block.self_attn.q_proj.bias)
        assert block.self_attn.q_proj.weight.data_ptr() == y.data_ptr()
        assert block.mlp.gate_proj.weight.data_ptr() == layer.w_gate_up.data_ptr()
        up_rows = layer.w_gate_up[model.config.intermediate_size:]
        assert block.mlp.up_proj.weight.data_ptr() == up_rows.data_ptr()
        if kind == "kv":
            assert block.self_attn.v_proj.bias.data_ptr() == layer.b_in[layer.slots["v"]].data_ptr()
        else:  # latent rows carry no bias
            assert not layer.b_in[layer.slots["q"].stop:].any()


def test_slots_follow_the_layer_plan():
    """xquant-cl: plain xquant layers before the seed, one X·U_kv (or X) slot from the seed on."""
    gqa, mha = small_model("gqa", torch.float32).config, small_model("mha", torch.float32).config
    cl = CacheSpec.parse("xquant-cl-3")  # base_layers 3: layers 0, 1 plain, 2 the seed, 3 a delta
    assert list(layer_inputs(cl, gqa, 1)) == ["q", "k", "v"]
    assert layer_inputs(cl, gqa, 2) == {"q": slice(0, 72), "x": slice(72, 108)}
    assert layer_inputs(cl, mha, 3) == {"q": slice(0, 200), "x": None}
    assert layer_inputs(CacheSpec.parse("xquant-4+rot"), mha, 0) == {"q": slice(0, 200), "x": slice(200, 400)}
    assert layer_inputs(CacheSpec.parse("xquant-4+ch0"), gqa, 0) == {
        "q": slice(0, 72), "ch0": slice(72, 73), "k": slice(73, 90), "v": slice(90, 108)}


def layer_math(model: Transformer, i: int, h: torch.Tensor,
               attn_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xqcli.model's decoder layer after attention, then the next layer's input norm (the final norm
    after the last layer)."""
    block = model.layers[i]
    h = h + block.self_attn.o_proj(attn_out)
    h = h + block.mlp(block.post_attention_layernorm(h))
    last = i == model.config.num_hidden_layers - 1
    return h, (model.model.norm if last else model.layers[i + 1].input_layernorm)(h)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("backend", ["ref", pytest.param("triton", marks=needs_triton)])
def test_fused_layer_tail_is_the_decoder_layer(model_and_artifacts, backend, batch):
    model, artifacts = model_and_artifacts
    cfg, dtype = model.config, model.dtype
    dw = DecodeWeights.build(model, CacheSpec.parse("xquant-4"), artifacts)
    atol, rtol = TOL[dtype]
    for i in (0, cfg.num_hidden_layers - 1):
        h = (2 * torch.randn(batch, 1, cfg.hidden_size)).to(dtype)
        attn = torch.randn(batch, 1, cfg.q_dim).to(dtype)
        got_h, got_x = fused_layer_tail(h, attn, dw.layers[i], backend=backend)
        want_h, want_x = layer_math(model, i, h, attn)
        torch.testing.assert_close(got_h, want_h, atol=atol, rtol=rtol)
        torch.testing.assert_close(got_x, want_x, atol=atol, rtol=rtol)


def test_mha_kv_layout():
    """MHA `kv` without biases: [W_q; W_k; W_v], no bias vector; the step starts from layer 0's input norm
    and the last layer's tail ends with the final norm."""
    model = small_model("mha", torch.float32)
    dw = DecodeWeights.build(model, CacheSpec.parse("kv"), Artifacts())
    assert torch.equal(dw.norm_first.weight, model.layers[0].input_layernorm.weight)
    assert dw.layers[0].w_in.shape == (3 * 200, 200) and dw.layers[0].b_in is None
    assert torch.equal(dw.layers[-1].norm_next.weight, model.model.norm.weight)


def fused_decode_step(model: Transformer, dw: DecodeWeights, cache, tokens: torch.Tensor,
                      backend: str) -> torch.Tensor:
    """One decode step from the fused pieces: first norm, per layer the input GEMV's q (K/V from the cache
    as the model gets them) and the fused tail; logits (B, 1, vocab) in float32."""
    cfg, b = model.config, tokens.shape[0]
    cache.begin([1] * b, 1)
    mask = cache.attention_mask()
    h = model.model.embed_tokens(tokens)
    x = rms_norm(h, dw.norm_first.weight, dw.norm_first.eps, backend=backend)
    for i, layer in enumerate(dw.layers):
        q = model.layers[i].self_attn.split_heads(layer_head(x, layer)["q"], cfg.num_attention_heads)
        q = model.rope.apply(q, cache.positions, cache.step_total())
        k, v = cache.update_and_fetch(i, x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=cfg.is_gqa)
        h, x = fused_layer_tail(h, out.transpose(1, 2).reshape(b, 1, cfg.q_dim), layer, backend=backend)
    cache.end()
    return F.linear(x, model.output_weight()).float()


def check_decode_steps(model: Transformer, prompt: torch.Tensor, lens: list[int], steps: int) -> None:
    """Prefill rows of different lengths into two `kv` caches, then decode greedily: the fused step's
    logits equal the model's within the table tolerance (kernels compiled on a GPU, interpreted on CPU)."""
    backend = "triton" if _triton.HAS_TRITON and (model.device.type == "cuda" or _triton.INTERPRET) else "ref"
    dw = DecodeWeights.build(model, CacheSpec.parse("kv"), Artifacts())
    caches = [make_cache(model, "kv", len(lens), prompt.shape[1] + steps) for _ in range(2)]
    for cache in caches:
        model(prompt, cache, lens)
    tokens = torch.full((len(lens), 1), 7, device=model.device)
    atol, rtol = TOL[model.dtype]
    for step in range(steps):
        want = model(tokens, caches[0])
        with torch.inference_mode():
            got = fused_decode_step(model, dw, caches[1], tokens, backend)
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, s=step: f"step {s}: {m}")
        tokens = want[:, -1].argmax(-1, keepdim=True)


def test_decode_step_from_the_fused_pieces_is_the_models():
    model = small_model("gqa", torch.float32)
    check_decode_steps(model, torch.randint(0, 96, (3, 6)), [2, 6, 3], steps=3)


@pytest.mark.slow
def test_decode_step_from_the_fused_pieces_on_smollm2(smollm2_dir):
    from xqcli.load import load_hf_folder

    model = load_hf_folder(smollm2_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    prompt = torch.tensor([[1, 504, 3458, 282, 260, 1345], [1, 504, 2, 0, 0, 0]], device=model.device)
    check_decode_steps(model, prompt, [6, 3], steps=2)
