"""Options shared by several commands, declared once (`Annotated` types; each command sets the default).

Only typer is imported here: `xqcli.cli` must stay cheap to import.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

DeviceOpt = Annotated[str, typer.Option(
    "--device", help="cpu, cuda, cuda:1 or auto (the GPU when there is one).")]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="float32, float16 or bfloat16 (default: float32 on CPU, bfloat16 on GPU).")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print one JSON object on stdout (nothing else goes to stdout).")]
CacheOpt = Annotated[str, typer.Option(
    "--cache", "-c",
    help="Cache kind: kv, kivi-B, xquant-B or xquant-cl-B (B = 2, 3, 4, 8), or a method with --bits.")]
BitsOpt = Annotated[Optional[int], typer.Option(
    "--bits", "-b", help="Bit width for --cache kivi|xquant|xquant-cl (2, 3, 4, 8).")]
GroupOpt = Annotated[int, typer.Option("--group-size", help="Quantization group size (paper: 128).")]
WindowOpt = Annotated[int, typer.Option(
    "--window", help="Newest tokens kept in full precision (paper's generation setting: 128).")]
RevisionOpt = Annotated[Optional[str], typer.Option(
    "--revision", help="Hub revision (branch, tag or commit) for an HF id.")]

# Generation: shared by `xq chat` and `xq generate`.
TemperatureOpt = Annotated[Optional[float], typer.Option(
    "--temperature", "--temp", help="0 = greedy. Default: chat 0.7, generate 0.")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")]
TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", help="Nucleus sampling: keep the most likely tokens up to this mass, in (0, 1].")]
MinPOpt = Annotated[Optional[float], typer.Option(
    "--min-p", help="Drop tokens less likely than min-p times the most likely one, in [0, 1).")]
RepeatPenaltyOpt = Annotated[Optional[float], typer.Option(
    "--repeat-penalty", help="> 1 discourages tokens already in the context (1 = off).")]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", help="Seed for sampling (each answer starts from it): reproducible output.")]
StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", help="Stop when the text contains this string (repeatable); it is not printed.")]
ContextOpt = Annotated[Optional[str], typer.Option(
    "--context",
    help="Tokens the cache holds (allocated up front): 4096 or 32k (k = 1024, e.g. 32k = 32,768; 32000 for exact). "
         "Default: the model's maximum, at most 4096.")]
CudaGraphOpt = Annotated[bool, typer.Option(
    "--cuda-graph/--no-cuda-graph",
    help="GPU and --cache kv only: capture the decode step in a CUDA graph (experimental).")]
