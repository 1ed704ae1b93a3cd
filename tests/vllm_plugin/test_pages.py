"""The page layout of the X cache: rows decode exactly as xq's own quantizer would (docs/vllm.md)."""

import pytest
import torch
from xqcli.kernels.quant import QuantSpec, fake_quantize

from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.cache.stream import Stream
from xqcli.load import make_cache
from xqcli.vllm_plugin.cl import Accumulator, ChainLayer, layer_layout
from xqcli.vllm_plugin.pages import PageLayout


def layout(width: int, bits: int | None, latent: bool, block: int = 128) -> PageLayout:
    def stream(axis: str):
        return (width, "fp", None) if bits is None else (width, axis, QuantSpec(bits, block, axis))

    return PageLayout([stream("channel"), stream("token")] if latent else [stream("token")], block, torch.float32)


def test_row_bytes_smollm2() -> None:
    """SmolLM2's pages: GQA latents 2 x 192 wide, MHA X 576 wide, at 4 bits and unquantized (fp32)."""
    assert layout(192, 4, latent=True).row_bytes == 96 + 6 + 96 + 8  # codes, channel blob, codes, 2 groups
    assert layout(576, 4, latent=False).row_bytes == 288 + 5 * 4
    assert layout(192, None, latent=True).row_bytes == 2 * 192 * 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("width", [1, 70, 192])
def test_token_rows_decode_as_fake_quantize(bits: int, width: int) -> None:
    lay = layout(width, bits, latent=False)
    for t in (1, 3):
        x = torch.randn(t, width) * 3
        (got,) = lay.decode(lay.encode([x]))
        assert torch.equal(got, fake_quantize(x, QuantSpec(bits, 128, "token")))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("block", [16, 128])
def test_sealed_pages_decode_as_per_channel_groups(bits: int, block: int) -> None:
    """Channel streams decode whole sealed pages only; each page is one group per channel."""
    lay = layout(70, bits, latent=True, block=block)
    n = 2 * block + 5
    k, v = torch.randn(n, 70), torch.randn(n, 70) * 2
    rows = lay.encode([k, v])
    for p in range(2):
        lay.seal(rows[p * block:(p + 1) * block], [k[p * block:(p + 1) * block], None])
    got_k, got_v = lay.decode(rows)
    assert got_k.shape == (2 * block, 70)
    assert torch.equal(got_k, fake_quantize(k[:2 * block], QuantSpec(bits, block, "channel")))
    assert torch.equal(got_v, fake_quantize(v, QuantSpec(bits, block, "token")))


def test_fp_rows_are_exact() -> None:
    lay = layout(5, None, latent=True)
    k, v = torch.randn(3, 5), torch.randn(3, 5)
    got_k, got_v = lay.decode(lay.encode([k, v]))
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


def test_channel_stream_needs_pages_of_its_group() -> None:
    with pytest.raises(ValueError, match="group size 128"):
        PageLayout([(8, "channel", QuantSpec(4, 128, "channel"))], 16, torch.float32)


def test_token_spans_leave_sealed_channel_bytes() -> None:
    """vLLM may rewrite a token of a sealed page (a prefix-cache hit recomputes the prompt's last token): writing
    only `token_spans` keeps the page's channel codes and scales."""
    lay = layout(70, 4, latent=True, block=16)
    k, v = torch.randn(16, 70), torch.randn(16, 70)
    page = lay.encode([k, v])
    lay.seal(page, [k, None])
    sealed = page.clone()
    rows = lay.encode([k[-1:], v[-1:]])
    for lo, hi in lay.token_spans():
        page[-1:, lo:hi] = rows[:, lo:hi]
    assert torch.equal(page, sealed)
    assert lay.token_spans() == [(lay.streams[1].offset, lay.row_bytes)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kivi_pages_hold_xq_kivi_codes_and_scales(bits: int) -> None:
    """Given the same pre-RoPE K and V, a kivi page holds exactly what xq's KIVI streams store with --window 0
    (`xqcli/cache/kivi.py`): K's codes and per-channel scales of each sealed group of 128, V's per token."""
    spec = CacheSpec.parse(f"kivi-{bits}", window=0)
    lay = PageLayout.of_kind(spec, ["channel", "token"], 192, 0, torch.float32)
    assert lay.row_bytes == 2 * (192 * bits // 8) + 6 + 8  # codes, K's channel blob, codes, V's 2 groups
    n = 2 * 128 + 5
    k, v = torch.randn(n, 192) * 3 + torch.arange(192) / 50, torch.randn(n, 192)
    rows = lay.encode([k, v])
    for p in range(2):
        lay.seal(rows[p * 128:(p + 1) * 128], [k[p * 128:(p + 1) * 128], None])
    for axis, x, got in zip(("channel", "token"), (k, v), lay.stored(rows)):
        st = Stream(1, n, 192, spec.quant(axis, layer=0), spec.window, torch.float32, torch.device("cpu"))
        st.append(x[None], torch.zeros(1, dtype=torch.long), torch.tensor([n]), host_lengths=[0], host_n_new=[n],
                  backend="ref")
        sealed = st.sealed_host(n)
        assert sealed == (2 * 128 if axis == "channel" else n)
        groups = sealed // 128 if axis == "channel" else sealed  # rows of scales: per sealed group, or per token
        assert torch.equal(got.packed, st.codes[0, :sealed])
        assert torch.equal(got.scale, st.scale[0, :groups]) and torch.equal(got.zero, st.zero[0, :groups])


@pytest.mark.parametrize("bits", ["2", "3", "8", "fp"])
@pytest.mark.parametrize("model_name", ["smollm2", "smollm2_mha"])
def test_cl_pages_hold_xq_cl_codes_and_scales(request: pytest.FixtureRequest, model_name: str, bits: str) -> None:
    """Given the same X of every layer, XQuant-CL's pages hold exactly what xq's `XQuantCLCache` stores with
    --window 0 (`xqcli/cache/xquant_cl.py`): every layer's streams quantized alike (base layers and the seed at 4
    bits), and over a prefill, a decode step and a chunk the seed's and deltas' codes and scales (raw values for
    -fp), each delta formed against the accumulator rebuilt from the pages. One request: BLAS rounds a product by
    its rows, and xq multiplies each row's tokens on their own."""
    model = request.getfixturevalue(model_name)
    cfg = model.config
    latent = uses_latents(cfg)
    spec = CacheSpec.parse(f"xquant-cl-{bits}", window=0)
    steps = (9, 1, 3)
    ref = make_cache(model, spec, 1, sum(steps), kernels="off")
    layouts = [layer_layout(spec, i, cfg.kv_dim, latent, torch.float32) for i in range(cfg.num_hidden_layers)]
    for (lay, _), streams in zip(layouts, ref.streams):
        assert [(s.width, s.quant) for s in lay.streams] == [(st.width, st.spec) for st in streams]
    assert [part for _, part in layouts[:4]] == ["plain", "plain", "seed", "delta"]
    chain = range(spec.base_layers - 1, spec.base_layers + 2)  # the seed and two delta layers
    # X of consecutive layers differs a little, as the residual stream's does
    x = torch.randn(len(chain) + 1, sum(steps), cfg.hidden_size) * torch.linspace(0.5, 2, cfg.hidden_size)
    acc = Accumulator()
    rows = {i: torch.zeros(0, layouts[i][0].row_bytes, dtype=torch.uint8) for i in chain}
    n = 0
    for t in steps:
        ref.begin([t], t)
        for j, i in enumerate(chain):
            new = x[0, n:n + t] + 0.1 * x[j + 1, n:n + t]
            ref.update_and_fetch(i, new[None])
            lay, part = layouts[i]
            link = ChainLayer(seed=part == "seed", u=ref.projections()[i].kv.u if latent else None,
                              sealing=latent and bits != "fp")
            if link.seed:
                acc.reset(new, link.sealing)
            prev = acc.next_layer() if link.sealing and not link.seed else acc.at_new_tokens()
            rows[i] = torch.cat([rows[i], lay.encode([link.stream(new, prev)])])
            stored = lay.decode(rows[i])[0]
            acc.add(0, slice(0, t), link.up(stored), link.seed)
            if link.sealing:  # as XqLlamaAttention.rebuild: the new tokens' float64 chain
                acc.seal(slice(0, t), link.up64(stored[n:n + t]), link.seed)
        ref.end()
        n += t
    for i in chain:
        (got,), st = layouts[i][0].stored(rows[i]), ref.streams[i][0]
        if st.spec is None:
            assert torch.equal(got, st.full[0, :n])
        else:
            assert torch.equal(got.packed, st.codes[0, :n])
            assert torch.equal(got.scale, st.scale[0, :n]) and torch.equal(got.zero, st.zero[0, :n])
