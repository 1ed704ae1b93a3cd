"""`xq convert`: an HF id, model folder or .gguf file -> an xq bundle folder (see docs/bundle.md)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from xqcli.commands._options import JsonOpt, RevisionOpt


def convert(
    src: Annotated[str, typer.Argument(
        help="HF id org/name (or org/name@revision), a model folder, or a .gguf file.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Bundle folder to write (default ./<name>-xq).")] = None,
    dtype: Annotated[str, typer.Option(
        "--dtype", help="Weight dtype in the bundle: bfloat16, float16, float32.")] = "bfloat16",
    revision: RevisionOpt = None,
    token: Annotated[Optional[str], typer.Option(
        "--token", help="Hugging Face token (default: HF_TOKEN, or the login).")] = None,
    offline: Annotated[Optional[bool], typer.Option(
        "--offline/--online", help="Use only the local HF cache (default: HF_HUB_OFFLINE).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing bundle folder.")] = False,
    calib: Annotated[Optional[Path], typer.Option(
        "--calib", help="UTF-8 calibration text (default: the Python documentation text of the standard "
                        "library).")] = None,
    calib_tokens: Annotated[int, typer.Option(
        "--calib-tokens", help="Calibration tokens (the first N of the text).")] = 2048,
    shard_size: Annotated[str, typer.Option(
        "--shard-size", help="Largest weight file before sharding (2GB, 500MB).")] = "2GB",
    rotation: Annotated[str, typer.Option(
        "--rotation", help="Rotation for +rot cache kinds: hadamard (block Hadamard) or random.")] = "hadamard",
    rotation_seed: Annotated[int, typer.Option("--rotation-seed", help="Seed of --rotation random.")] = 0,
    budget_bits: Annotated[Optional[float], typer.Option(
        "--budget-bits", help="Also store a per-layer bit plan averaging this many bits "
                              "(use it as xquant-B+mix).")] = None,
    budget: Annotated[Optional[str], typer.Option(
        "--budget", help="Cache memory budget (e.g. 6GiB) at --context: sets --budget-bits.")] = None,
    context: Annotated[Optional[str], typer.Option(
        "--context", help="Target context for --budget, in tokens (k = 1024, e.g. 32k = 32,768; "
                          "32000 for exact).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a bundle: HF-shaped weights in --dtype, the SVD projections of every layer, a calibration
    (clip ratios, outlier statistics, a per-layer bit plan) and xq.json with the sha256 of every file."""
    from rich.console import Console

    from xqcli.bundle.format import open_bundle
    from xqcli.convert.pipeline import convert as run
    from xqcli.readouts.budget import source_bits_for_budget
    from xqcli.readouts.render import dumps
    from xqcli.units import format_bytes, parse_bytes, parse_tokens

    if budget is not None:
        target = parse_tokens(context) if context is not None else None
        budget_bits = source_bits_for_budget(src, parse_bytes(budget), target)
    err = Console(stderr=True, highlight=False)
    t0 = time.monotonic()
    folder = run(src, out, dtype=dtype, revision=revision, token=token, offline=offline, force=force,
                 calib=calib, calib_tokens=calib_tokens, shard_size=parse_bytes(shard_size, "--shard-size"),
                 rotation=rotation, rotation_seed=rotation_seed, budget_bits=budget_bits,
                 progress=lambda msg: err.print(f"[dim]{time.monotonic() - t0:6.1f}s[/] {msg}"))
    files = list(open_bundle(folder).files.values())
    total = sum(f.size for f in files)
    if as_json:
        typer.echo(dumps("convert", {"bundle": str(folder), "total_bytes": total,
                                     "files": [asdict(f) for f in files]}))
        return
    typer.echo(f"{folder} ({len(files)} files, {format_bytes(total)}); inspect it with: xq inspect {folder}")
