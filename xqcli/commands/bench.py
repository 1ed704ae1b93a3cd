"""`xq bench`: cache memory and decode speed of every cache kind side by side (see `xqcli.readouts.bench`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from xqcli.commands._options import MAX_INT, DeviceOpt, DtypeOpt, JsonOpt, OfflineOpt, at_most, not_a_context

EXAMPLES = ('xq bench smollm2-xq --context 4k,32k',
            'xq bench --shape llama-3.1-8b --format md -o bench.md')

SUFFIX_FORMATS = {".md": "md", ".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".txt": "table"}


def bench(
    model: Annotated[Optional[str], typer.Argument(
        help="Model folder, bundle, .gguf file or HF id org/name[@revision].")] = None,
    shape: Annotated[Optional[str], typer.Option(
        "--shape", help="Random weights at real shapes, built on the device (no download): "
                        "llama-3.1-8b, llama-2-7b, mistral-7b or smollm2-135m.")] = None,
    context: Annotated[Optional[str], typer.Option(
        "--context", help="Comma-separated context lengths in tokens, k = 1024 (e.g. 4k,32k). "
                          "Default: 4k,32k on a GPU, 256,512 on a CPU.")] = None,
    batch: Annotated[int, typer.Option(
        "--batch", callback=at_most(MAX_INT), help="Sequences decoded together.")] = 1,
    cache: Annotated[Optional[str], typer.Option(
        "--cache", "-c", callback=not_a_context, help="Comma-separated cache kinds (default: kv, kivi-4, xquant-4, xquant-2, "
                              "xquant-cl-3).")] = None,
    decode_tokens: Annotated[int, typer.Option(
        "--decode-tokens", callback=at_most(MAX_INT), help="Decode steps per timed repetition.")] = 16,
    warmup: Annotated[int, typer.Option(
        "--warmup", callback=at_most(MAX_INT), help="Untimed repetitions (and one untimed prefill when > 0).")] = 1,
    reps: Annotated[int, typer.Option(
        "--reps", callback=at_most(MAX_INT), help="Timed repetitions (median and p90 are over these).")] = 5,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    budget: Annotated[Optional[str], typer.Option(
        "--budget", help="Memory for weights + cache, e.g. 24GiB (default: the device's free memory): sets max "
                         "context and the refusal.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Run even when the estimate says it will not fit or would take more than 30 "
                        "minutes.")] = False,
    hf: Annotated[bool, typer.Option(
        "--hf", help="Also time transformers' generate (its default cache) on the same weights.")] = False,
    prefill_chunk: Annotated[Optional[str], typer.Option(
        "--prefill-chunk", help="Prefill in chunks of this many tokens (k = 1024) through the cache, to bound "
                                "attention memory at long contexts (default: one forward).")] = None,
    fmt: Annotated[Optional[str], typer.Option(
        "--format", "-f", help="md, json, jsonl, csv or table (default: a rich table on a terminal, md otherwise; "
                               "with --output, from its suffix; json = --json).")] = None,
    as_json: JsonOpt = False,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write the results to this file instead of stdout.")] = None,
    plot_path: Annotated[Optional[Path], typer.Option(
        "--plot", help="Save decode ms/token and cache GB against context as a PNG (needs the plot extra: "
                       "matplotlib).")] = None,
    offline: OfflineOpt = None,
    fail_if: Annotated[Optional[list[str]], typer.Option(
        "--fail-if", help="Gate KIND.METRIC OP NUMBER, e.g. 'xquant-4.ratio<3.5' (repeatable): exit 8 when it is "
                          "true at any context. OP: < <= > >= == !=; METRIC: ratio (the compression "
                          "column), bytes_per_token, decode_ms, prefill_tok_s, peak_bytes, max_context.")] = None,
) -> None:
    """Measure each cache kind at each context: cache bytes/token (measured, and `xq plan`'s count at the run's
    dtype, while `xq plan` itself counts fp16), compression (fp16 KV bytes over these), cache size (itemized),
    prefill tok/s, decode ms/token (median, p90), peak memory, the longest context that fits, achieved GB/s
    and TFLOP/s, and the roofline floor from measured device peaks. Results go to stdout, progress to stderr.
    Long or oversized runs are refused up front (exit 7)."""
    from rich.console import Console
    from rich.markup import escape

    from xqcli.errors import InputError
    from xqcli.load import pick_device
    from xqcli.readouts import bench as lib
    from xqcli.readouts.render import check_output_file, choose_format, show, write_output_file
    from xqcli.sources.hub import apply_offline
    from xqcli.units import parse_tokens

    if as_json:
        fmt = choose_format(fmt, as_json)  # "json", or refused when --format says otherwise
    if fmt is None:
        if output is not None:
            fmt = SUFFIX_FORMATS.get(output.suffix.lower(), "md")
        else:
            fmt = "table" if sys.stdout.isatty() else "md"
    fmt = fmt.lower()
    if fmt not in lib.FORMATS:
        raise InputError(f"unknown --format {fmt!r}", hint=f"choose from {', '.join(lib.FORMATS)}")
    for path, option in ((output, "--output"), (plot_path, "--plot")):
        if path is not None:
            check_output_file(path, option)  # before the run, not after an hour of it
    if plot_path is not None:
        lib.require_matplotlib()
    kinds = lib.parse_kinds(cache if cache is not None else lib.BENCH_KINDS)
    gates = [lib.Gate.parse(g, kinds + ([lib.HF_KIND] if hf else [])) for g in (fail_if or [])]
    if hf:
        lib.require_transformers()
    err = Console(stderr=True, highlight=False)
    apply_offline(offline)
    chunk = parse_tokens(prefill_chunk, "--prefill-chunk") if prefill_chunk is not None else None
    if context is None:
        context = "4k,32k" if pick_device(device).type == "cuda" else "256,512"
    result = lib.run_bench(model, shape=shape, contexts=context, batch=batch, kinds=kinds,
                           decode_tokens=decode_tokens, warmup=warmup, reps=reps, device=device,
                           dtype=dtype, budget=budget, force=force, hf=hf, prefill_chunk=chunk,
                           progress=lambda msg: err.print(f"[dim]{escape(msg)}[/]"))
    if output is not None:
        write_output_file(output, lib.render(result, fmt), "--output")
        err.print(f"[dim]wrote {escape(str(output))} ({fmt})[/]")
    elif fmt == "table":
        show(Console(), lib.rich_view(result))
    else:
        sys.stdout.write(lib.render(result, fmt))
        sys.stdout.flush()
    if plot_path is not None:
        lib.plot(result, plot_path)
        err.print(f"[dim]wrote {escape(str(plot_path))}[/]")
    failures = lib.check_gates(result, gates)
    if failures:
        raise lib.gate_error(failures)
