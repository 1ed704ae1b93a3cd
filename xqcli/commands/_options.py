"""Options shared by several commands, declared once (`Annotated` types; each command sets the default).

Only typer (and the leaf `xqcli.units`) is imported here: `xqcli.cli` must stay cheap to import. Every integer
option is bounded (`callback=at_most(...)`), so no value reaches torch as an overflowing C integer; the ranges
that matter (bits, seed, >= 1) are checked by the library with their own messages. The bound is a callback, not
`max=`: an IntRange prints its bound in the help ("[x<=1099511627776]"), which says nothing a user needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Optional

import typer

from xqcli.errors import InputError
from xqcli.units import MAX_TOKENS, parse_tokens

MAX_INT = MAX_TOKENS  # every count option (tokens, bits, sizes, repetitions) is at most this
MAX_SEED = 2**63 - 1
DEVICES = "auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def at_most(limit: int) -> Callable[[int | None], int | None]:
    """An option callback refusing integers above `limit` (usage error, exit 2)."""
    def check(value: int | None) -> int | None:
        if value is not None and value > limit:
            raise typer.BadParameter(f"{value} is more than {limit:,}, the most this option takes")
        return value
    return check


def _known_device(value: str) -> str:
    """Refuse a device torch would reject with a list of its internal back ends (bad input, not a crash)."""
    if not _DEVICE.fullmatch(value.strip().lower()):
        raise typer.BadParameter(f"unknown device {value!r}: use {DEVICES}")
    return value.strip().lower()


def is_utf8(text: str) -> bool:
    """False for text holding undecodable input bytes: Python hands them over as lone surrogates (argv, and
    streams read with errors="surrogateescape")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_text(value: str | list[str] | None) -> str | list[str] | None:
    """Option callback: refuse text that is not valid UTF-8 (bad input, exit 2)."""
    if not all(is_utf8(t) for t in ([value] if isinstance(value, str) else value or [])):
        raise typer.BadParameter("not valid UTF-8 text (check the encoding of the terminal or the file)")
    return value


def token_count_refused(suggestion: str) -> Callable[[str | None], str | None]:
    """An option callback for `-c`: llama.cpp users type `-c 4096` for the context size. In xq `-c` is the cache
    kind (in every command), and no cache kind starts with a digit, so a token count is answered with
    `suggestion` (`{value}`: the text given, `{tokens}`: its token count), the command's own option for what was
    meant."""
    def check(value: str | None) -> str | None:
        if value is None or not value.strip()[:1].isdigit():
            return value
        try:
            tokens = parse_tokens(value)
        except InputError:
            return value
        raise typer.BadParameter(f"{value!r} is a token count, not a cache kind: -c is --cache in xq "
                                 f"({suggestion.format(value=value.strip(), tokens=tokens)} "
                                 "llama.cpp's -c is the context size)")
    return check


not_a_context = token_count_refused("did you mean --context {value}?")  # chat, generate, serve, bench
not_a_seq_len = token_count_refused("did you mean --seq-len {tokens}?")  # eval: its window, a plain integer
not_a_plan_context = token_count_refused(  # plan has no context: it answers how long a context fits
    "plan takes cache kinds with -c and no context: it prints their bytes per token, and with --budget 24GiB "
    "the longest context that fits;")


DeviceOpt = Annotated[str, typer.Option(
    "--device", callback=_known_device, help="cpu, cuda, cuda:1, mps or auto (the GPU when there is one).")]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="float32, float16 or bfloat16 (default: float32 on CPU, bfloat16 on GPU).")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print one JSON object on stdout (nothing else goes to stdout).")]
CacheOpt = Annotated[Optional[str], typer.Option(
    "--cache", "-c", callback=not_a_context,
    help="Cache kind: kv, kivi-B, xquant-B or xquant-cl-B (B = 2, 3, 4, 8), or a method with --bits. "
         "Variants: +rot (rotated X; wins on MHA models, loses on GQA at 4 bits (Wikipedia) and 3 bits (news)), "
         "+ch0 (latent channel 0 kept exact; only where latents are cached, GQA with 2·d_kv < d; worse perplexity "
         "at 3 bits on Wikipedia). "
         "Default: the bundle's cache settings, else xquant-4. (-c is not the context size: that is --context.)")]
BitsOpt = Annotated[Optional[int], typer.Option(
    "--bits", "-b", callback=at_most(MAX_INT), help="Bit width for --cache kivi|xquant|xquant-cl (2, 3, 4, 8).")]
GroupOpt = Annotated[int, typer.Option("--group-size", callback=at_most(MAX_INT), help="Quantization group size (paper: 128).")]
WindowOpt = Annotated[Optional[int], typer.Option(
    "--window", callback=at_most(MAX_INT),
    help="Newest tokens kept in full precision (default: the bundle's setting, else 128, the paper's generation "
         "setting; at most the context).")]
RevisionOpt = Annotated[Optional[str], typer.Option(
    "--revision", help="Hub revision (branch, tag or commit) for an HF id.")]
OfflineOpt = Annotated[Optional[bool], typer.Option(
    "--offline/--online", help="Use only the local Hugging Face cache for an HF id (default: HF_HUB_OFFLINE).")]
FormatOpt = Annotated[Optional[str], typer.Option(
    "--format", help="table, md, csv or json (default: a table on a terminal, md otherwise; json = --json).")]

# Generation: shared by `xq chat` and `xq generate`.
TemperatureOpt = Annotated[Optional[float], typer.Option(
    "--temperature", "--temp", help="0 = greedy. Default: chat 0.7, generate 0.")]
TopKOpt = Annotated[Optional[int], typer.Option(
    "--top-k", callback=at_most(MAX_INT), help="Keep the k most likely tokens (0 = off).")]
TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", help="Nucleus sampling: keep the most likely tokens up to this mass, in (0, 1].")]
MinPOpt = Annotated[Optional[float], typer.Option(
    "--min-p", help="Drop tokens less likely than min-p times the most likely one, in [0, 1).")]
RepeatPenaltyOpt = Annotated[Optional[float], typer.Option(
    "--repeat-penalty", help="Above 1 discourages tokens already in the context (1 = off).")]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", callback=at_most(MAX_SEED), help="Seed for sampling (each answer starts from it): reproducible output.")]
StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", callback=utf8_text, help="Stop when the text contains this string (repeatable); it is not printed.")]
_CONTEXT_HELP = ("Tokens the cache holds (allocated up front): 4096 or 32k (k = 1024, e.g. 32k = 32,768; 32000 for "
                 "exact), at most the model's trained positions unless --allow-long-context. Default: ")
ChatContextOpt = Annotated[Optional[str], typer.Option(
    "--context", "--ctx-size", help=_CONTEXT_HELP + "the model's trained positions, at most 4096.")]
GenerateContextOpt = Annotated[Optional[str], typer.Option(
    "--context", "--ctx-size", help=_CONTEXT_HELP + "the prompt plus --max-tokens, at most the model's trained positions.")]
_LONG_CONTEXT_HELP = ("Allow a {option} beyond the model's trained positions (max_position_embeddings in its config): "
                      "RoPE positions it never saw in training, so {what} past them are likely garbage.")
AllowLongContextOpt = Annotated[bool, typer.Option(
    "--allow-long-context", help=_LONG_CONTEXT_HELP.format(option="--context", what="answers"))]
AllowLongSeqLenOpt = Annotated[bool, typer.Option(  # eval: its window is --seq-len
    "--allow-long-context", help=_LONG_CONTEXT_HELP.format(option="--seq-len (or passkey --lengths)",
                                                           what="scores"))]
CudaGraphOpt = Annotated[bool, typer.Option(
    "--cuda-graph/--no-cuda-graph",
    help="CUDA: capture the decode step (every cache kind) in a CUDA graph (default; --no-cuda-graph or "
         "XQ_GRAPH=off runs the same step eagerly).")]
