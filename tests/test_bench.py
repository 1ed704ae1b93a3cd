"""`xq bench`: one small measurement of every cache kind rendered in every format, checked against
`xq plan` and docs/bench.schema.json; the cost model against docs/design.md §8; gates, refusal and extras
via the CLI.

The measurement (SmolLM2-135M shapes, random weights, contexts 256 and 512, 2 decode tokens x 2 reps) runs
once per session through the library; the CLI runs use a single kind at one context to stay short.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from unittest import mock

import pytest
import torch

import xqcli.readouts.bench.run as bench_run
from schemas import assert_valid
from xqcli.cache.spec import CacheSpec
from xqcli.cli import main
from xqcli.errors import InputError, ResourceError
from xqcli.load import make_cache
from xqcli.readouts import bench
from xqcli.readouts.bench import cost, measure
from xqcli.readouts.plan import SHAPES, plan, shape_config
from xqcli.units import parse_token_list

SMOL = ["--shape", "smollm2-135m", "--context", "256", "--decode-tokens", "1", "--reps", "1", "--warmup", "0",
        "--dtype", "float32", "--device", "cpu"]


def has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# -------------------------------------------------------------------------- the shared measurement


@pytest.fixture(scope="module")
def result():
    return bench.run_bench(shape="smollm2-135m", contexts=[256, 512], kinds=list(bench.BENCH_KINDS),
                           decode_tokens=2, reps=2, warmup=0, device="cpu", dtype="float32",
                           hf=has_transformers())


def xq_rows(res):
    return [r for r in res.rows if r.engine == "xq"]


def test_rows_measured(result):
    rows = xq_rows(result)
    assert [(r.kind, r.context) for r in rows] == [(k, n) for n in (256, 512) for k in bench.BENCH_KINDS]
    for r in rows:
        assert r.error is None, r
        assert r.prefill_tok_s > 0 and r.prefill_s > 0
        assert len(r.decode_ms_reps) == 2 and r.decode_ms > 0 and r.decode_ms_p90 >= r.decode_ms
        assert r.step_bytes > result.model["weights_bytes"] * 0.9 and r.step_flops > 0
        assert r.achieved_gb_s > 0 and r.achieved_tflop_s > 0
        assert r.roofline_ms == pytest.approx(r.roofline_mem_ms + r.roofline_compute_ms)
        assert r.max_context is None or r.max_context > 0
        if result.memory["peak_source"] is not None:
            assert r.peak_bytes is not None and r.peak_bytes >= 0
    assert result.peaks.bandwidth_gb_s > 0 and result.peaks.tflop_s > 0
    assert [v.context for v in result.verdicts] == [256, 512]
    assert all(v.fastest in result.settings["kinds"] for v in result.verdicts)
    env = result.environment
    assert env["torch"] == torch.__version__ and env["xq"] and env["cpu"]["cores"]


def test_bytes_and_ratios_match_plan(result):
    cfg = shape_config("smollm2-135m")
    fp32 = {r.kind: r for r in plan(cfg, list(bench.BENCH_KINDS), dtype=torch.float32)}
    fp16 = {r.kind: r for r in plan(cfg, list(bench.BENCH_KINDS))}
    for r in xq_rows(result):
        assert r.bytes_per_token == pytest.approx(fp32[r.kind].bytes_per_token, rel=1e-12), r.kind
        assert r.plan_bytes_per_token == fp32[r.kind].bytes_per_token
        assert r.paper_bytes_per_token == fp16[r.kind].paper_bytes_per_token
        if r.kind == "kv":  # float32 KV against fp16 KV
            assert r.ratio == pytest.approx(0.5)
        else:  # codes and fp16 scales do not depend on the model dtype
            assert r.ratio == pytest.approx(fp16[r.kind].ratio, rel=1e-12), r.kind
    ratios = {r.kind: r.ratio for r in xq_rows(result)}
    assert ratios["xquant-2"] > ratios["xquant-4"] > 3.5
    assert ratios["xquant-4"] == pytest.approx(ratios["kivi-4"])  # GQA latents are KV-sized


def test_cache_bytes_itemized(result):
    cfg = shape_config("smollm2-135m")
    for r in xq_rows(result):
        c = r.cache_bytes
        assert c["total"] == c["payload"] + c["scales"] + c["fp_window"] + c["workspace"]
        if r.kind == "kv":
            assert c["payload"] == r.context * cfg.num_hidden_layers * 2 * cfg.kv_dim * 4
            assert c["total"] == c["payload"]
        else:
            assert c["fp_window"] > 0 and c["scales"] > 0
            assert (c["workspace"] > 0) == r.kind.startswith("xquant-cl")
        assert r.step_bytes == cost.weights_read_bytes(cfg, torch.float32) + c["total"] - c["workspace"]


@pytest.mark.skipif(not has_transformers(), reason="transformers is not installed")
def test_hf_rows(result):
    hf = [r for r in result.rows if r.engine == "transformers"]
    assert [r.context for r in hf] == [256, 512] and all(r.kind == bench.HF_KIND for r in hf)
    for r in hf:
        assert r.error is None and r.prefill_tok_s > 0 and r.decode_ms >= 0 and len(r.decode_ms_reps) == 2
        assert r.ratio == pytest.approx(0.5)  # its dynamic cache holds float32 K/V here
    assert not [n for n in result.notes if "transformers' logits differ" in n], result.notes


# ----------------------------------------------------------------------------------- the formats


def test_json_matches_schema(result):
    doc = json.loads(bench.render(result, "json"))
    assert_valid(doc, "bench")
    assert doc["schema_version"] == bench.SCHEMA_VERSION == 1 and doc["tool"] == "xq bench"
    assert len(doc["rows"]) == len(result.rows)


def test_jsonl_lines_match_schema(result):
    lines = bench.render(result, "jsonl").splitlines()
    assert len(lines) == len(result.rows)
    for line in lines:
        rec = json.loads(line)
        assert_valid(rec, "bench", "jsonl_line")
        assert rec["target"] == result.target and rec["dtype"] == "float32"


def test_csv(result):
    rows = list(csv.DictReader(io.StringIO(bench.render(result, "csv"))))
    assert len(rows) == len(result.rows)
    assert set(bench.CSV_FIELDS) <= set(rows[0])
    for rec, r in zip(rows, result.rows, strict=True):
        assert rec["kind"] == r.kind and int(rec["context"]) == r.context
        assert float(rec["decode_ms"]) == pytest.approx(r.decode_ms)
        assert int(rec["cache_total"]) == r.cache_bytes["total"]
        assert len(rec["decode_ms_reps"].split(";")) == 2


def test_md_and_table(result):
    md = bench.render(result, "md")
    assert md.startswith("## xq bench: shape smollm2-135m")
    assert "| cache | context |" in md and "decode ms/token" in md and "measured peaks" in md
    for k in bench.BENCH_KINDS:
        assert f"| {k} | 256 |" in md and f"| {k} | 512 |" in md
    assert "- context 256: fastest" in md
    table = bench.render(result, "table")
    assert "xq bench" in table and "xquant-cl-3" in table and "fits longest" in table


def test_columns_use_plans_words(result, capsys):
    """"vs fp16 KV" is a size fraction in plan and inspect: bench's compression factor is "compression" (kv on a
    float32 model read "0.50x vs fp16 KV"), and the plan column names the dtype it counts at (`xq plan`: fp16)."""
    md = bench.render(result, "md")
    assert "| cache | context | B/token | plan B/token (float32) | compression | cache MiB |" in md
    assert "vs fp16 KV" not in md
    kv = next(line for line in md.splitlines() if line.startswith("| kv | 256 |")).split(" | ")
    assert kv[2] == kv[3] == "46,080.0" and kv[4] == "0.50x", kv  # float32 KV: twice fp16, half the compression
    assert "plan B/token (float32)" in bench.render(result, "table")
    code, out, _ = run(capsys, "bench", "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0 and "xq plan's count at the run's dtype" in text and "compression (fp16 KV bytes over" in text


def test_gates_on_result(result):
    kinds = result.settings["kinds"]
    assert bench.Gate.parse("xquant-4.ratio<3.5", kinds).failures(result.rows) == []
    fails = bench.Gate.parse("xquant-4.ratio < 4", kinds).failures(result.rows)
    # every context is checked
    assert len(fails) == 2 and "context 256" in fails[0] and "context 512" in fails[1]
    # decode_ms > 0 holds at every context, so it fires at both; a threshold between the two fires at one
    assert len(bench.Gate.parse("kv.decode_ms>0", kinds).failures(result.rows)) == 2
    pf = sorted(r.prefill_tok_s for r in result.rows if r.kind == "kv")
    mid = (pf[0] + pf[1]) / 2
    assert len(bench.Gate.parse(f"kv.prefill_tok_s>={mid}", kinds).failures(result.rows)) == (pf[0] != pf[1])
    assert bench.check_gates(result, [bench.Gate.parse("xquant-cl-3.bytes_per_token>1e9", kinds)]) == []


@pytest.mark.parametrize("text,needle", [
    ("xquant-5.ratio<3", "bits must be one of"),
    ("xquant-8.ratio<3", "not benchmarked"),
    ("kv.speed<3", "unknown metric"),
    ("kv.ratio=<3", "expected KIND.METRIC OP NUMBER"),
    ("kv ratio < 3", "expected KIND.METRIC OP NUMBER"),
    ("hf.decode_ms>1", "not benchmarked"),
], ids=["bad-bits", "kind-not-run", "metric", "op", "no-dot", "hf-without-flag"])
def test_gate_parse_errors(text, needle):
    with pytest.raises(InputError, match=needle):
        bench.Gate.parse(text, list(bench.BENCH_KINDS))


# ------------------------------------------------------------------ the cost model (docs/design.md §8)


def test_cost_model_matches_spec():
    llama3, llama2 = shape_config("llama-3.1-8b"), shape_config("llama-2-7b")
    per = lambda cfg, kind: cost.rebuild_flops(cfg, CacheSpec.parse(kind), 1) / cfg.num_hidden_layers  # noqa: E731
    assert per(llama3, "kv") == per(llama3, "kivi-2") == 0
    assert per(llama3, "xquant-2") == 4 * 1024**2  # 2·2·(d/g)²: "4.21 M" with the 16.4 K of attention
    assert cost.attention_flops(llama3, 1) / 32 == 16384  # "16.4 K" per token per layer
    assert per(llama2, "xquant-2") == 4 * 4096**2  # MHA: 4d² = 67 MFLOP
    cl = cost.rebuild_flops(llama3, CacheSpec.parse("xquant-cl-2"), 1)
    assert cl == 2 * 4 * 1024**2 + 30 * 8 * 4096 * 1024  # layers 0-1 plain, seed and deltas 33.6 M each
    embed = llama3.vocab_size * llama3.hidden_size  # the untied input embedding: indexed, never streamed
    assert cost.matmul_params(llama3) + embed == pytest.approx(8.03e9, rel=0.001)  # 8.03B parameters
    # docs/design.md §8 streams all 16.06 GB of bf16 weights per step; one embedding row is all a step
    # reads of the input table, so the floor streams 16.06 GB - 1.05 GB
    assert cost.weights_read_bytes(llama3, torch.bfloat16) + 2 * embed == pytest.approx(16.06e9, rel=0.001)
    assert cost.decode_flops(llama3, CacheSpec.parse("xquant-2"), 32768) == (
        2 * cost.matmul_params(llama3) + cost.attention_flops(llama3, 32768)
        + cost.rebuild_flops(llama3, CacheSpec.parse("xquant-2"), 32768))


def test_parse_contexts():
    """--context takes the one token grammar (k = 1024)."""
    assert parse_token_list("4k,32k") == [4096, 32768]
    assert parse_token_list(" 256, 512 ,256") == [256, 512]
    for bad in ("", "0", "4q", "-1", "k"):
        with pytest.raises(InputError):
            parse_token_list(bad)


@pytest.mark.parametrize("kind", ["kivi-4", "xquant-4", "xquant-cl-3"])
def test_snapshot_restores_decode_exactly(tiny_models, kind):
    """Repetitions start from the same cache state: restoring gives bit-identical decode logits even when
    tokens are sealed (quantized) and the fp tail shifts during the steps."""
    model = tiny_models["llama"]
    spec = CacheSpec.parse(kind, window=4, group_size=8)
    cache = make_cache(model, spec, 2, 40)
    tokens = torch.randint(0, model.config.vocab_size, (2, 21))
    with torch.inference_mode():
        first = measure.last_logits(model, tokens, cache).argmax(-1, keepdim=True)
        snap = cache.snapshot()
        runs = []
        for _ in range(2):
            cache.restore(snap)
            tok, out = first, []
            for _ in range(10):
                logits = measure.last_logits(model, tok, cache)
                out.append(logits)
                tok = logits.argmax(-1, keepdim=True)
            runs.append(torch.stack(out))
    assert torch.equal(runs[0], runs[1])
    assert int(cache.lengths[0]) == 31


@pytest.mark.parametrize("kind", ["kv", "xquant-4"])
def test_chunked_prefill(tiny_models, kind):
    """Chunks go through the same cache: exact for kv; quantized kinds differ only in what attention saw
    inside the prompt (tokens sealed by an earlier chunk are already quantized), so just check they run."""
    model = tiny_models["llama"]
    spec = CacheSpec.parse(kind, window=4, group_size=8)
    tokens = torch.randint(0, model.config.vocab_size, (1, 37))
    caches = [make_cache(model, spec, 1, 40) for _ in range(2)]
    with torch.inference_mode():
        whole = measure.prefill(model, tokens, caches[0], None)
        chunked = measure.prefill(model, tokens, caches[1], 16)
    assert int(caches[1].lengths[0]) == 37 and chunked.shape == whole.shape and chunked.isfinite().all()
    if kind == "kv":
        torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------- the command


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_gate_passes_and_writes_json(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    code, out, err = run(capsys, "bench", *SMOL, "--cache", "kv", "--fail-if", "kv.ratio<0.4",
                         "--fail-if", "kv.max_context<=0", "--output", str(out_file))
    assert code == 0, err
    assert out == "" and "wrote" in err
    doc = json.loads(out_file.read_text())
    assert_valid(doc, "bench")
    assert [r["kind"] for r in doc["rows"]] == ["kv"] and doc["rows"][0]["ratio"] == pytest.approx(0.5)


def test_cli_gate_fails_with_8(capsys):
    # kivi-4 has xquant-4's bytes on this GQA shape (3.73x) and needs no SVD (the library test gates xquant-4)
    code, out, err = run(capsys, "bench", *SMOL, "--cache", "kivi-4", "--format", "csv",
                         "--fail-if", "kivi-4.ratio<3.5", "--fail-if", "kivi-4.ratio<4")
    assert code == 8
    rows = list(csv.DictReader(io.StringIO(out)))  # results are printed before the gate fails
    assert len(rows) == 1 and rows[0]["kind"] == "kivi-4" and 3.5 < float(rows[0]["ratio"]) < 4
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "kivi-4.ratio<4" in last and "kivi-4.ratio<3.5" not in last


def test_cli_json_is_format_json(capsys):
    """README: `--json` = `--format json` for plan, inspect, eval and bench (bench had no --json)."""
    code, out, err = run(capsys, "bench", *SMOL, "--cache", "kv", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert_valid(doc, "bench")
    assert [r["kind"] for r in doc["rows"]] == ["kv"]
    code, _, err = run(capsys, "bench", *SMOL, "--cache", "kv", "--json", "--format", "csv")
    assert code == 2 and "--json and --format csv disagree" in err
    code, out, err = run(capsys, "bench", *SMOL, "--cache", "kv", "--json", "--format", "json")
    assert code == 0 and json.loads(out)["tool"] == "xq bench", err


@pytest.mark.parametrize("args,needle", [
    (["--context", "1000k"], "refused"),
    (["--budget", "100MiB"], "--budget"),
], ids=["huge-context", "small-budget"])
def test_cli_refuses_up_front(capsys, args, needle):
    base = [a for a in SMOL if a not in ("--context", "256")]
    code, out, err = run(capsys, "bench", *base, *args)
    assert code == 7 and out == ""
    assert needle in err and "GiB" in err and "--force" in err
    assert "building" not in err  # refused before the model was built


def test_cli_shape_as_argument(capsys):
    base = [a for a in SMOL if a not in ("--shape", "smollm2-135m")]
    code, _, err = run(capsys, "bench", "smollm2-135m", *base, "--budget", "100MiB")
    assert code == 7 and "--budget" in err  # read as --shape (refused by the budget before any download)


def test_cli_refuses_hours(capsys):
    code, _, err = run(capsys, "bench", "--shape", "llama-3.1-8b", "--context", "32k", "--device", "cpu",
                       "--budget", "1TiB")
    assert code == 7 and "would take about" in err and "h " in err


def test_refuses_after_calibration(monkeypatch):
    """The second check: once built, a device whose short decode step is slow refuses the run."""
    monkeypatch.setattr(bench_run, "calibrate_step", lambda model, device: 600.0)
    with pytest.raises(ResourceError, match="one decode step takes 600,000.0 ms"):
        bench.run_bench(shape="smollm2-135m", contexts=[256], kinds=["kv"], decode_tokens=2, reps=2, warmup=0,
                        device="cpu", dtype="float32")


@pytest.mark.parametrize("args,code,needle", [
    (["--fail-if", "kivi-2.ratio<3"], 2, "not benchmarked"),
    (["--fail-if", "kv.latency<3"], 2, "unknown metric"),
    (["--format", "xml"], 2, "unknown --format"),
    (["--cache", "kv,xquant-9"], 2, "bits must be one of"),
    (["--context", "12q"], 2, "--context"),
    (["--reps", "0"], 2, "--reps must be >= 1"),
    (["--prefill-chunk", "4k,8k"], 2, "--prefill-chunk"),
], ids=["gate-kind", "gate-metric", "format", "kind", "context", "reps", "chunk"])
def test_cli_bad_input(capsys, args, code, needle):
    c, out, err = run(capsys, "bench", *SMOL, *args)
    assert c == code and needle in err and out == ""


def test_cli_needs_one_target(capsys):
    c, _, err = run(capsys, "bench", "--context", "256", "--device", "cpu")
    assert c == 2 and "--shape" in err


def test_cli_plot_needs_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    c, out, err = run(capsys, "bench", *SMOL, "--plot", str(tmp_path / "p.png"))
    assert c == 6 and "pip install 'xqcli[plot]'" in err and out == ""


def test_cli_hf_needs_transformers(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    c, _, err = run(capsys, "bench", *SMOL, "--hf")
    assert c == 6 and "transformers" in err


def test_plot_draws_both_panels(result, tmp_path, monkeypatch):
    """The plotting calls, against a stand-in matplotlib (the plot extra is optional)."""
    fake = mock.MagicMock()
    fig, ax_t, ax_m = mock.MagicMock(), mock.MagicMock(), mock.MagicMock()
    fake.pyplot.subplots.return_value = (fig, (ax_t, ax_m))
    monkeypatch.setitem(sys.modules, "matplotlib", fake)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", fake.pyplot)
    out = bench.plot(result, tmp_path / "p.png")
    fig.savefig.assert_called_once()
    assert fig.savefig.call_args.args[0] == out == tmp_path / "p.png"
    kinds = list(dict.fromkeys(r.kind for r in result.rows))
    assert ax_t.plot.call_count == ax_m.plot.call_count == len(kinds)
    xs, ys = ax_t.plot.call_args_list[0].args
    assert xs == [256, 512] and all(y > 0 for y in ys)
    assert ax_m.set_ylabel.call_args.args[0] == "cache GB at context"


def test_shapes_known():
    assert "smollm2-135m" in SHAPES and "llama-3.1-8b" in SHAPES
