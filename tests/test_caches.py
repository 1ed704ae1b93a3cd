"""Cache kinds: the paper's losslessness algebra, windows and sealing, batching, names, memory accounting."""

from __future__ import annotations

import pytest
import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.cache.stream import Stream
from xqcli.load import make_cache
from xqcli.errors import InputError
from xqcli.kernels.quant import QuantSpec, fake_quantize
from xqcli.readouts.plan import plan, shape_config

KINDS_FP = ["kivi-fp", "xquant-fp", "xquant-cl-fp", "xquant-fp+ch0", "xquant-fp+rot", "xquant-cl-fp+rot"]


def stepped(model, spec, tokens: torch.Tensor, prefix: int, artifacts: Artifacts | None = None) -> torch.Tensor:
    """Logits of a prefill of `prefix` tokens, then one token at a time, through a fresh cache."""
    cache = make_cache(model, spec, tokens.shape[0], tokens.shape[1], artifacts=artifacts)
    outs = [model(tokens[:, :prefix], cache)]
    outs += [model(tokens[:, i:i + 1], cache) for i in range(prefix, tokens.shape[1])]
    return torch.cat(outs, 1)


@pytest.mark.parametrize(("kind", "name"), [(k, n) for n in KINDS_FP for k in ("llama", "mistral", "qwen2", "mha", "latent")
                                         if "+ch0" not in n or k == "latent"])  # +ch0 needs latents
def test_unquantized_kinds_equal_kv(tiny_models, kind, name):
    """With quantization off every kind is exact algebra (MHA, GQA-SVD, GQA-CL): the paper's derivation."""
    model = tiny_models[kind]
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    ref = model(tokens)
    for window in (0, 7):
        # base_layers=1: on these 2-layer models the last layer is a CL delta layer
        out = stepped(model, CacheSpec.parse(name, window=window, group_size=16, base_layers=1), tokens, prefix=23)
        assert (out - ref).abs().max() <= 1e-4


def test_unquantized_real_model(smollm2, smollm2_mha):
    """Losslessness on real weights: SmolLM2 (GQA latents) and its MHA variant (X cached)."""
    tokens = torch.randint(0, 49152, (1, 48))
    for model in (smollm2, smollm2_mha):
        ref = model(tokens)
        artifacts = Artifacts()  # one per model: the SVDs run once
        for name in [n for n in KINDS_FP if "+ch0" not in n or uses_latents(model.config)]:
            out = stepped(model, CacheSpec.parse(name, window=0), tokens, prefix=40, artifacts=artifacts)
            assert (out - ref).abs().max() <= 1e-4, name


def test_latent_choice(tiny_models, smollm2):
    assert uses_latents(smollm2.config)  # 2·192 < 576
    assert not uses_latents(tiny_models["mha"].config)


@pytest.mark.parametrize("method", ["kivi", "xquant", "xquant-cl", "xquant+ch0"])
def test_quantized_error_shrinks_with_bits_and_is_deterministic(tiny_models, method):
    model = tiny_models["latent" if "+ch0" in method else "llama"]
    tokens = torch.randint(0, model.config.vocab_size, (1, 50))
    ref = model(tokens)
    base, _, variant = method.partition("+")
    errs = []
    for bits in (2, 4, 8):
        name = f"{base}-{bits}" + (f"+{variant}" if variant else "")
        a = stepped(model, CacheSpec.parse(name, window=0, group_size=16, base_bits=bits), tokens, prefix=30)
        b = stepped(model, CacheSpec.parse(name, window=0, group_size=16, base_bits=bits), tokens, prefix=30)
        assert torch.equal(a, b)
        errs.append(float((a - ref).abs().mean()))
    assert errs[0] > errs[1] > errs[2] > 0


def test_window_keeps_newest_tokens_exact(tiny_models):
    """Tokens inside the fp window are returned exactly; with a window as long as the text, nothing changes."""
    model = tiny_models["llama"]
    tokens = torch.randint(0, model.config.vocab_size, (1, 30))
    ref = model(tokens)
    out = stepped(model, CacheSpec.parse("xquant-2", window=30, group_size=8), tokens, prefix=10)
    assert (out - ref).abs().max() <= 1e-4
    out = stepped(model, CacheSpec.parse("xquant-2", window=4, group_size=8), tokens, prefix=10)
    assert (out - ref).abs().max() > 1e-3


def test_paper_protocol_prefill_equals_fake_quant_of_whole_sequence():
    """quantize_partial: a per-channel stream returns the whole sequence as if quantized in g-token blocks."""
    x = torch.randn(1, 37, 12)
    q = QuantSpec(3, 16, "channel")
    st = Stream(1, 64, 12, q, 0, torch.float32, torch.device("cpu"), quantize_partial=True)
    append(st, x, [0], [37])
    got = st.values(torch.tensor([37]), 37, [37])[0]
    assert st.counts(37) == (32, 5)
    assert torch.equal(got, fake_quantize(x[0], q))


def append(st: Stream, new: torch.Tensor, lengths: list[int], n_new: list[int]) -> None:
    """`Stream.append` of host counts, as a CPU cache calls it (device tensors with their host mirror)."""
    st.append(new, torch.tensor(lengths), torch.tensor(n_new), host_lengths=lengths, host_n_new=n_new)


def test_stream_sealing_rules():
    x = torch.randn(50, 10)
    tok = Stream(1, 64, 10, QuantSpec(4, 4, "token"), 6, torch.float32, torch.device("cpu"))
    ch = Stream(1, 64, 10, QuantSpec(4, 8, "channel"), 6, torch.float32, torch.device("cpu"))
    for i in range(50):
        append(tok, x[None, i:i + 1], [i], [1])
        append(ch, x[None, i:i + 1], [i], [1])
        assert tok.counts(i + 1)[1] == min(i + 1, 6)
        sealed, waiting = ch.counts(i + 1)
        assert sealed % 8 == 0 and waiting <= 6 + 7 and sealed + waiting == i + 1
    # sealed values are exactly the codes of the tokens that left the window, quantized once
    n = ch.counts(50)[0]
    assert n == 40
    assert torch.equal(tok.values(torch.tensor([50]), 44)[0], fake_quantize(x[:44], QuantSpec(4, 4, "token")))
    assert torch.equal(ch.values(torch.tensor([50]), n)[0], fake_quantize(x[:n], QuantSpec(4, 8, "channel")))
    assert torch.equal(ch.waiting(0, 50), x[n:])
    assert torch.equal(ch.values(torch.tensor([50]), 50)[0, n:], x[n:])


@pytest.mark.parametrize("name", ["kv", "kivi-fp", "xquant-fp", "xquant-cl-fp", "kivi-4", "xquant-3", "xquant-cl-2"])
def test_batch_rows_with_different_lengths_match_single_rows(tiny_models, name):
    """Right-padded rows are independent: each row equals the same prompt run alone.

    Batched matmuls round differently in the last bit, which can flip a quantization code sitting on a
    rounding boundary; quantized kinds are therefore held to 1e-4 on average and 5e-2 at worst."""
    model = tiny_models["qwen2"]
    v = model.config.vocab_size
    lens = [19, 7, 12]
    prompts = [torch.randint(0, v, (n,)) for n in lens]
    batch = torch.zeros(3, max(lens), dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, :len(p)] = p
    spec = CacheSpec.parse(name, window=3, group_size=4)
    cache = make_cache(model, spec, 3, 40)
    out = model(batch, cache, torch.tensor(lens))
    nxt = torch.randint(0, v, (3, 1))
    step = model(nxt, cache)
    for i, p in enumerate(prompts):
        c1 = make_cache(model, spec, 1, 40)
        o1 = model(p[None], c1)
        s1 = model(nxt[i:i + 1], c1)
        for got, want in ((out[i, :len(p)], o1[0]), (step[i], s1[0])):
            diff = (got - want).abs()
            if spec.bits is None:
                assert diff.max() <= 1e-4
            else:
                assert diff.mean() <= 1e-4 and diff.max() <= 5e-2
    assert cache.lengths.tolist() == [n + 1 for n in lens]


def test_cl_is_closed_loop(tiny_models):
    """The delta of layer i is formed against the reconstructed X̂_{i-1}: re-deriving X̂ from the stored
    deltas gives the accumulator exactly (no drift), and the error does not grow across layers like an
    open-loop chain would."""
    model = tiny_models["mha"]
    tokens = torch.randint(0, model.config.vocab_size, (1, 24))
    cache = make_cache(model, CacheSpec.parse("xquant-cl-2", window=0, group_size=16, base_layers=1), 1, 24)
    model(tokens, cache)
    # decode X̂ of the last layer from the stored base plus deltas, as a decoder would
    n = torch.tensor([24])
    xh = cache.streams[0][0].values(n, 24)[0]
    for layer in range(1, model.config.num_hidden_layers):
        xh = xh + cache.streams[layer][0].values(n, 24)[0]
    # the K it rebuilds equals what attention used at the last step (from the running accumulator)
    last = model.layers[-1].self_attn
    cache2 = make_cache(model, CacheSpec.parse("xquant-cl-2", window=0, group_size=16, base_layers=1), 1, 25)
    model(tokens, cache2)
    assert torch.allclose(xh @ last.k_proj.weight.T, _acc_k(model, cache2, tokens), atol=1e-5)


def _acc_k(model, cache, tokens):
    """K (pre-RoPE) of the last layer computed by the cache on a one-token step with the same history."""
    seen = {}
    orig = cache.finish_kv

    def spy(k, v):
        seen["k"] = k
        return orig(k, v)

    cache.finish_kv = spy
    model(tokens[:, :1], cache)
    return seen["k"][0, :tokens.shape[1]]


@pytest.mark.parametrize("bad", ["xquant-5", "kivi-16", "foo-4", "xquant-4+nope", "kv-4", "xquant-cl-1"])
def test_bad_names(bad):
    with pytest.raises(InputError):
        CacheSpec.parse(bad)


def test_bad_settings():
    with pytest.raises(InputError, match="group size"):
        CacheSpec.parse("xquant-4", group_size=0)
    with pytest.raises(InputError, match="bits"):
        CacheSpec.parse("xquant", bits=5)
    assert CacheSpec.parse("xquant", bits=2).name == "xquant-2"
    assert CacheSpec.parse("xquant-cl-3+ch0").name == "xquant-cl-3+ch0"


def test_plan_matches_paper_and_allocated_caches():
    """The per-token numbers of docs/design.md §7, from caches allocated at those shapes."""
    rows = {r.kind: r for r in plan(shape_config("llama-3.1-8b"), ["kv", "xquant-4", "xquant-3", "xquant-2"])}
    assert [rows[k].bytes_per_token for k in ("kv", "xquant-4", "xquant-3", "xquant-2")] == [131072, 34816, 26624, 18432]
    rows = {r.kind: r for r in plan(shape_config("llama-2-7b"), ["xquant-4", "xquant-cl-2"])}
    assert rows["xquant-4"].bytes_per_token == 69632 and rows["xquant-cl-2"].bytes_per_token == 39936
    for r in rows.values():
        assert r.bytes_per_token == r.paper_bytes_per_token


def test_nbytes_of_a_filled_cache_matches_plan(smollm2):
    """A real cache filled with n tokens holds plan's bytes/token × n (payload + scales), window 0."""
    n = 256
    rows = {r.kind: r for r in plan(smollm2.config, ["kivi-4", "xquant-4", "xquant-cl-3"], dtype=torch.float32)}
    tokens = torch.randint(0, 49152, (1, n))
    artifacts = Artifacts()
    for name, row in rows.items():
        cache = make_cache(smollm2, CacheSpec.parse(name, window=0), 1, n, artifacts=artifacts)
        smollm2(tokens, cache)
        b = cache.nbytes()
        assert b.payload + b.scales == row.bytes_per_token * n, name
        assert b.fp_window == 0


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotations_are_exact_algebra_and_help_per_token_quantization(tiny_models, kind):
    """+rot with quantization off reproduces kv (random orthogonal too); on, it changes the codes."""
    model = tiny_models["mha"]
    artifacts = Artifacts(rotation=(kind, 7))
    tokens = torch.randint(0, model.config.vocab_size, (1, 30))
    ref = model(tokens)
    for name in ("xquant-fp+rot", "xquant-cl-fp+rot"):
        spec = CacheSpec.parse(name, window=0, base_layers=1)
        assert (stepped(model, spec, tokens, prefix=20, artifacts=artifacts) - ref).abs().max() <= 1e-4
    plain = stepped(model, CacheSpec.parse("xquant-4", window=0, group_size=16), tokens, prefix=20,
                    artifacts=artifacts)
    rot = stepped(model, CacheSpec.parse("xquant-4+rot", window=0, group_size=16), tokens, prefix=20,
                  artifacts=artifacts)
    assert not torch.equal(plain, rot)


@pytest.mark.parametrize("bad,needle", [
    ("kivi-4+rot", "+rot applies to xquant"),
    ("kivi-4+ch0", "+ch0 applies to xquant"),
    ("xquant-2.5", "bits must be one of 2, 3, 4, 8 (got 2.5)"),
    ("xquant-3+mix", "unknown variant +mix"),
    ("xquant-4+zip", "unknown variant +zip"),
])
def test_bad_variants(bad, needle):
    with pytest.raises(InputError) as e:
        CacheSpec.parse(bad)
    assert needle in str(e.value)


@pytest.mark.parametrize("name", ["xquant-4+ch0", "xquant-cl-3+ch0"])
def test_ch0_needs_latents(tiny_models, name):
    """+ch0 keeps channel 0 of X·U_k: a model that caches X itself (MHA, or GQA with 2·d_kv >= d) has no such
    channel, and the kind is refused rather than run as plain xquant under another name."""
    for kind in ("mha", "llama"):
        with pytest.raises(InputError, match="caches X itself") as e:
            make_cache(tiny_models[kind], CacheSpec.parse(name), 1, 16)
        assert e.value.hint == f"drop +ch0: --cache {name.removesuffix('+ch0')}"
    assert make_cache(tiny_models["latent"], CacheSpec.parse(name), 1, 16).spec.fp16_channel0


@pytest.mark.parametrize("name", ["kv", "kivi-4", "xquant-3", "xquant-cl-2", "xquant-fp", "xquant-4+ch0"])
def test_snapshot_restore_repeats_a_decode_step(tiny_models, name):
    """After restore, the same decode steps give the same logits again (what bench times repeatedly)."""
    model = tiny_models["latent" if "+ch0" in name else "qwen2"]
    v = model.config.vocab_size
    cache = make_cache(model, CacheSpec.parse(name, window=3, group_size=4), 2, 40)
    model(torch.randint(0, v, (2, 17)), cache, [17, 11])
    snap = cache.snapshot()
    steps = torch.randint(0, v, (4, 2, 1))
    first = [model(t, cache) for t in steps]
    cache.restore(snap)
    assert cache.host_lengths == [17, 11] and cache.lengths.tolist() == [17, 11]
    again = [model(t, cache) for t in steps]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_bytes_per_token_of_a_filled_cache_matches_plan(tiny_models):
    """Stored bytes per token past the window: plan's number for every kind; None before anything is stored."""
    from xqcli.load import measured_bytes_per_token
    from xqcli.readouts.plan import meta_model

    for name in ("kv", "kivi-4", "xquant-3", "xquant-cl-2", "xquant-2+ch0"):
        model = tiny_models["latent" if "+ch0" in name else "llama"]
        meta = meta_model(model.config, torch.float32)
        tokens = torch.randint(0, model.config.vocab_size, (1, 64))
        spec = CacheSpec.parse(name, window=8, group_size=16)
        cache = make_cache(model, spec, 1, 64)
        assert cache.bytes_per_token() is None, name
        model(tokens, cache)
        assert cache.bytes_per_token() == measured_bytes_per_token(meta, spec)[0], name
