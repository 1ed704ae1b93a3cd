"""Options shared by several commands, declared once."""

from __future__ import annotations

import typer

DEVICE = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 or auto (the GPU when there is one).")
DTYPE = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: float32 on CPU, bfloat16 on GPU).")
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout (nothing else goes to stdout).")
CACHE = typer.Option("kv", "--cache", "-c",
                     help="Cache kind: kv, kivi-B, xquant-B or xquant-cl-B (B = 2, 3, 4, 8), or a method with --bits.")
BITS = typer.Option(None, "--bits", "-b", help="Bit width for --cache kivi|xquant|xquant-cl (2, 3, 4, 8).")
GROUP = typer.Option(128, "--group-size", help="Quantization group size (paper: 128).")
WINDOW = typer.Option(128, "--window", help="Newest tokens kept in full precision (paper's generation setting: 128).")
REVISION = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) for an HF id.")
