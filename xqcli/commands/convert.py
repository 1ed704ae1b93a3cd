"""`xq convert`: an HF id, model folder or .gguf file -> an xq bundle folder (see docs/bundle.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from xqcli.commands import _options as opt


def register(app: typer.Typer) -> None:
    @app.command()
    def convert(
        src: str = typer.Argument(..., help="HF id org/name (or org/name@revision), a model folder, "
                                  "or a .gguf file."),
        out: Optional[Path] = typer.Option(None, "--out", "-o",
                                           help="Bundle folder to write (default ./<name>-xq)."),
        dtype: str = typer.Option("bfloat16", "--dtype",
                                  help="Weight dtype in the bundle: bfloat16, float16, float32."),
        revision: Optional[str] = opt.REVISION,
        token: Optional[str] = typer.Option(None, "--token",
                                            help="Hugging Face token (default: HF_TOKEN, or the login)."),
        offline: Optional[bool] = typer.Option(None, "--offline/--online", help="Use only the local HF cache "
                                               "(default: HF_HUB_OFFLINE)."),
        force: bool = typer.Option(False, "--force", "-f", help="Replace an existing bundle folder."),
        calib: Optional[Path] = typer.Option(None, "--calib", help="UTF-8 calibration text (default: the "
                                             "Python documentation text of the standard library)."),
        calib_tokens: int = typer.Option(2048, "--calib-tokens",
                                         help="Calibration tokens (the first N of the text)."),
        shard_size: str = typer.Option("2GB", "--shard-size",
                                       help="Largest weight file before sharding (2GB, 500MB)."),
        as_json: bool = opt.JSON,
    ) -> None:
        """Write a bundle: HF-shaped weights in --dtype, the SVD projections of every layer, a calibration
        (clip ratios, outlier statistics, a per-layer bit plan) and xq.json with the sha256 of every file."""
        from rich.console import Console

        from xqcli.convert import convert as run
        from xqcli.plan import parse_bytes

        err = Console(stderr=True, highlight=False)
        t0 = time.monotonic()
        folder = run(src, out, dtype=dtype, revision=revision, token=token, offline=offline, force=force,
                     calib=calib, calib_tokens=calib_tokens, shard_size=parse_bytes(shard_size),
                     progress=lambda msg: err.print(f"[dim]{time.monotonic() - t0:6.1f}s[/] {msg}"))
        from xqcli.bundle import open_bundle

        report = open_bundle(folder).report()
        if as_json:
            typer.echo(json.dumps({"schema": 1, "bundle": str(folder), "total_bytes": report["total_bytes"],
                                   "files": report["files"]}, indent=2))
            return
        typer.echo(f"{folder} ({len(report['files'])} files, {report['total_bytes'] / 2**20:,.1f} MiB); "
                   f"inspect it with: xq inspect {folder}")
