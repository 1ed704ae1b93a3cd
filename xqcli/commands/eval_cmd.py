"""`xq eval`: perplexity, KL and top-1 agreement of each cache kind against fp KV, on real text."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from xqcli.commands._options import DeviceOpt, DtypeOpt, GroupOpt, JsonOpt

DEFAULT_METHODS = "kv,kivi-4,kivi-3,kivi-2,xquant-4,xquant-3,xquant-2,xquant-cl-4,xquant-cl-3,xquant-cl-2"


def eval_(
    model: Annotated[str, typer.Argument(help="Model folder, .gguf file, bundle or HF id.")],
    text: Annotated[str, typer.Option("--text", help="wiki, news (gensim test data) or a UTF-8 file.")] = "wiki",
    methods: Annotated[str, typer.Option("--methods", "-m", help="Comma-separated cache kinds.")] = DEFAULT_METHODS,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Window length (paper: 2048, inferred).")] = 2048,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", help="Use the first N tokens of the text (whole windows).")] = None,
    protocol: Annotated[str, typer.Option(
        "--protocol", help="paper (teacher-forced) or decode (real cache).")] = "paper",
    prefix: Annotated[Optional[int], typer.Option(
        "--prefix", help="decode protocol: tokens prefilled per window (default seq-len/2).")] = None,
    group_size: GroupOpt = 128,
    window: Annotated[int, typer.Option("--window", help="decode protocol: fp window (paper protocol always 0).")] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    calibrated: Annotated[bool, typer.Option(
        "--calibrated", help="Also a row per xquant-B / kivi-B method with the bundle's per-layer clip ratios, "
                             "named '... (cal)'.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity through the cache for each method, beside fp KV (paper protocol or real decode path)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from xqcli.bundle.bitplan import calibrated_specs
    from xqcli.cache.spec import CacheSpec
    from xqcli.errors import InputError
    from xqcli.load import load
    from xqcli.readouts.evaluate import evaluate
    from xqcli.readouts.render import dumps
    from xqcli.texts import load_text

    specs = [CacheSpec.parse(m, group_size=group_size, window=window) for m in methods.split(",") if m.strip()]
    if not specs:
        raise InputError("--methods is empty")
    raw = load_text(text)
    loaded = load(model, dtype=dtype, device=device)
    if calibrated:
        specs += calibrated_specs(loaded.bundle, specs)
    tokens = loaded.tokenizer().encode(raw, add_special_tokens=False)
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("eval", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=f"eval {name}")

        rows = evaluate(loaded.model, tokens, specs, seq_len=seq_len, max_tokens=max_tokens,
                        protocol=protocol, prefix=prefix, artifacts=loaded.artifacts,
                        progress=progress)
    if as_json:
        typer.echo(dumps("eval", {"model": loaded.source.describe(), "text": text, "protocol": protocol,
                                  "seq_len": seq_len, "rows": [r.as_dict() for r in rows]}))
        return
    table = Table(title=f"xq eval: {loaded.source.describe()} | {text} | {protocol} protocol | seq-len {seq_len} "
                        f"| {rows[0].scored_tokens} scored tokens")
    for col in ("method", "bytes/token", "size vs fp16", "compression", "ppl", "Δppl", "KL", "top-1"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=col == "method")
    for r in rows:
        table.add_row(r.method, f"{r.bytes_per_token:,.0f}", f"{r.normalized:.3f}", f"{r.compression:.2f}x",
                      f"{r.ppl:.3f}", f"{r.delta_ppl:+.3f}", f"{r.kl:.4f}", f"{100 * r.top1:.1f}%")
    Console().print(table)
