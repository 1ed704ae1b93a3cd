"""`xq eval`: perplexity, KL and top-1 agreement of each cache kind against fp KV, on real text; lm-eval tasks
(`--tasks`) and passkey retrieval (`--task passkey`) through each cache kind."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from xqcli.commands._options import (
    MAX_INT,
    AllowLongSeqLenOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    GroupOpt,
    JsonOpt,
    OfflineOpt,
    at_most,
    not_a_seq_len,
)

EXAMPLES = ('xq eval smollm2-xq --methods kv,xquant-4,xquant-cl-3 --seq-len 512',
            'xq eval ./model --tasks arc_easy --limit 200 -c kv,xquant-4')

DEFAULT_METHODS = "kv,kivi-4,kivi-3,kivi-2,xquant-4,xquant-3,xquant-2,xquant-cl-4,xquant-cl-3,xquant-cl-2"


def eval_(
    model: Annotated[str, typer.Argument(help="Model folder, .gguf file, bundle or HF id.")],
    text: Annotated[Optional[str], typer.Option(
        "--text", help="wiki or news (gensim's test data: pip install --no-deps gensim==4.4.0), builtin (the Python "
                       "documentation, on every install) or a UTF-8 file. Default: wiki, else builtin.")] = None,
    methods: Annotated[str, typer.Option(
        "--methods", "-m", "--cache", "-c", callback=not_a_seq_len, show_default=DEFAULT_METHODS.replace(",", ", "),  # wraps, never cut
        help="Comma-separated cache kinds.")] = DEFAULT_METHODS,
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", help="lm-evaluation-harness tasks, comma-separated (extra lmeval: pip install 'xqcli[lmeval]'): "
                        "lm-eval's metrics and stderr, a column per cache kind (docs/eval.md).")] = None,
    task: Annotated[Optional[str], typer.Option(
        "--task", help="passkey: retrieval of a fact placed at --depths in --text filler, at --lengths, through "
                       "each cache kind (score and decode protocols, docs/eval.md).")] = None,
    include: Annotated[Optional[Path], typer.Option(
        "--include", help="--tasks: a folder of local lm-eval task YAML files.")] = None,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", min=1, callback=at_most(MAX_INT), help="--tasks: at most N documents per task.")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(
        "--num-fewshot", min=0, callback=at_most(MAX_INT), help="--tasks: few-shot examples (default: each task's).")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, callback=at_most(MAX_INT), help="--tasks and passkey: requests per forward pass.")] = 8,
    lengths: Annotated[str, typer.Option(
        "--lengths", help="passkey: prompt lengths in tokens (k = 1024).")] = "1k,2k,4k,8k",
    depths: Annotated[str, typer.Option(
        "--depths", help="passkey: where the fact sits, as fractions of the filler.")] = "0,0.25,0.5,0.75",
    samples: Annotated[int, typer.Option(
        "--samples", min=1, callback=at_most(MAX_INT), help="passkey: prompts per length and depth.")] = 2,
    seed: Annotated[int, typer.Option("--seed", min=0, callback=at_most(MAX_INT), help="passkey and --tasks: seed.")] = 0,
    seq_len: Annotated[int, typer.Option(
        "--seq-len", callback=at_most(MAX_INT), help="Window length (paper: 2048, inferred); at most the model's trained positions "
                                        "unless --allow-long-context.")] = 2048,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", callback=at_most(MAX_INT), help="Use the first N tokens of the text (whole windows).")] = None,
    protocol: Annotated[Optional[str], typer.Option(
        "--protocol", help="perplexity: paper (teacher-forced, default) or decode (real cache); passkey: score or "
                           "decode (default: both).")] = None,
    prefix: Annotated[Optional[int], typer.Option(
        "--prefix", callback=at_most(MAX_INT), help="decode protocol: tokens prefilled per window (default seq-len/2).")] = None,
    group_size: GroupOpt = 128,
    window: Annotated[Optional[int], typer.Option(
        "--window", callback=at_most(MAX_INT), help="decode protocols: fp window (perplexity default 0; passkey and --tasks "
                                      "generation default 128; the paper and score protocols always 0).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    calibrated: Annotated[bool, typer.Option(
        "--calibrated", help="Also a row per xquant-B / kivi-B method with the bundle's per-layer clip ratios, "
                             "named '... (cal)'.")] = False,
    allow_long_context: AllowLongSeqLenOpt = False,
    offline: OfflineOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity through the cache for each method, beside fp KV (paper protocol or real decode path); lm-eval
    tasks (--tasks) or passkey retrieval (--task passkey) through each method."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from xqcli.bundle.calibrated import calibrated_specs
    from xqcli.cache.spec import CacheSpec
    from xqcli.errors import InputError
    from xqcli.load import load
    from xqcli.readouts.render import (
        BYTES_PER_TOKEN,
        COMPRESSION,
        VS_FP16_KV,
        Column,
        choose_format,
        dumps,
        emit,
        fraction,
        table,
    )
    from xqcli.sources.hub import apply_offline
    from xqcli.texts import default_text, load_text

    if tasks is not None and task is not None:
        raise InputError("--tasks (lm-eval) and --task passkey are separate runs", hint="give one of them")
    if task is not None and task.strip().lower() != "passkey":
        raise InputError(f"--task {task}: the built-in task is passkey", hint="lm-eval tasks go to --tasks NAMES")
    mode = "tasks" if tasks is not None else "passkey" if task is not None else "perplexity"
    if mode == "tasks":
        from xqcli.lmeval import require_lm_eval

        require_lm_eval()  # before loading the model: a missing extra is exit 6 at once
    default_window = 0 if mode == "perplexity" else 128
    specs = [CacheSpec.parse(m, group_size=group_size, window=default_window if window is None else window)
             for m in methods.split(",") if m.strip()]
    if not specs:
        raise InputError("--methods is empty")
    fmt = choose_format(fmt, as_json)
    err = Console(stderr=True)
    if text is None and mode != "tasks":
        text = default_text()
        if text == "builtin":
            err.print("[dim]note: evaluating on the builtin text (the Python documentation, also xq convert's default "
                      "calibration text): wiki and news need gensim's test data "
                      "(pip install --no-deps gensim==4.4.0)[/]")
    raw = load_text(text) if mode != "tasks" else ""
    apply_offline(offline)
    loaded = load(model, dtype=dtype, device=device)
    if calibrated:
        specs += calibrated_specs(loaded.bundle, specs)
    # a bar only on a terminal: elsewhere rich ends it with a blank line, before any error
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        bar_task = bar.add_task("eval", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(bar_task, completed=done, total=total, description=f"eval {name}")

        if mode == "tasks":
            from xqcli.lmeval.run import run_tasks, task_table

            names = [t.strip() for t in tasks.split(",") if t.strip()]
            scores = run_tasks(loaded, specs, names, include=include, limit=limit, num_fewshot=num_fewshot,
                               batch_size=batch_size, seed=seed, progress=progress)
        elif mode == "passkey":
            from xqcli.readouts.retrieval import build_prompts, parse_depths, passkey, passkey_tables
            from xqcli.units import parse_token_list

            prompts = build_prompts(loaded.tokenizer(), raw, parse_token_list(lengths, "--lengths"),
                                    parse_depths(depths), samples, seed)
            cells = passkey(loaded.model, loaded.tokenizer(), specs, prompts,
                            protocols=(protocol,) if protocol else ("score", "decode"), artifacts=loaded.artifacts,
                            batch_size=batch_size, progress=progress, allow_long_context=allow_long_context)
        else:
            from xqcli.readouts.evaluate import evaluate

            tokens = loaded.tokenizer().encode(raw, add_special_tokens=False)
            rows = evaluate(loaded.model, tokens, specs, seq_len=seq_len, max_tokens=max_tokens,
                            protocol=protocol or "paper", prefix=prefix, artifacts=loaded.artifacts,
                            progress=progress, allow_long_context=allow_long_context)
    source = loaded.source.describe()
    if mode == "tasks":
        if fmt == "json":
            typer.echo(dumps("eval", {"model": source, "tasks": names, "limit": limit, "scores":
                                      [r.as_dict() for r in scores]}))
            return
        emit(fmt, [task_table(scores, f"xq eval: {source} | lm-eval tasks" + (f" | limit {limit}" if limit else ""))])
        return
    if mode == "passkey":
        if fmt == "json":
            typer.echo(dumps("eval", {"model": source, "task": "passkey", "text": text, "samples": samples,
                                      "seed": seed, "cells": [c.as_dict() for c in cells]}))
            return
        emit(fmt, passkey_tables(cells, f"xq eval: {source} | passkey in {text} | {samples} per cell"))
        return
    if fmt == "json":
        typer.echo(dumps("eval", {"model": source, "text": text, "protocol": protocol or "paper",
                                  "seq_len": seq_len, "rows": [r.as_dict() for r in rows]}))
        return
    columns = (Column("method", numeric=False), BYTES_PER_TOKEN, VS_FP16_KV, COMPRESSION,
               Column("ppl", "{:.3f}".format), Column("Δppl", "{:+.3f}".format),
               Column("KL", "{:.4f}".format),
               Column("top-1", "{:.1%}".format, fraction("top-1")))
    values = [(r.method, r.bytes_per_token, r.normalized, r.compression, r.ppl, r.delta_ppl, r.kl, r.top1)
              for r in rows]
    emit(fmt, [table(columns, values, title=f"xq eval: {source} | {text} | {protocol or 'paper'} protocol "
                                            f"| seq-len {seq_len} | {rows[0].scored_tokens} scored tokens")])
