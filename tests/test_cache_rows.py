"""Steps over some rows of a cache (`ModelCache.begin(rows=...)`, the engine's `RowSubset`): the rows' logits
are bit for bit those of the same step over every row with the other rows emptied for it (a row not in a step,
however long, neither changes nor widens it), and the stored data is the same."""

from __future__ import annotations

import assets
import pytest
import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.config import ModelConfig
from xqcli.engine.loop import RowSubset
from xqcli.load import build_model, make_cache

# window 4 and groups of 8: rows hold sealed, waiting and (per-channel) partial-block tokens; base_layers=1:
# on the 2-layer tiny models layer 0 seeds the CL accumulator and layer 1 is a delta layer.
SETTINGS = {"window": 4, "group_size": 8, "base_layers": 1}
KINDS = ["kv", "kivi-4", "kivi-fp", "xquant-4", "xquant-fp", "xquant-4+rot", "xquant-4+ch0", "xquant-cl-4",
         "xquant-cl-fp", "xquant-cl-4+rot", "paper:xquant-4", "paper:kivi-2", "paper:xquant-cl-4"]

# (row: new tokens) per step, on a 4-row cache; dict order is the order the model holds the rows in.
# A prefill of uneven rows, then decode and prompt chunks of some rows while others (a longer one
# among them, and a free one) wait; steps cross sealing points of the window and of whole groups.
STEPS = [{0: 21, 1: 9, 3: 30}, {1: 1, 0: 1}, {2: 11}, {0: 1, 2: 5, 1: 1}, {3: 1}, {2: 1, 1: 7},
         {0: 1, 1: 1, 2: 1}, {1: 1}]


class AllRows:
    """The reference: the same step with every row through the cache (0 new tokens for the others), X
    scattered into a (B, T, d) batch and the rows' K/V and mask picked out of the whole batch's. The other
    rows hold nothing during the step (their lengths are set back after it): a row that is not in a step
    must not change it, however long it is (it would widen the step's K/V to its own length)."""

    def __init__(self, cache, rows: list[int]) -> None:
        self.cache, self.rows = cache, rows
        self.index = torch.tensor(rows)

    def begin(self, n_new: list[int], width: int) -> torch.Tensor:
        full = [0] * self.cache.batch
        for r, k in zip(self.rows, n_new):
            full[r] = k
        self.held = list(self.cache.host_lengths)
        emptied = [n if r in self.rows else 0 for r, n in enumerate(self.held)]
        self.cache.set_lengths(torch.tensor(emptied), emptied)
        self.positions = self.cache.begin(full, width)[self.index]
        return self.positions

    def attention_mask(self) -> torch.Tensor | None:
        mask = self.cache.attention_mask()
        return None if mask is None else mask[self.index]

    def step_total(self) -> int:
        return self.cache.step_total()

    def fused_attention(self, layer: int, x: torch.Tensor, q: torch.Tensor) -> None:
        return None

    def update_and_fetch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = x.new_zeros((self.cache.batch, *x.shape[1:]))
        full[self.index] = x
        k, v = self.cache.update_and_fetch(layer, full)
        return k[self.index], v[self.index]

    def end(self) -> None:
        self.cache.end()
        lengths = [after if r in self.rows else held for r, (held, after) in
                   enumerate(zip(self.held, self.cache.host_lengths))]
        self.cache.set_lengths(torch.tensor(lengths), lengths)


@pytest.fixture(scope="module")
def models(tiny_models):
    """The tiny llama (GQA, X cached), qwen2 (biases) and mha models, and a qwen2 with one KV head: GQA
    narrow enough (2·d_kv < d) for the latent streams (X·U_k, X·U_v; +ch0; CL on X·U_kv)."""
    cfg = assets.tiny_config("qwen2") | {"num_key_value_heads": 1}
    latent = build_model(ModelConfig.from_dict(cfg), assets.tiny_tensors(cfg, 5))
    assert uses_latents(latent.config)
    return {k: tiny_models[k] for k in ("llama", "qwen2", "mha")} | {"latent": latent}


def spec_of(name: str) -> CacheSpec:
    paper, _, kind = name.rpartition(":")
    return CacheSpec.parse(kind, **SETTINGS, quantize_partial=bool(paper))


def step_logits(model, step_cache, step: dict[int, int], tokens: torch.Tensor) -> torch.Tensor:
    """Logits (k, T, V) of one step of `step`'s rows (right-padded to the longest) over `step_cache`."""
    rows, n, lengths = list(step), list(step.values()), step_cache.cache.host_lengths
    ids = torch.stack([tokens[r, lengths[r]:lengths[r] + max(n)] for r in rows])
    return model(ids, step_cache, n)


@pytest.mark.parametrize(("model_kind", "name"), [(m, n) for n in KINDS for m in ("llama", "mha", "qwen2", "latent")
                                                 if "+ch0" not in n or m == "latent"])  # +ch0 needs latents
def test_row_subset_steps_equal_steps_over_all_rows(models, model_kind, name):
    model = models[model_kind]
    tokens = torch.randint(0, model.config.vocab_size, (4, 64))
    artifacts = Artifacts()
    subset, whole = (make_cache(model, spec_of(name), 4, 64, artifacts=artifacts, kernels="off") for _ in range(2))
    for step in STEPS:
        rows = list(step)
        got = step_logits(model, RowSubset(subset, rows), step, tokens)
        want = step_logits(model, AllRows(whole, rows), step, tokens)
        for i, r in enumerate(rows):  # padded positions' logits are junk in both: compare the valid ones
            assert torch.equal(got[i, :step[r]], want[i, :step[r]]), (step, r)
        assert subset.host_lengths == whole.host_lengths
    a, b = subset.state_dict(), whole.state_dict()
    for state in (a, b):  # the CL accumulator of a subset step holds only its rows: a smaller workspace
        state["meta"].pop("workspace_bytes", None)
    assert a["meta"] == b["meta"] and a["tensors"].keys() == b["tensors"].keys()
    assert all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])


def test_row_subset_shapes_and_bounded_positions(models):
    """A subset step hands out (k, ...) positions, mask and K/V; padded positions stay below step_total
    (the RoPE tables and the mask end there), valid ones are the rows' own."""
    model = models["latent"]
    cache = make_cache(model, CacheSpec.parse("xquant-4+ch0", **SETTINGS), 3, 64, kernels="off")
    cache.begin([20, 3, 9], 20)
    cache.end()
    pos = cache.begin([1, 4], 4, rows=[0, 2])
    assert pos.tolist() == [[20, 20, 20, 20], [9, 10, 11, 12]]  # row 0: one token at 20, the rest clamped
    assert cache.step_total() == 21 and cache.rows == [0, 2] and cache.row_subset
    assert cache.attention_mask().shape == (2, 1, 4, 21)
    x = torch.randn(2, 4, model.config.hidden_size)
    k, v = cache.update_and_fetch(0, x)
    assert k.shape == v.shape == (2, model.config.num_key_value_heads, 21, model.config.head_dim)
    cache.update_and_fetch(1, x)
    cache.end()
    assert cache.host_lengths == [21, 3, 13] and not cache.row_subset
    cache.begin([1], 1, rows=[1])  # the idle rows 0 and 2 are longer: they do not widen row 1's step
    assert cache.step_total() == 4 and cache.attention_mask() is not None and cache.attention_mask().shape[-1] == 4
    k, _ = cache.update_and_fetch(0, torch.randn(1, 1, model.config.hidden_size))
    assert k.shape[2] == 4
    cache.update_and_fetch(1, torch.randn(1, 1, model.config.hidden_size))
    cache.end()
    assert cache.host_lengths == [21, 4, 13]
    with pytest.raises(ValueError, match="distinct rows"):
        cache.begin([1, 1], 1, rows=[1, 1])
