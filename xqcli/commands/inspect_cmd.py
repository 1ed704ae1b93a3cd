"""`xq inspect`: what a bundle holds: source, files, bytes per token per cache kind, calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xqcli.commands._options import FormatOpt, JsonOpt

EXAMPLES = ('xq inspect smollm2-xq',
            'xq inspect smollm2-xq --verify --json')


def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (made by xq convert).")],
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every file against xq.json, and xq.json against its manifest_sha256.")] = False,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Summarize a bundle: its manifest, bytes per token of each cache kind, the latent channel-0 energy
    and calibration of every layer. --verify re-hashes every file and the manifest (a changed byte or value is an error; docs/bundle.md)."""
    from xqcli.bundle.format import open_bundle
    from xqcli.readouts.inspect import bundle_report
    from xqcli.readouts.render import choose_format, dumps, emit

    fmt = choose_format(fmt, as_json)
    report = bundle_report(open_bundle(bundle, verify=verify), verified=verify)
    if fmt == "json":
        typer.echo(dumps("inspect", report))
        return
    emit(fmt, _parts(report))


def _parts(r: dict) -> list:
    """The report as lines and tables, for any --format."""
    from xqcli.readouts.render import BYTES_PER_TOKEN, VS_FP16_KV, Column, fraction, table
    from xqcli.units import format_bytes

    cfg, src = r["config"], r["source"]
    origin = " ".join(f"{k}={v}" for k, v in src.items() if k != "kind")
    parts: list = [f"{r['bundle']}: xq bundle schema {r['bundle_schema_version']} "
                   f"(xq {r['bundle_xq_version']}), "
                   f"{r['dtype']} weights, {len(r['files'])} files, {format_bytes(r['total_bytes'])}"
                   + (", every sha256 verified" if r["verified"] else ""),
                   f"source: {src.get('kind')} {origin}",
                   f"model: {cfg['model_type']}, {cfg['num_hidden_layers']} layers, d={cfg['hidden_size']}, "
                   f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} kv heads; "
                   "xquant stores "
                   + ("the SVD latents X·U_k, X·U_v" if r["latents"]
                      else "X itself (latents would not be narrower)"),
                   table((Column("cache", numeric=False), BYTES_PER_TOKEN, VS_FP16_KV),
                         [(row["kind"], row["bytes_per_token"], row["vs_fp16_kv"])
                          for row in r["bytes_per_token"]],
                         title="bytes per token (all layers)")]
    cal = r["calibration"]
    if cal is None:
        return parts + ["no calibration"]
    parts.append(f"calibration: {cal.get('tokens')} tokens of {cal.get('text')}. ch0 = energy share of "
                 "latent channel 0 of X·U_k; clip = xquant range ratio at 2/3/4/8 bits (least K/V error); "
                 "K/V err = relative error of the K and V that xquant-3 rebuilds, with that clip")
    bits = (2, 3, 4, 8)
    columns = (Column("layer"), Column("max |X|", "{:.1f}".format), Column("top ch"),
               Column("ch0", "{:.1%}".format, fraction("ch0")),
               Column("clip", lambda clips: "/".join("-" if c is None else str(c) for c in clips),
                      tuple(f"clip {b}-bit" for b in bits)),
               Column("K/V err", "{:.4f}".format))
    values = []
    for i, rec in enumerate(cal["layers"]):
        top = rec["x"].get("top_channels")
        values.append((i, rec["x"]["max_abs"], top[0][0] if top else None,
                       rec["latent"]["k_channel0_energy"] if rec["latent"] else None,
                       tuple(rec["clip"].get("xquant", {}).get(str(b)) for b in bits),
                       rec["kv_error"].get("xquant", {}).get("3")))
    return parts + [table(columns, values)]
