"""The engine decodes through the static step (`xqcli.engine.step.DecodeStep`, run by
`xqcli.engine.graph.StepDecoder`) wherever the kernels run: on CUDA by default, captured in a CUDA
graph; on CPU when forced (`kernels="triton"`, the Triton interpreter), eagerly. Its greedy tokens are
the reference path's, rows of different lengths and an unused row included."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_decode_step import INTERPRETED
from test_engine_fused import small_model
from test_kernels_attention import pytestmark as needs_triton

from xqcli.cache.spec import CacheSpec
from xqcli.engine.graph import graph_setting
from xqcli.engine.loop import Engine, collect
from xqcli.engine.step import DecodeStep
from xqcli.errors import InputError

KINDS = [("gqa", "kv"), ("gqa", "kivi-4"), ("gqa", "xquant-4+ch0"), ("mha", "xquant-4+rot"), ("gqa", "xquant-cl-3"),
         ("mha", "xquant-cl-3")]




def engine(shape: str, kind: str, kernels: str, **kw) -> Engine:
    spec = CacheSpec.parse(kind)
    if spec.method != "kv":
        spec = replace(spec, window=4, group_size=8)  # a few steps seal groups and spill the window
    return Engine(small_model(shape, torch.float32), None, spec, context=40, batch=3, kernels=kernels, **kw)


@needs_triton
@INTERPRETED
@pytest.mark.parametrize(("shape", "kind"), KINDS, ids=[f"{s}-{k}" for s, k in KINDS])
def test_engine_decodes_through_the_step(shape, kind, monkeypatch):
    prompts = [list(range(3, 14)), list(range(20, 25))]  # rows of 11 and 5 tokens; row 2 of 3 unused
    want = collect(engine(shape, kind, "off").generate_batch(prompts, max_tokens=10))
    calls = []
    real = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self: calls.append(1) or real(self))
    e = engine(shape, kind, "triton")
    assert e.decode_mode == "eager" and e.decode_note is None  # CPU: no capture, the same step eagerly
    got = collect(e.generate_batch(prompts, max_tokens=10))
    assert len(calls) == 9  # every decode step after the first token (sampled from prefill's logits)
    assert [got[r]["tokens"] for r in got] == [want[r]["tokens"] for r in want]
    assert e.cache.host_lengths == [11 + 9, 5 + 9, 0] == e.cache.lengths.tolist()


@needs_triton
@INTERPRETED
def test_engine_falls_back_to_the_reference_path_with_a_note():
    spec = replace(CacheSpec.parse("xquant-4"), quantize_partial=True)
    e = Engine(small_model("gqa", torch.float32), None, spec, context=24, kernels="triton")
    assert e._graph is None and "paper protocol" in e.decode_note
    assert len(collect(e.generate([1, 2, 3], max_tokens=3))[0]["tokens"]) == 3


def test_xq_graph_setting(monkeypatch):
    assert graph_setting() == "on"
    monkeypatch.setenv("XQ_GRAPH", "OFF")
    assert graph_setting() == "off"
    monkeypatch.setenv("XQ_GRAPH", "maybe")
    with pytest.raises(InputError, match="XQ_GRAPH"):
        graph_setting()
    with pytest.raises(InputError, match="kernels"):
        Engine(small_model("gqa", torch.float32), None, "kv", context=8, kernels="fast")
