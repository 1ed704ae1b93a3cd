"""Launches per decode step and per layer of every cache kind, counted on CPU by the launch tracer.

One decode step through the model and cache on the caches' CUDA code path (``kernels="triton"``), Triton
launches intercepted and not run, every aten op that would launch device work counted
(`xqcli.readouts.trace` states the rule). The model is SmolLM2-135M (the test asset, 30 layers) by
default, or a named shape with random weights (``--shape llama-3.1-8b --layers 2``: per-layer counts do
not depend on the layer count). Each kind is prefilled with a random prompt of each ``--context`` and
traced over two decode steps; the second is reported (the first may build tables once), with a note
when the two differ in counts.

    python bench/trace_launches.py                                  # markdown table, SmolLM2
    python bench/trace_launches.py --context 256,1024 --json
    python bench/trace_launches.py --shape llama-3.1-8b --layers 2 --kinds kv,xquant-4
    python bench/trace_launches.py --bundle BUNDLE                  # a converted model instead of SmolLM2
    python bench/trace_launches.py --auto-backend ref               # quantizer on its CPU reference
    python bench/trace_launches.py --step --context 256             # the engine's CUDA path: DecodeStep

Columns: aten ops, Triton launches, their total, total / layers (the issue's "per layer"), the fewest
and most launches of one layer, the launches outside the layers (embedding and step bookkeeping before
layer 0; final norm and lm_head after the last), and host reads (read-backs and ``torch.tensor`` copies).

``--step`` traces what the engine runs on CUDA instead: `xqcli.engine.step.DecodeStep` (the step the CUDA
graph captures) followed by greedy sampling (one argmax, counted outside the layers); kinds it refuses
are noted and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

if not os.environ.get("TRITON_INTERPRET"):  # before xqcli.kernels is imported: kernels decorated for the CPU
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.spec import CacheSpec
from xqcli.engine.fused import DecodeWeights
from xqcli.engine.sampling import SamplingParams, sample
from xqcli.engine.step import DecodeStep, StepUnsupported
from xqcli.errors import XQError
from xqcli.load import load, make_cache
from xqcli.readouts.plan import shape_config
from xqcli.readouts.trace import LaunchTracer, StepTrace, trace_steps

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("kv", "kivi-4", "xquant-4", "xquant-cl-3", "xquant-4+rot", "xquant-4+ch0")


def smollm2():
    """SmolLM2-135M from the offline test assets (tests/assets.py builds it on first use)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import assets

    return load(assets.smollm2_hf(), dtype="float32", device="cpu")


def target(args: argparse.Namespace) -> tuple[torch.nn.Module, Artifacts, str]:
    """(model, artifacts, description) for the command line."""
    if args.shape:
        from xqcli.readouts.bench.measure import random_model

        cfg = shape_config(args.shape)
        if args.layers:
            cfg = replace(cfg, num_hidden_layers=args.layers)
        model = random_model(cfg, torch.float32, torch.device("cpu"))
        return model, Artifacts(), f"shape {args.shape} (random weights)"
    loaded = load(args.bundle, dtype="float32", device="cpu") if args.bundle else smollm2()
    return loaded.model, loaded.artifacts, loaded.source.describe()


def trace_decode_step(model, artifacts: Artifacts, kind: str, context: int, batch: int) -> list[StepTrace]:
    """Two traced steps of the engine's `DecodeStep` (and greedy sampling) after a prefill of `context` tokens."""
    weights = DecodeWeights.build(model, CacheSpec.parse(kind), artifacts)  # before the cache, as the engine does
    cache = make_cache(model, kind, batch, context + 2, artifacts=artifacts, kernels="triton")
    step = DecodeStep(model, cache, weights, backend="triton")
    gen = torch.Generator().manual_seed(0)
    model(torch.randint(0, model.config.vocab_size, (batch, context), generator=gen), cache, [context] * batch)
    step.n_new.fill_(1)
    out = []
    for _ in range(2):
        step.tokens.copy_(torch.randint(0, model.config.vocab_size, (batch,), generator=gen))
        with LaunchTracer() as tr:
            step.on_section = tr.mark
            sample(step(), SamplingParams())
        out.append(StepTrace(tr.signature(), tuple(tr.host_reads), tr.count_by_kind(), tr.by_section()))
    return out


def measure(model, artifacts: Artifacts, kind: str, context: int, batch: int, auto_backend: str,
            decode_step: bool = False) -> dict:
    """One row: the second traced decode step of `kind` after a prefill of `context` tokens per row."""
    if decode_step:
        first, step = trace_decode_step(model, artifacts, kind, context, batch)
    else:
        cache = make_cache(model, kind, batch, context + 2, artifacts=artifacts, kernels="triton")
        first, step = trace_steps(model, cache, 2, [context] * batch, auto_backend=auto_backend)
    n_layers = model.config.num_hidden_layers
    layers = [n for name, n in step.sections.items() if name.startswith("layer ")]
    total = step.counts["aten"] + step.counts["triton"]
    return {"kind": kind, "context": context, "batch": batch, "aten": step.counts["aten"],
            "triton": step.counts["triton"], "total": total, "per_layer": round(total / n_layers, 1),
            "layer_min": min(layers), "layer_max": max(layers),
            "outside": step.sections.get("before", 0) + step.sections.get("after", 0),
            "host_reads": len(step.host_reads), "first_step_counts": first.counts}


def table(rows: list[dict]) -> str:
    head = ("| kind | context | aten ops | Triton launches | total | per layer | one layer (min–max) | "
            "outside layers | host reads |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['kind']} | {r['context']:,} | {r['aten']:,} | {r['triton']:,} | {r['total']:,} | "
             f"{r['per_layer']} | {r['layer_min']}–{r['layer_max']} | {r['outside']} | {r['host_reads']} |"
             for r in rows]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", help="a named shape with random weights (xq plan's names) instead of SmolLM2")
    ap.add_argument("--layers", type=int, help="with --shape: this many layers instead of the shape's")
    ap.add_argument("--bundle", help="an xq bundle instead of SmolLM2")
    ap.add_argument("--kinds", help="comma-separated cache kinds (default: KINDS, without +ch0 on a model that "
                                    "caches X itself)")
    ap.add_argument("--context", default="256,1024", help="prefill lengths, comma-separated")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--auto-backend", choices=("triton", "ref"), default="triton",
                    help="what the kernels' backend='auto' picks while tracing: Triton as on CUDA (default) or the "
                         "pure-torch reference as on CPU")
    ap.add_argument("--step", action="store_true",
                    help="trace the engine's CUDA decode step (DecodeStep, then greedy sampling) instead of the "
                         "model and caches' eager kernels path")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    if args.shape and args.bundle:
        ap.error("give --shape or --bundle, not both")
    if args.layers is not None and (not args.shape or args.layers < 1):
        ap.error("--layers N (N >= 1) goes with --shape")
    contexts = [int(c) for c in args.context.split(",")]
    try:
        model, artifacts, described = target(args)
        rows, notes = [], []
        from xqcli.cache.spec import uses_latents

        kinds = args.kinds.split(",") if args.kinds else [k for k in KINDS if "+ch0" not in k
                                                          or uses_latents(model.config)]  # +ch0 needs latents
        for kind in kinds:
            for n in contexts:
                print(f"tracing {kind} after {n:,} tokens", file=sys.stderr)
                try:
                    rows.append(measure(model, artifacts, kind, n, args.batch, args.auto_backend, args.step))
                except StepUnsupported as e:
                    notes.append(f"{kind} skipped: {e}")
                    break
    except XQError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for r in rows:
        if r["first_step_counts"] != {"aten": r["aten"], "triton": r["triton"]}:
            notes.append(f"{r['kind']} at {r['context']:,}: the first decode step counted {r['first_step_counts']}")
    if args.json:
        print(json.dumps({"model": described, "auto_backend": args.auto_backend, "decode_step": args.step,
                          "layers": model.config.num_hidden_layers, "rows": rows, "notes": notes}, indent=2))
    else:
        path = "DecodeStep + greedy sampling" if args.step else f"model and caches, backend='auto' -> {args.auto_backend}"
        print(f"{described}, {model.config.num_hidden_layers} layers, batch {args.batch}, {path}\n")
        print(table(rows))
        for note in notes:
            print(f"\n- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
