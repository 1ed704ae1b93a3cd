"""`xq convert`: an HF id, model folder or .gguf file -> an xq bundle folder (see docs/bundle.md)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from xqcli.commands._options import JsonOpt, OfflineOpt, RevisionOpt

EXAMPLES = ('xq convert HuggingFaceTB/SmolLM2-135M-Instruct -o smollm2-xq',
            'xq convert ./model.gguf --calib notes.txt --offline')


def convert(
    src: Annotated[str, typer.Argument(
        help="HF id org/name (or org/name@revision), a model folder, or a .gguf file.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Bundle folder to write (default: ./NAME-xq, NAME being the folder name, the .gguf file stem or the repo name of an HF id).")] = None,
    dtype: Annotated[str, typer.Option(
        "--dtype", help="Weight dtype in the bundle: bfloat16, float16, float32.")] = "bfloat16",
    revision: RevisionOpt = None,
    token: Annotated[Optional[str], typer.Option(
        "--token", help="Hugging Face token (default: HF_TOKEN, or the login).")] = None,
    offline: OfflineOpt = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing bundle folder (or an empty folder); never anything else.")] = False,
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
    as_json: JsonOpt = False,
) -> None:
    """Write a bundle: HF-shaped weights in --dtype, the SVD projections of every layer, a calibration
    (outlier statistics and clip ratios per layer) and xq.json with the sha256 of every file."""
    from rich.console import Console

    from xqcli.bundle.format import open_bundle
    from xqcli.convert.pipeline import convert as run
    from xqcli.readouts.render import dumps
    from xqcli.sources.hub import apply_offline
    from xqcli.units import format_bytes, parse_bytes

    err = Console(stderr=True, highlight=False)
    apply_offline(offline)
    t0 = time.monotonic()
    folder = run(src, out, dtype=dtype, revision=revision, token=token, offline=offline, force=force,
                 calib=calib, calib_tokens=calib_tokens, shard_size=parse_bytes(shard_size, "--shard-size"),
                 rotation=rotation, rotation_seed=rotation_seed,
                 progress=lambda msg: err.print(f"[dim]{time.monotonic() - t0:6.1f}s[/] {msg}"))
    files = list(open_bundle(folder).files.values())
    total = sum(f.size for f in files)
    if as_json:
        typer.echo(dumps("convert", {"bundle": str(folder), "total_bytes": total,
                                     "files": [asdict(f) for f in files]}))
        return
    typer.echo(f"{folder} ({len(files)} files, {format_bytes(total)}); inspect it with: xq inspect {folder}")
