"""bench/bench_kernels.py: its reference checks, FLOP/byte accounting and table, run on CPU.

On CPU the script runs with `--interpret` (Triton interpreter, tiny shapes, float32): the timings
mean nothing there, but everything a GPU session would trip over (building the inputs, checking
each provider against its reference, rendering, the JSON) runs. On a GPU it runs for real, briefly.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from xqcli.kernels import _triton

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_kernels.py"

pytestmark = pytest.mark.skipif(not (_triton.interpreting() or (_triton.HAS_TRITON and torch.cuda.is_available())),
                                reason="needs Triton: the interpreter (CPU) or a GPU")


def load_script():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def mode_args() -> list[str]:
    return ["--interpret"] if _triton.interpreting() else ["--rep", "5"]


SDPA, TOL = ("sdpa-fp32", 1e-5) if _triton.interpreting() else ("sdpa-bf16", 2e-2)  # float32 on CPU, bf16 on GPUs


@pytest.mark.parametrize(("shape", "bits", "lengths"), [("tiny", 4, "40,300"), ("tiny-mha", 3, "17,100")])
def test_bench_kernels_checks_and_reports(tmp_path, capsys, shape, bits, lengths):
    bench = load_script()
    out = tmp_path / "r.json"
    assert bench.main([*mode_args(), "--shape", shape, "--bits", str(bits), "--lengths", lengths,
                       "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["tokens"], r["provider"]) for r in rows] == [
        (int(n), p) for n in lengths.split(",") for p in (f"xquant-{bits}bit", f"kivi-{bits}bit", SDPA)]
    s = bench.SHAPES[shape]
    for r in rows:
        assert r["check_rms_ratio"] < TOL  # against float32 references
        assert r["ms"] > 0 and r["flops"] > 0 and r["bytes"] > 0
        if r["provider"].startswith("xquant"):  # the K rebuild dominates the counted FLOPs
            width = s.d_kv if s.latent else s.d_model
            assert r["flops"] > 2 * r["tokens"] * width * s.d_kv
    assert data["meta"]["shape"]["name"] == shape
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert sum(line.startswith("|") for line in lines) == 2 + len(rows)  # header, rule, one line per row


def test_bench_kernels_paged_providers(tmp_path):
    """The paged providers read the same codes from shuffled pages: the same checks as their contiguous twins."""
    bench = load_script()
    out = tmp_path / "r.json"
    assert bench.main([*mode_args(), "--providers", "xquant,xquant-paged,kivi-paged", "--lengths", "300",
                       "--json", str(out)]) == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == ["kivi-paged-4bit", "xquant-4bit", "xquant-paged-4bit"]
    assert rows["xquant-paged-4bit"]["check_rms_ratio"] == rows["xquant-4bit"]["check_rms_ratio"]
    assert rows["kivi-paged-4bit"]["check_rms_ratio"] < TOL
    with pytest.raises(SystemExit, match="unknown provider 'sdpa-paged'"):
        bench.main([*mode_args(), "--providers", "sdpa-paged", "--lengths", "40"])


def test_bench_kernels_refuses_to_time_a_wrong_kernel(monkeypatch):
    import xqcli.kernels.xquant_attention as xq

    bench = load_script()
    real = xq.xquant_attention

    def off_by_a_bit(*args, **kwargs):
        return real(*args, **kwargs) * 1.05

    monkeypatch.setattr(xq, "xquant_attention", off_by_a_bit)
    with pytest.raises(SystemExit, match="xquant at N=40: output differs from its reference"):
        bench.main([*mode_args(), "--providers", "xquant", "--lengths", "40"])
