"""`xq plan`: bytes per token of each cache kind and the longest context for a memory budget."""

from __future__ import annotations

import json
from typing import Optional

import typer

from xqcli.commands import _options as opt


def register(app: typer.Typer) -> None:
    @app.command()
    def plan(
        target: Optional[str] = typer.Argument(None, help="Model folder, bundle, or a shape name."),
        shape: Optional[str] = typer.Option(None, "--shape",
                                            help="llama-3.1-8b, llama-2-7b, mistral-7b or smollm2-135m."),
        kinds: str = typer.Option(",".join(["kv", "kivi-4", "kivi-3", "kivi-2", "xquant-8", "xquant-4", "xquant-3",
                                            "xquant-2", "xquant-cl-4", "xquant-cl-3", "xquant-cl-2"]),
                                  "--cache", "-c", help="Comma-separated cache kinds."),
        budget: Optional[str] = typer.Option(None, "--budget", help="Memory budget, e.g. 24GiB: prints the longest context."),
        weights: bool = typer.Option(True, "--weights/--no-weights",
                                     help="Whether the budget must also hold the fp16 weights."),
        group_size: int = opt.GROUP,
        base_layers: int = typer.Option(3, "--base-layers", help="xquant-cl: leading layers at 4 bits."),
        as_json: bool = opt.JSON,
    ) -> None:
        """Bytes per token of every cache kind (measured from real allocated caches, with the paper's
        formula beside it), the ratio to fp16 KV, and the longest context that fits --budget."""
        from xqcli.errors import InputError
        from xqcli.readouts.plan import config_for, parse_bytes
        from xqcli.readouts.plan import plan as make_plan

        if (target is None) == (shape is None):
            raise InputError("give a model/bundle folder or --shape NAME (one of them)")
        cfg, label = config_for(shape or target)
        budget_b = parse_bytes(budget) if budget else None
        rows = make_plan(cfg, [k for k in kinds.split(",") if k.strip()], budget=budget_b,
                         include_weights=weights, group_size=group_size, base_layers=base_layers)
        from xqcli.readouts.plan import weight_bytes

        wb = weight_bytes(cfg)
        if as_json:
            typer.echo(json.dumps({"schema": 1, "target": label, "weights_fp16_bytes": wb, "budget_bytes": budget_b,
                                   "budget_includes_weights": weights,
                                   "rows": [r.__dict__ for r in rows]}, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        note = ""
        if budget_b:
            note = (f" | budget {budget} " + (f"incl. {wb / 2**30:.2f} GiB fp16 weights" if weights else
                                              "for the cache alone (weights not counted)"))
        table = Table(title=f"xq plan: {label}{note}")
        cols = ["cache", "bytes/token", "paper formula", "vs fp16 KV", "compression", "fixed", "CL workspace/token"]
        if budget_b:
            cols.append("max context")
        for c in cols:
            table.add_column(c, justify="left" if c == "cache" else "right", no_wrap=c == "cache")
        for r in rows:
            cells = [r.kind, f"{r.bytes_per_token:,.0f}", f"{r.paper_bytes_per_token:,.0f}", f"{r.normalized:.3f}",
                     f"{r.ratio:.2f}x", f"{r.fixed_bytes / 2**20:.1f} MiB", f"{r.workspace_bytes_per_token:,.0f}"]
            if budget_b:
                cells.append(f"{r.max_context:,}")
            table.add_row(*cells)
        Console().print(table)
        Console(stderr=True).print("[dim]fixed = per-sequence full-precision residual (per-channel blocks waiting "
                                   "to fill, window 0); CL workspace = transient accumulator, not in the ratio.[/]")
