"""bench/graph_check.py's synced protocol (issue 13, item 5): `load_into` gives a cache another cache's stored
data, so the step under test starts where the reference path is, and keeps the lengths tensor a captured step
reads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_engine_fused import small_model

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.spec import CacheSpec
from xqcli.load import make_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from graph_check import blas_threads, load_into, stored_differences  # noqa: E402


@pytest.mark.parametrize("kind", ["kivi-4", "xquant-4", "xquant-cl-3"])
@torch.inference_mode()  # as graph_check runs: the lengths are inference tensors, updated in place
def test_load_into_gives_the_same_state(kind):
    model = small_model("gqa", torch.float32)
    spec = CacheSpec.parse(kind, window=2, group_size=4)
    artifacts = Artifacts()
    source, target = (make_cache(model, spec, 1, 24, artifacts=artifacts, kernels="off") for _ in range(2))
    gen = torch.Generator().manual_seed(0)
    model(torch.randint(0, model.config.vocab_size, (1, 11), generator=gen), source)
    model(torch.randint(0, model.config.vocab_size, (1, 11), generator=gen), target)
    assert stored_differences(target, source)["code_bytes_differ"] > 0  # other prompts: other codes
    lengths = target.lengths
    load_into(target, source)
    assert target.lengths is lengths and target.host_lengths == source.host_lengths
    assert stored_differences(target, source) == {"code_bytes_differ": 0, "code_bytes": sum(
        st.codes.numel() for layer in source.streams for st in layer if st.spec is not None), "scales_zeros_differ": 0}
    tok = torch.randint(0, model.config.vocab_size, (1, 1), generator=gen)
    assert torch.equal(model(tok, target), model(tok, source))  # the window and the CL deltas came along too


@torch.inference_mode()
def test_load_into_a_float64_cache():
    """`--float64`: the float64 reference's cache takes the float32 one's stored data (cast), the same codes."""
    spec = CacheSpec.parse("xquant-cl-3", window=2, group_size=4)
    models = [small_model("gqa", dtype) for dtype in (torch.float32, torch.float64)]
    source, target = (make_cache(m, spec, 1, 24, artifacts=Artifacts(), kernels="off") for m in models)
    models[0](torch.randint(0, 96, (1, 11), generator=torch.Generator().manual_seed(0)), source)
    load_into(target, source)
    assert stored_differences(target, source)["code_bytes_differ"] == 0
    assert target.streams[-1][0].tail.dtype == torch.float64 and target.host_lengths == [11]


def test_blas_threads_sets_then_restores():
    """`--threads N`: the other reference runs at N threads; everything else at the count it had."""
    before = torch.get_num_threads()
    with blas_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with blas_threads(None):
        assert torch.get_num_threads() == before
