"""`xq bench`: cache memory and decode speed of every cache kind side by side (see `xqcli.readouts.bench`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from xqcli.commands import _options as opt

KINDS = "kv,kivi-4,xquant-4,xquant-2,xquant-cl-3"
SUFFIX_FORMATS = {".md": "md", ".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".txt": "table"}


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        model: Optional[str] = typer.Argument(
            None, help="Model folder, bundle, .gguf file or HF id org/name[@revision]."),
        shape: Optional[str] = typer.Option(
            None, "--shape", help="Random weights at real shapes, built on the device (no download): "
            "llama-3.1-8b, llama-2-7b, mistral-7b or smollm2-135m."),
        context: Optional[str] = typer.Option(
            None, "--context", help="Comma-separated context lengths in tokens, k = 1024 (e.g. 4k,32k). "
            "Default: 4k,32k on a GPU, 256,512 on a CPU."),
        batch: int = typer.Option(1, "--batch", help="Sequences decoded together."),
        cache: str = typer.Option(KINDS, "--cache", "-c", help="Comma-separated cache kinds."),
        decode_tokens: int = typer.Option(16, "--decode-tokens", help="Decode steps per timed repetition."),
        warmup: int = typer.Option(
            1, "--warmup", help="Untimed repetitions (and one untimed prefill when > 0)."),
        reps: int = typer.Option(5, "--reps", help="Timed repetitions (median and p90 are over these)."),
        device: str = opt.DEVICE,
        dtype: Optional[str] = opt.DTYPE,
        budget: Optional[str] = typer.Option(
            None, "--budget", help="Memory for weights + cache, e.g. 24GiB (default: the device's free "
            "memory): sets max context and the refusal."),
        force: bool = typer.Option(
            False, "--force", help="Run even when the estimate says it will not fit or would take more than "
            "30 minutes."),
        hf: bool = typer.Option(
            False, "--hf", help="Also time transformers' generate (its default cache) on the same weights."),
        prefill_chunk: Optional[str] = typer.Option(
            None, "--prefill-chunk", help="Prefill in chunks of this many tokens (k = 1024) through the "
            "cache, to bound attention memory at long contexts (default: one forward)."),
        fmt: Optional[str] = typer.Option(
            None, "--format", "-f", help="md, json, jsonl, csv or table (default: a rich table on a "
            "terminal, md otherwise; with --output, from its suffix)."),
        output: Optional[Path] = typer.Option(
            None, "--output", "-o", help="Write the results to this file instead of stdout."),
        plot_path: Optional[Path] = typer.Option(
            None, "--plot", help="Save decode ms/token and cache GB against context as a PNG (needs the plot "
            "extra: matplotlib)."),
        fail_if: Optional[List[str]] = typer.Option(
            None, "--fail-if", help="Gate KIND.METRIC OP NUMBER, e.g. 'xquant-4.ratio<3.5' (repeatable): "
            "exit 8 when it is true at any context. OP: < <= > >= == !=; METRIC: ratio, bytes_per_token, "
            "decode_ms, prefill_tok_s, peak_bytes, max_context."),
    ) -> None:
        """Measure each cache kind at each context: cache bytes/token (measured and `xq plan`'s), ratio to
        fp16 KV, cache size (itemized), prefill tok/s, decode ms/token (median, p90), peak memory, the
        longest context that fits, achieved GB/s and TFLOP/s, and the roofline floor from measured device
        peaks. Results go to stdout, progress to stderr. Long or oversized runs are refused up front
        (exit 7)."""
        from xqcli.errors import InputError

        if fmt is None:
            if output is not None:
                fmt = SUFFIX_FORMATS.get(output.suffix.lower(), "md")
            else:
                fmt = "table" if sys.stdout.isatty() else "md"
        fmt = fmt.lower()
        from xqcli.readouts import bench as lib

        if fmt not in lib.FORMATS:
            raise InputError(f"unknown --format {fmt!r}", hint=f"choose from {', '.join(lib.FORMATS)}")
        if plot_path is not None:
            lib.require_matplotlib()  # before the run, not after an hour of it
        kinds = lib.parse_kinds(cache)
        gates = [lib.Gate.parse(g, kinds + ([lib.HF_KIND] if hf else [])) for g in (fail_if or [])]
        if hf:
            try:
                import transformers  # noqa: F401
            except ImportError:
                from xqcli.errors import MissingDependencyError

                raise MissingDependencyError("--hf needs transformers, which is not installed",
                                             hint="pip install transformers") from None

        from rich.console import Console
        from rich.markup import escape

        err = Console(stderr=True, highlight=False)
        from xqcli.load import pick_device

        chunk = None
        if prefill_chunk is not None:
            try:
                (chunk,) = lib.parse_contexts(prefill_chunk)
            except (InputError, ValueError):
                raise InputError(f"--prefill-chunk: cannot read {prefill_chunk!r}",
                                 hint="e.g. 4k or 2048") from None
        if context is None:
            context = "4k,32k" if pick_device(device).type == "cuda" else "256,512"
        result = lib.run_bench(model, shape=shape, contexts=context, batch=batch, kinds=kinds,
                               decode_tokens=decode_tokens, warmup=warmup, reps=reps, device=device,
                               dtype=dtype, budget=budget, force=force, hf=hf, prefill_chunk=chunk,
                               progress=lambda msg: err.print(f"[dim]{escape(msg)}[/]"))
        if output is not None:
            output.write_text(lib.render(result, fmt), encoding="utf-8")
            err.print(f"[dim]wrote {escape(str(output))} ({fmt})[/]")
        elif fmt == "table":
            Console().print(result)
        else:
            sys.stdout.write(lib.render(result, fmt))
            sys.stdout.flush()
        if plot_path is not None:
            lib.plot(result, plot_path)
            err.print(f"[dim]wrote {escape(str(plot_path))}[/]")
        failures = lib.check_gates(result, gates)
        if failures:
            raise lib.gate_error(failures)
