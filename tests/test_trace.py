"""The launch tracer (xqcli.readouts.trace): what it counts, what it intercepts, and that it tells steps apart."""

from __future__ import annotations

import os

import pytest
import torch
from xqcli.kernels._triton import cdiv, jit, tl

from xqcli.load import make_cache
from xqcli.readouts.trace import LaunchTracer, differences, trace_step, trace_steps

needs_triton = pytest.mark.skipif(
    not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()), reason="needs Triton")


@pytest.mark.parametrize("inference", [False, True])
def test_counts_a_known_sequence_of_aten_ops(inference):
    """Launches only: views, no-op conversions and allocations are not; composite ops are counted as
    the backend ops they run (the same with or without inference mode)."""
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    with torch.inference_mode(inference), LaunchTracer() as tr:
        y = x @ w  # matmul -> mm
        z = y.t()  # view
        z = z.contiguous()  # copy
        y.add_(1)  # in place
        torch.empty(3)  # allocation only
        y.view(-1).float()  # view, then a conversion to the dtype it has
        y.to(torch.float64)  # a real conversion
        torch.nn.functional.linear(x, w.t())  # t (view) + mm
    assert [launch.name for launch in tr.launches] == [
        "aten.mm.default", "aten.clone.default", "aten.add_.Tensor", "aten._to_copy.default", "aten.mm.default"]
    assert tr.count_by_kind() == {"aten": 5, "triton": 0}
    mm = tr.launches[0]
    assert mm.shapes == ((4, 8), (8, 3), (4, 3)) and mm.dtypes == ("float32",) * 3
    assert mm.ptrs[:2] == (x.data_ptr(), w.data_ptr()) and mm.local == (False, False, True)
    assert tr.launches[2].scalars == (1,) and tr.host_reads == []


@jit
def _fill_kernel(out_ptr, n, value, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, value, mask=i < n)


@needs_triton
def test_intercepts_a_triton_launch_without_running_it():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.zeros(10, device=device)
    with LaunchTracer() as tr:
        _fill_kernel[(cdiv(10, 4),)](out, 10, 7.0, BLOCK=4)
    assert torch.count_nonzero(out) == 0  # not run
    (launch,) = tr.launches
    assert (launch.kind, launch.name, launch.grid) == ("triton", "_fill_kernel", (3,))
    assert launch.shapes == ((10,),) and launch.ptrs == (out.data_ptr(),) and launch.local == (False,)
    assert launch.scalars == (("n", 10), ("value", "7.0")) and launch.constexprs == (("BLOCK", 4),)
    _fill_kernel[(cdiv(10, 4),)](out, 10, 7.0, BLOCK=4)  # outside the tracer Triton runs again
    assert torch.equal(out, torch.full_like(out, 7.0))


def test_records_host_reads(tiny_models):
    cache = make_cache(tiny_models["llama"], "kv", 2, 8)
    cache.lengths = torch.tensor([3, 1])  # drops the host mirror: the next look reads it back
    t = torch.tensor([0.0, 2.0])
    with LaunchTracer() as tr:
        assert cache.host_lengths == [3, 1]
        assert int(t.sum()) == 2
        t.nonzero()
    what = [(h.what, h.function) for h in tr.host_reads]
    assert what == [("tolist", "host_lengths"), ("aten._local_scalar_dense", "test_records_host_reads"),
                    ("aten.nonzero (output size read back)", "test_records_host_reads")]
    assert tr.host_reads[0].where.endswith(".py:" + tr.host_reads[0].where.rsplit(":", 1)[1])


def _signature(step, addresses: str = "persistent"):
    with LaunchTracer() as tr:
        step()
    return tr.signature(addresses)


def test_signatures_of_a_static_step_are_equal_and_a_growing_one_differ():
    buf, w = torch.zeros(16), torch.randn(16)
    state = {"n": 4, "acc": torch.zeros(2)}

    def static():  # in place on persistent buffers, through a temporary
        tmp = buf * 0.5 + w
        buf.copy_(tmp)

    def growing():  # reads one more element every step
        buf[:state["n"]].sum()
        state["n"] += 1

    def rebinding():  # a new tensor each step where a graph needs the same one
        state["acc"] = state["acc"] + 1

    a, b = _signature(static), _signature(static)
    assert a == b and len(a) == 3 and differences(a, b) == []
    a, b = _signature(growing), _signature(growing)
    assert a != b and differences(a, b) == ["launch 0 (aten aten.sum.default): shapes ((4,), ()) vs ((5,), ())"]
    a, b = _signature(rebinding), _signature(rebinding)
    assert a != b and [d.split(":")[0] for d in differences(a, b)] == ["launch 0 (aten aten.add.Tensor)"]
    assert _signature(rebinding, "all") != _signature(rebinding, "all")


def test_kv_decode_steps_today(tiny_models):
    """Today's `kv` decode step is not static: the keys grow by one each step (S is a shape, not a
    device-side length). The lead turns this into the 300-step equality test once the step is static."""
    model = tiny_models["llama"]
    cache = make_cache(model, "kv", 1, 12, kernels="triton")
    steps = trace_steps(model, cache, 3, [5])
    assert steps[1].counts == steps[2].counts and steps[1].counts["triton"] == 0
    assert list(steps[1].sections) == ["before", "layer 0", "layer 1", "after"]
    grown = set()  # every dimension that differs between the two steps' launches
    for x, y in zip(steps[1].signature, steps[2].signature):
        for sx, sy in zip(x.shapes, y.shapes):
            grown |= {(dx, dy) for dx, dy in zip(sx, sy) if dx != dy}
    assert grown == {(7, 8)}  # 5 prompt tokens + the 2nd step's token = 7 keys, then 8
    assert all([h.what for h in s.host_reads] == ["torch.tensor"] for s in steps)  # begin()'s new-token counts


@needs_triton
def test_fused_decode_step_records_the_kernels_and_not_their_work(tiny_models):
    """A fused XQuant step through the cache: three attention launches per layer (beside whatever else
    the step launches), recorded with their grids and sections."""
    model = tiny_models["mha"]
    cache = make_cache(model, "xquant-4", 1, 12, kernels="triton")
    model(torch.randint(0, 200, (1, 5)), cache)
    tr = trace_step(model, cache, torch.randint(0, 200, (1, 1)))
    triton = [launch for launch in tr.launches if launch.kind == "triton" and launch.name.startswith("_xq_")]
    assert [launch.name for launch in triton] == ["_xq_scores_kernel", "_xq_pv_kernel", "_xq_reduce_kernel"] * 2
    assert all(launch.grid[:2] == (1, model.config.num_key_value_heads) for launch in triton)
    assert {launch.section for launch in triton} == {"layer 0", "layer 1"}
