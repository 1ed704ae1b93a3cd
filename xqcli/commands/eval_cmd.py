"""`xq eval`: perplexity, KL and top-1 agreement of each cache kind against fp KV, on real text."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from xqcli.commands._options import (
    MAX_INT,
    AllowLongContextOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    GroupOpt,
    JsonOpt,
    OfflineOpt,
)

EXAMPLES = ('xq eval smollm2-xq --methods kv,xquant-4,xquant-cl-3 --seq-len 512',
            'xq eval ./model --text notes.txt --format csv > ppl.csv')

DEFAULT_METHODS = "kv,kivi-4,kivi-3,kivi-2,xquant-4,xquant-3,xquant-2,xquant-cl-4,xquant-cl-3,xquant-cl-2"


def eval_(
    model: Annotated[str, typer.Argument(help="Model folder, .gguf file, bundle or HF id.")],
    text: Annotated[Optional[str], typer.Option(
        "--text", help="wiki or news (gensim's test data: pip install --no-deps gensim==4.4.0), builtin (the Python "
                       "documentation, on every install) or a UTF-8 file. Default: wiki, else builtin.")] = None,
    methods: Annotated[str, typer.Option("--methods", "-m", help="Comma-separated cache kinds.")] = DEFAULT_METHODS,
    seq_len: Annotated[int, typer.Option(
        "--seq-len", max=MAX_INT, help="Window length (paper: 2048, inferred); at most the model's trained positions "
                                        "unless --allow-long-context.")] = 2048,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", max=MAX_INT, help="Use the first N tokens of the text (whole windows).")] = None,
    protocol: Annotated[str, typer.Option(
        "--protocol", help="paper (teacher-forced) or decode (real cache).")] = "paper",
    prefix: Annotated[Optional[int], typer.Option(
        "--prefix", max=MAX_INT, help="decode protocol: tokens prefilled per window (default seq-len/2).")] = None,
    group_size: GroupOpt = 128,
    window: Annotated[int, typer.Option(
        "--window", max=MAX_INT, help="decode protocol: fp window (paper protocol always 0).")] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    calibrated: Annotated[bool, typer.Option(
        "--calibrated", help="Also a row per xquant-B / kivi-B method with the bundle's per-layer clip ratios, "
                             "named '... (cal)'.")] = False,
    allow_long_context: AllowLongContextOpt = False,
    offline: OfflineOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity through the cache for each method, beside fp KV (paper protocol or real decode path)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from xqcli.bundle.calibrated import calibrated_specs
    from xqcli.cache.spec import CacheSpec
    from xqcli.errors import InputError
    from xqcli.load import load
    from xqcli.readouts.evaluate import evaluate
    from xqcli.readouts.render import TableData, choose_format, dumps, emit
    from xqcli.sources.hub import apply_offline
    from xqcli.texts import default_text, load_text

    specs = [CacheSpec.parse(m, group_size=group_size, window=window) for m in methods.split(",") if m.strip()]
    if not specs:
        raise InputError("--methods is empty")
    fmt = choose_format(fmt, as_json)
    err = Console(stderr=True)
    if text is None:
        text = default_text()
        if text == "builtin":
            err.print("[dim]note: evaluating on the builtin text (the Python documentation, also xq convert's default "
                      "calibration text): wiki and news need gensim's test data "
                      "(pip install --no-deps gensim==4.4.0)[/]")
    raw = load_text(text)
    apply_offline(offline)
    loaded = load(model, dtype=dtype, device=device)
    if calibrated:
        specs += calibrated_specs(loaded.bundle, specs)
    tokens = loaded.tokenizer().encode(raw, add_special_tokens=False)
    # a bar only on a terminal: elsewhere rich ends it with a blank line, before any error
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task("eval", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=f"eval {name}")

        rows = evaluate(loaded.model, tokens, specs, seq_len=seq_len, max_tokens=max_tokens,
                        protocol=protocol, prefix=prefix, artifacts=loaded.artifacts,
                        progress=progress, allow_long_context=allow_long_context)
    if fmt == "json":
        typer.echo(dumps("eval", {"model": loaded.source.describe(), "text": text, "protocol": protocol,
                                  "seq_len": seq_len, "rows": [r.as_dict() for r in rows]}))
        return
    cells = [(r.method, f"{r.bytes_per_token:,.0f}", f"{r.normalized:.3f}", f"{r.compression:.2f}x", f"{r.ppl:.3f}",
              f"{r.delta_ppl:+.3f}", f"{r.kl:.4f}", f"{100 * r.top1:.1f}%") for r in rows]
    emit(fmt, [TableData(("method", "bytes/token", "size vs fp16", "compression", "ppl", "Δppl", "KL", "top-1"), cells,
                         title=f"xq eval: {loaded.source.describe()} | {text} | {protocol} protocol | seq-len {seq_len} "
                               f"| {rows[0].scored_tokens} scored tokens")])
