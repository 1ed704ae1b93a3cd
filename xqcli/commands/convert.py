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
        rotation: str = typer.Option("hadamard", "--rotation",
                                     help="Rotation for +rot cache kinds: hadamard (block Hadamard) or random."),
        rotation_seed: int = typer.Option(0, "--rotation-seed", help="Seed of --rotation random."),
        budget_bits: Optional[float] = typer.Option(None, "--budget-bits",
                                                    help="Also store a per-layer bit plan averaging this many bits "
                                                    "(use it as xquant-B+mix)."),
        budget: Optional[str] = typer.Option(None, "--budget",
                                             help="Cache memory budget (e.g. 6GiB) at --context: sets --budget-bits."),
        context: Optional[int] = typer.Option(None, "--context", help="Target context (tokens) for --budget."),
        as_json: bool = opt.JSON,
    ) -> None:
        """Write a bundle: HF-shaped weights in --dtype, the SVD projections of every layer, a calibration
        (clip ratios, outlier statistics, a per-layer bit plan) and xq.json with the sha256 of every file."""
        from rich.console import Console

        from xqcli.convert.pipeline import convert as run
        from xqcli.readouts.plan import parse_bytes

        if budget is not None:
            budget_bits = _bits_for_budget(src, parse_bytes(budget), context)
        err = Console(stderr=True, highlight=False)
        t0 = time.monotonic()
        folder = run(src, out, dtype=dtype, revision=revision, token=token, offline=offline, force=force,
                     calib=calib, calib_tokens=calib_tokens, shard_size=parse_bytes(shard_size),
                     rotation=rotation, rotation_seed=rotation_seed, budget_bits=budget_bits,
                     progress=lambda msg: err.print(f"[dim]{time.monotonic() - t0:6.1f}s[/] {msg}"))
        from xqcli.bundle.format import open_bundle

        report = open_bundle(folder).report()
        if as_json:
            typer.echo(json.dumps({"schema": 1, "bundle": str(folder), "total_bytes": report["total_bytes"],
                                   "files": report["files"]}, indent=2))
            return
        typer.echo(f"{folder} ({len(report['files'])} files, {report['total_bytes'] / 2**20:,.1f} MiB); "
                   f"inspect it with: xq inspect {folder}")


def _bits_for_budget(src: str, budget: int, context: int | None) -> float:
    """The average xquant bits whose cache (payload + fp16 scale/zero per 128) fits `budget` at `context`."""
    from xqcli.errors import InputError
    from xqcli.sources.hub import resolve
    from xqcli.readouts.plan import paper_bytes_per_token
    from xqcli.cache.spec import CacheSpec
    from xqcli.config import ModelConfig

    if not context or context < 1:
        raise InputError("--budget needs --context N (the context the budget must hold)")
    source = resolve(src)
    if source.kind == "gguf":
        raise InputError("--budget with a .gguf source: convert once, then use --budget-bits")
    cfg = ModelConfig.from_file(source.path / "config.json")
    per_bit = paper_bytes_per_token(cfg, CacheSpec.parse("xquant-3")) - paper_bytes_per_token(
        cfg, CacheSpec.parse("xquant-2"))
    at2 = paper_bytes_per_token(cfg, CacheSpec.parse("xquant-2"))
    bits = 2 + (budget / context - at2) / per_bit
    if bits < 2:
        raise InputError(f"no plan fits {budget / 2**30:.2f} GiB at {context} tokens: even 2 bits everywhere needs "
                         f"{at2 * context / 2**30:.2f} GiB", hint="raise --budget or lower --context")
    return min(8.0, round(bits, 2))
