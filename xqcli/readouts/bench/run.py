"""`run_bench`: estimate (and refuse up front), build or load the model, measure every kind at every context.

Refusal happens twice: from the config alone before anything is built (memory against the budget or free
memory; time from the measured device peaks), and again once the model is built, with a measured
short-context decode step as the floor of every forward (it catches per-layer overheads the rates miss).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.spec import CacheSpec, kv_bytes_per_token, uses_latents
from xqcli.config import ModelConfig
from xqcli.errors import InputError, ResourceError
from xqcli.load import Loaded, default_dtype, load, make_cache, pick_device
from xqcli.model import Transformer
from xqcli.readouts.bench.cost import (decode_flops, derive, elem_bytes, prefill_flops, reference_traffic,
                                      weights_read_bytes)
from xqcli.readouts.bench.hf import check_hf_matches, hf_model, measure_hf
from xqcli.readouts.bench.measure import (PeakMemory, calibrate_step, device_free_bytes, environment,
                                         measure_kind, measure_peaks, random_model)
from xqcli.readouts.bench.report import format_duration
from xqcli.readouts.bench.results import HF_KIND, BenchResult, Peaks, Row, verdicts
from xqcli.readouts.plan import (BENCH_KINDS, SHAPES, PlanRow, config_for, meta_model, parse_kinds, plan,
                                shape_config)
from xqcli.sources.hf import parse_dtype
from xqcli.units import parse_bytes, parse_token_list

MAX_SECONDS = 30 * 60  # runs estimated longer than this are refused without --force
EFFICIENCY = 0.5  # fraction of the measured peaks a run is assumed to reach, for the refusal estimate
REFUSAL_HINT = "shorten --context, lower --reps/--decode-tokens/--batch, or pass --force"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Workload:
    """What one run measures: every kind at every context, and how many steps are timed."""

    specs: list[CacheSpec]
    contexts: list[int]
    batch: int = 1
    decode_tokens: int = 16
    warmup: int = 1
    reps: int = 5
    prefill_chunk: int | None = None
    hf: bool = False

    def check(self) -> None:
        for label, v, lo in (("--batch", self.batch, 1), ("--decode-tokens", self.decode_tokens, 1),
                             ("--reps", self.reps, 1), ("--warmup", self.warmup, 0)):
            if v < lo:
                raise InputError(f"{label} must be >= {lo} (got {v})")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise InputError(f"--prefill-chunk must be >= 1 (got {self.prefill_chunk})")
        if any(n < 1 for n in self.contexts):
            raise InputError(f"--context values must be >= 1 (got {self.contexts})")

    @property
    def kinds(self) -> list[str]:
        return [s.name for s in self.specs] + ([HF_KIND] if self.hf else [])


# ------------------------------------------------------------------------------------------ estimates


def estimate_run(cfg: ModelConfig, work: Workload, *, dtype: torch.dtype, peaks: Peaks,
                 step_floor_s: float | None = None) -> dict[str, Any]:
    """Peak memory (weights + largest cache + prefill activations) and seconds (FLOPs and bytes at
    EFFICIENCY times the measured peaks, plus the reference path's dequantize/rebuild traffic). Every
    forward takes at least `step_floor_s` (a measured short-context decode step, once the model is built:
    it catches per-layer overheads the rates miss). Rough: on busy CPUs the pure-torch caches' per-row
    loops can make real runs several times longer still."""
    el = elem_bytes(dtype)
    meta = meta_model(cfg, dtype)
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    flop_rate, byte_rate = peaks.tflop_s * 1e12 * EFFICIENCY, peaks.bandwidth_gb_s * 1e9 * EFFICIENCY
    wread = weights_read_bytes(cfg, dtype)
    floor = step_floor_s or 0.0
    batch, decode_tokens, d = work.batch, work.decode_tokens, cfg.hidden_size
    steps = (work.warmup + work.reps) * decode_tokens
    n_pre = 1 + (work.warmup > 0)
    worst, seconds, flops = 0, 0.0, 0
    for n in work.contexts:
        t = min(n, work.prefill_chunk or n)  # tokens per prefill forward
        act = (batch * t * el * (2 * cfg.intermediate_size + 4 * d + cfg.q_dim + 6 * cfg.kv_dim)
               + batch * t * n)  # + bool mask
        for spec in work.specs:
            c = make_cache(meta, spec, batch, n + decode_tokens, device=torch.device("meta")).allocated()
            rebuilt = batch * n * el * (3 * d if spec.method == "xquant-cl" else 6 * cfg.kv_dim)
            worst = max(worst, c.total + act + rebuilt)
            pf, df = prefill_flops(cfg, spec, n, batch), decode_flops(cfg, spec, n, batch)
            flops += n_pre * pf + steps * df
            extra = reference_traffic(cfg, spec, n, batch, el)
            seconds += n_pre * max(floor, pf / flop_rate + (wread + extra) / byte_rate)
            seconds += steps * max(floor, df / flop_rate + (wread + c.total + extra) / byte_rate)
        if work.hf:
            kvb = batch * (n + decode_tokens + 1) * kv_bytes_per_token(cfg, el)
            worst = max(worst, kvb + act + weights)  # + a random-init copy of the weights while building
            runs = work.warmup + work.reps  # one generate (a prefill and decode_tokens steps) per run
            pf, df = prefill_flops(cfg, None, n, batch), decode_flops(cfg, None, n, batch)
            flops += runs * (pf + decode_tokens * df)
            seconds += runs * (max(floor, pf / flop_rate + wread / byte_rate)
                               + decode_tokens * max(floor, df / flop_rate + (wread + kvb) / byte_rate))
    return {"weights_bytes": weights, "memory_bytes": weights + worst, "flops": flops, "seconds": seconds,
            "step_floor_s": step_floor_s}


def _problems(est: dict[str, Any], limit: int | None, is_budget: bool, longest: int,
              peaks: Peaks) -> list[str]:
    problems = []
    if limit is not None and est["memory_bytes"] > limit:
        problems.append(f"needs about {est['memory_bytes'] / 2**30:.2f} GiB (weights "
                        f"{est['weights_bytes'] / 2**30:.2f} GiB + cache and activations at context "
                        f"{longest:,}) but {'--budget' if is_budget else 'free memory'} is "
                        f"{limit / 2**30:.2f} GiB")
    if est["seconds"] > MAX_SECONDS:
        problems.append(f"would take about {format_duration(est['seconds'])} "
                        f"({est['flops'] / 1e12:,.1f} TFLOP at {EFFICIENCY:.0%} of the measured "
                        f"{peaks.tflop_s * 1e3:,.1f} GFLOP/s and {peaks.bandwidth_gb_s:,.1f} GB/s; "
                        f"refused above {MAX_SECONDS // 60} min)")
    return problems


def _refuse_estimate(est: dict[str, Any], limit: int | None, is_budget: bool, longest: int, peaks: Peaks,
                     force: bool, say: Progress) -> None:
    """The first check, from the config alone: memory against the limit, time against MAX_SECONDS."""
    problems = _problems(est, limit, is_budget, longest, peaks)
    if problems and not force:
        raise ResourceError("xq bench refused: it " + "; it ".join(problems), hint=REFUSAL_HINT)
    say(f"estimate: {format_duration(est['seconds'])}, peak {est['memory_bytes'] / 2**30:.2f} GiB"
        + (" (forced)" if problems else ""))


def _refuse_calibrated(est: dict[str, Any], floor: float, force: bool, say: Progress) -> None:
    """The second check, once built: the estimate with a measured decode step as every forward's floor."""
    if est["seconds"] > MAX_SECONDS and not force:
        raise ResourceError(f"xq bench refused: one decode step takes {floor * 1e3:,.1f} ms here even at a "
                            f"short context, so the run would take about {format_duration(est['seconds'])} "
                            f"(refused above {MAX_SECONDS // 60} min)", hint=REFUSAL_HINT)
    say(f"calibrated: a short decode step takes {floor * 1e3:,.1f} ms; "
        f"estimate {format_duration(est['seconds'])}")


def _cache_budget(budget: int | None, weights: int, free: int | None) -> int | None:
    return max(0, budget - weights) if budget is not None else free


def _fit(cache_budget: int | None, bpt: float | None, fixed: int, ws_per_token: float,
         batch: int) -> int | None:
    """The longest context per sequence whose cache (fixed + per-token bytes + workspace) fits the budget."""
    if cache_budget is None or not bpt:
        return None
    return max(0, int((cache_budget - fixed) // ((bpt + ws_per_token) * batch)))


def _meta_cache_terms(model_meta: Transformer, spec: CacheSpec, batch: int) -> tuple[int, float]:
    """(fixed fp-window bytes, workspace bytes per token) for `batch` rows, from meta-device caches."""
    a1 = make_cache(model_meta, spec, batch, 1024, device=torch.device("meta")).allocated()
    a2 = make_cache(model_meta, spec, batch, 2048, device=torch.device("meta")).allocated()
    return a1.fp_window, (a2.workspace - a1.workspace) / 1024 / batch


# ---------------------------------------------------------------------------------------- the steps


def _target(src: str | Path | None, shape: str | None) -> tuple[str | Path | None, str | None]:
    """`xq bench llama-3.1-8b` reads as --shape, as `xq plan` takes it; exactly one of the two is given."""
    if shape is None and src is not None and str(src).lower() in SHAPES and not Path(src).exists():
        shape, src = str(src), None
    if (src is None) == (shape is None):
        raise InputError("give a model source (folder, bundle, .gguf, HF id) or --shape NAME, not both")
    return src, shape


def _config(src: str | Path | None, shape: str | None, dt: torch.dtype, dev: torch.device,
            say: Progress) -> tuple[ModelConfig, str, Loaded | None]:
    """The config first (a folder's config.json, or the named shape), so a hopeless run is refused before
    loading; HF ids and .gguf files are loaded to learn their shapes."""
    if shape is not None:
        return shape_config(shape), f"shape {shape.lower()} (random weights)", None
    try:
        cfg, target = config_for(str(src))
        return cfg, target, None
    except InputError:
        say(f"loading {src}")
        loaded = load(src, dtype=dt, device=str(dev))
        return loaded.config, loaded.source.describe(), loaded


def _model(src: str | Path | None, shape: str | None, loaded: Loaded | None, cfg: ModelConfig,
           dt: torch.dtype, dev: torch.device, seed: int, say: Progress) -> tuple[Transformer, Artifacts]:
    """The model and the artifacts every cache on it is built with (a bundle's, else SVDs made on demand)."""
    if shape is not None:
        say(f"building {shape} with random weights on {dev} ({str(dt).removeprefix('torch.')})")
        torch.manual_seed(seed)
        return random_model(cfg, dt, dev, seed), Artifacts()
    if loaded is None:
        say(f"loading {src}")
        loaded = load(src, dtype=dt, device=str(dev))
    return loaded.model, loaded.artifacts


def _measure_rows(model: Transformer, artifacts: Artifacts, work: Workload, *, dev: torch.device,
                  dt: torch.dtype, peaks: Peaks, peak: PeakMemory, gen: torch.Generator,
                  cache_budget: int | None, notes: list[str], say: Progress) -> list[Row]:
    """Every kind at every context (then transformers, with --hf), each row completed from the plan and
    the cost model; out-of-memory rows are kept with their error."""
    cfg = model.config
    plan_rows: dict[str, PlanRow] = {r.kind: r for r in plan(cfg, [s.name for s in work.specs], dtype=dt)}
    meta = meta_model(cfg, dt)
    terms = {s.name: _meta_cache_terms(meta, s, work.batch) for s in work.specs}
    timing = (work.decode_tokens, work.warmup, work.reps, dev, peak, gen)
    hf = None
    if work.hf:
        say("building the transformers model (same weights)")
        hf = hf_model(model)
        note = check_hf_matches(hf, model)
        if note:
            notes.append(note)
    rows: list[Row] = []
    for n in work.contexts:
        for spec in work.specs:
            say(f"{spec.name} at context {n:,}: prefill, then {work.warmup}+{work.reps} reps of "
                f"{work.decode_tokens} decode steps")
            try:
                row = measure_kind(model, artifacts, spec, n, work.batch, *timing, work.prefill_chunk)
            except torch.cuda.OutOfMemoryError:
                row = Row(spec.name, "xq", n, work.batch, error="out of memory" + (
                    "" if work.prefill_chunk else " (try --prefill-chunk 4k)"))
            if row.error:
                torch.cuda.empty_cache()  # after the except block, once the failed frame is gone
            pr = plan_rows[spec.name]
            row.plan_bytes_per_token, row.paper_bytes_per_token = pr.bytes_per_token, pr.paper_bytes_per_token
            fixed, ws = terms[spec.name]
            bpt = row.bytes_per_token or pr.bytes_per_token
            row.max_context = _fit(cache_budget, bpt, fixed, ws, work.batch)
            derive(row, cfg, spec, dt, peaks)
            rows.append(row)
        if hf is not None:
            say(f"transformers generate at context {n:,}")
            try:
                row = measure_hf(hf, model, n, work.batch, *timing)
            except torch.cuda.OutOfMemoryError:
                row = Row(HF_KIND, "transformers", n, work.batch, error="out of memory")
            if row.error:
                torch.cuda.empty_cache()
            row.max_context = _fit(cache_budget, row.bytes_per_token, 0, 0.0, work.batch)
            derive(row, cfg, None, dt, peaks)
            rows.append(row)
    return rows


def _notes(rows: list[Row], peak: PeakMemory) -> list[str]:
    """What a reader of the table needs to know about missing numbers."""
    notes = []
    if any(r.bytes_per_token is None and r.error is None for r in rows):
        notes.append("some contexts are shorter than the full-precision window plus a 128-token block: "
                     "nothing was quantized yet, so bytes/token and compression are not measured there "
                     "(max context uses the plan number)")
    if peak.source is None:
        notes.append("peak memory is not measurable here (no CUDA, no /proc/self/clear_refs)")
    return notes


def _model_record(model: Transformer, weights: int) -> dict[str, Any]:
    cfg = model.config
    return {"model_type": cfg.model_type, "params": sum(p.numel() for p in model.parameters()),
            "weights_bytes": weights, "dtype": str(model.dtype).removeprefix("torch."),
            "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
            "latents": uses_latents(cfg)}


# ------------------------------------------------------------------------------------------ the run


def run_bench(src: str | Path | None = None, *, shape: str | None = None,
              contexts: list[int] | str = "4k,32k", batch: int = 1, kinds: list[str] | str = BENCH_KINDS,
              decode_tokens: int = 16, warmup: int = 1, reps: int = 5, device: str | None = "auto",
              dtype: str | torch.dtype | None = None,
              budget: int | str | None = None, force: bool = False, hf: bool = False, seed: int = 0,
              prefill_chunk: int | None = None, progress: Progress | None = None) -> BenchResult:
    """Benchmark every cache kind at every context on one model (a source `xqcli.load.load` accepts, or a
    named shape with random weights built on the device). Raises ResourceError before any work when the
    estimated memory exceeds the budget (or free memory) or the estimated time exceeds 30 minutes,
    unless `force`. `prefill_chunk` prefills in chunks of that many tokens (bounds attention memory at long
    contexts; the default is one forward of the whole context)."""
    t_start = time.perf_counter()
    say = progress or (lambda _msg: None)
    src, shape = _target(src, shape)
    work = Workload([CacheSpec.parse(k) for k in parse_kinds(kinds)],
                    parse_token_list(contexts) if isinstance(contexts, str) else list(contexts),
                    batch, decode_tokens, warmup, reps, prefill_chunk, hf)
    work.check()
    budget_b = parse_bytes(budget) if isinstance(budget, str) else budget
    dev = pick_device(device)
    dt = parse_dtype(dtype) if dtype is not None else default_dtype(dev)
    cfg, target, loaded = _config(src, shape, dt, dev, say)

    say(f"measuring peak bandwidth and FLOP/s on {dev}")
    peaks = measure_peaks(dev, dt)
    est = estimate_run(cfg, work, dtype=dt, peaks=peaks)
    free, free_source = device_free_bytes(dev)
    if loaded is not None and free is not None:
        free += est["weights_bytes"]  # already resident
    limit = budget_b if budget_b is not None else free
    _refuse_estimate(est, limit, budget_b is not None, max(work.contexts), peaks, force, say)

    gen = torch.Generator(device=dev).manual_seed(seed)
    model, artifacts = _model(src, shape, loaded, cfg, dt, dev, seed, say)
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    free_after, free_source = device_free_bytes(dev)
    cache_budget = _cache_budget(budget_b, weights, free_after)
    budget_source = "budget" if budget_b is not None else free_source

    # A short untimed forward pages the weights in and runs lazy initializations; its decode step is the
    # floor of every later forward, which re-checks the time estimate before anything is measured.
    floor = calibrate_step(model, dev)
    est = estimate_run(cfg, work, dtype=dt, peaks=peaks, step_floor_s=floor)
    est["limit_bytes"], est["limit_source"] = limit, budget_source
    _refuse_calibrated(est, floor, force, say)

    peak = PeakMemory(dev)
    notes: list[str] = []
    rows = _measure_rows(model, artifacts, work, dev=dev, dt=dt, peaks=peaks, peak=peak, gen=gen,
                         cache_budget=cache_budget, notes=notes, say=say)
    notes += _notes(rows, peak)
    return BenchResult(
        target=target, model=_model_record(model, weights),
        settings={"contexts": work.contexts, "batch": batch, "kinds": work.kinds,
                  "decode_tokens": decode_tokens, "warmup": warmup, "reps": reps, "device": str(dev),
                  "dtype": str(dt).removeprefix("torch."), "budget_bytes": budget_b, "force": force, "hf": hf,
                  "seed": seed, "prefill_chunk": prefill_chunk},
        environment=environment(dev), peaks=peaks,
        memory={"cache_budget_bytes": cache_budget, "cache_budget_source": budget_source,
                "peak_source": peak.source, "peak_includes_weights": peak.includes_weights},
        estimate=est, rows=rows, verdicts=verdicts(rows, work.contexts), notes=notes,
        elapsed_s=time.perf_counter() - t_start)

