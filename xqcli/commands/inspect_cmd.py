"""`xq inspect`: what a bundle holds: source, files, bytes per token per cache kind, calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xqcli.commands._options import JsonOpt


def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (made by xq convert).")],
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every file against xq.json.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Summarize a bundle: its manifest, bytes per token of each cache kind, the latent channel-0 energy
    and calibration of every layer. --verify re-hashes every file (a changed byte is an error)."""
    from xqcli.bundle.format import open_bundle
    from xqcli.readouts.inspect import bundle_report
    from xqcli.readouts.render import dumps

    report = bundle_report(open_bundle(bundle, verify=verify), verified=verify)
    if as_json:
        typer.echo(dumps("inspect", report))
        return
    _render(report)


def _render(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from xqcli.units import format_bytes

    console = Console(soft_wrap=True)
    cfg, src = r["config"], r["source"]
    origin = " ".join(f"{k}={v}" for k, v in src.items() if k != "kind")
    console.print(f"[bold]{r['bundle']}[/]: xq bundle schema {r['bundle_schema_version']} "
                  f"(xq {r['bundle_xq_version']}), "
                  f"{r['dtype']} weights, {len(r['files'])} files, {format_bytes(r['total_bytes'])}"
                  + (", [green]every sha256 verified[/]" if r["verified"] else ""))
    console.print(f"source: {src.get('kind')} {origin}")
    console.print(f"model: {cfg['model_type']}, {cfg['num_hidden_layers']} layers, d={cfg['hidden_size']}, "
                  f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} kv heads; "
                  "xquant stores "
                  + ("the SVD latents X·U_k, X·U_v" if r["latents"]
                     else "X itself (latents would not be narrower)"))
    table = Table(title="bytes per token (all layers)")
    for col in ("cache", "bytes/token", "vs fp16 KV"):
        table.add_column(col, justify="left" if col == "cache" else "right")
    for row in r["bytes_per_token"]:
        table.add_row(row["kind"], f"{row['bytes_per_token']:,.0f}", f"{row['vs_fp16_kv']:.3f}")
    console.print(table)
    cal = r["calibration"]
    if cal is None:
        console.print("no calibration")
        return
    plans = cal["bit_plans"]
    console.print(f"calibration: {cal.get('tokens')} tokens of {cal.get('text')}. ch0 = energy share of "
                  "latent channel 0 of X·U_k; clip = xquant range ratio at 2/3/4/8 bits (least K/V error); "
                  f"sens = attention-output error at 3 bits; plan = bits per layer for an average of "
                  f"{'/'.join(plans)}")
    table = Table()
    for col in ("layer", "max |X|", "top ch", "ch0", "clip", "sens", "plan"):
        table.add_column(col, justify="right")
    for i, rec in enumerate(cal["layers"]):
        top = rec["x"].get("top_channels") or [["-"]]
        energy = f"{rec['latent']['k_channel0_energy']:.1%}" if rec["latent"] else "-"
        clips = "/".join(f"{rec['clip'].get('xquant', {}).get(str(b), '-')}" for b in (2, 3, 4, 8))
        table.add_row(str(i), f"{rec['x']['max_abs']:.1f}", str(top[0][0]), energy, clips,
                      f"{rec['sensitivity']:.4f}", "/".join(str(p[i]) for p in plans.values()))
    console.print(table)
