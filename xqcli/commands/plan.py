"""`xq plan`: bytes per token of each cache kind and the longest context for a memory budget."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from xqcli.commands._options import MAX_INT, FormatOpt, GroupOpt, JsonOpt, at_most, not_a_plan_context

EXAMPLES = ('xq plan --shape llama-3.1-8b --budget 24GiB',
            'xq plan smollm2-xq -c kv,xquant-4 --format csv > plan.csv')


def plan(
    target: Annotated[Optional[str], typer.Argument(help="Model folder, bundle, or a shape name.")] = None,
    shape: Annotated[Optional[str], typer.Option(
        "--shape", help="llama-3.1-8b, llama-2-7b, mistral-7b or smollm2-135m.")] = None,
    kinds: Annotated[Optional[str], typer.Option(
        "--cache", "-c", callback=not_a_plan_context, help="Comma-separated cache kinds (default: kv, kivi-4/3/2, xquant-8/4/3/2, "
                              "xquant-cl-4/3/2).")] = None,
    budget: Annotated[Optional[str], typer.Option(
        "--budget", help="Memory budget, e.g. 24GiB: prints the longest context.")] = None,
    weights: Annotated[bool, typer.Option(
        "--weights/--no-weights", help="Whether the budget must also hold the fp16 weights.")] = True,
    group_size: GroupOpt = 128,
    base_layers: Annotated[int, typer.Option(
        "--base-layers", callback=at_most(MAX_INT), help="xquant-cl: leading layers at 4 bits.")] = 3,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bytes per token of every cache kind (measured from real allocated caches, with the paper's
    formula beside it), the ratio to fp16 KV, and the longest context that fits --budget."""
    from rich.console import Console

    from xqcli.errors import InputError
    from xqcli.readouts.plan import PLAN_KINDS, config_for, weight_bytes
    from xqcli.readouts.plan import plan as make_plan
    from xqcli.readouts.render import (
        BYTES_PER_TOKEN,
        COMPRESSION,
        VS_FP16_KV,
        Column,
        choose_format,
        count,
        dumps,
        emit,
        in_bytes,
        table,
    )
    from xqcli.units import format_bytes, parse_bytes

    fmt = choose_format(fmt, as_json)
    if (target is None) == (shape is None):
        raise InputError("give a model/bundle folder or --shape NAME (one of them)")
    cfg, label = config_for(shape or target)
    budget_b = parse_bytes(budget) if budget else None
    names = [k for k in kinds.split(",") if k.strip()] if kinds is not None else list(PLAN_KINDS)
    rows = make_plan(cfg, names, budget=budget_b, include_weights=weights, group_size=group_size,
                     base_layers=base_layers)
    wb = weight_bytes(cfg)
    if fmt == "json":
        typer.echo(dumps("plan", {"target": label, "weights_fp16_bytes": wb, "budget_bytes": budget_b,
                                  "budget_includes_weights": weights, "rows": [r.__dict__ for r in rows]}))
        return
    note = ""
    if budget_b:
        note = (f" | budget {budget} " + (f"incl. {format_bytes(wb)} fp16 weights" if weights else
                                          "for the cache alone (weights not counted)"))
    columns = [Column("cache", numeric=False), BYTES_PER_TOKEN, Column("paper formula", count), VS_FP16_KV,
               COMPRESSION, Column("fixed", format_bytes, in_bytes("fixed")),
               Column("CL workspace/token", count)]
    columns += [Column("max context", "{:,}".format)] if budget_b else []
    values = [[r.kind, r.bytes_per_token, r.paper_bytes_per_token, r.normalized, r.ratio, r.fixed_bytes,
               r.workspace_bytes_per_token] + ([r.max_context] if budget_b else []) for r in rows]
    emit(fmt, [table(columns, values, title=f"xq plan: {label}{note}")])
    Console(stderr=True).print("[dim]fixed = per-sequence full-precision residual (per-channel blocks waiting "
                               "to fill, window 0); CL workspace = transient accumulator, not in the ratio.[/]")
