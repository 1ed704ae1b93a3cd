"""`xq generate`: one completion for scripts (stdout: the text, or one JSON object; see docs/generate.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from xqcli.commands._options import (
    BitsOpt,
    CacheOpt,
    ContextOpt,
    CudaGraphOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MinPOpt,
    RepeatPenaltyOpt,
    RevisionOpt,
    SeedOpt,
    StopOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    WindowOpt,
)

MEMORY_FIELDS = ("context_tokens", "capacity_tokens", "kv_fp16_bytes", "ratio_now", "bytes_per_token",
                 "kv_fp16_bytes_per_token", "ratio", "workspace_bytes_per_token", "device", "allocated", "reserved",
                 "peak", "rss")


def generate(
    model: Annotated[str, typer.Argument(help="Model folder, .gguf file, bundle or HF id org/name[@revision].")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", help="Read the prompt from a file (- for stdin).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Tokens to generate at most.")] = 64,
    cache: CacheOpt = "kv",
    bits: BitsOpt = None,
    window: WindowOpt = 128,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt (with --chat).")] = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    context: ContextOpt = None,
    cuda_graph: CudaGraphOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Complete a prompt (greedy unless --temperature > 0). The text streams to stdout; stats go to
    stderr. With --json, stdout is one object described by docs/generate.schema.json."""
    from xqcli.cache.spec import CacheSpec
    from xqcli.engine import Engine, SamplingParams
    from xqcli.errors import InputError
    from xqcli.load import load
    from xqcli.readouts.render import dumps
    from xqcli.units import format_bytes, parse_tokens

    if (prompt is None) == (prompt_file is None):
        raise InputError("give exactly one of --prompt/-p TEXT or --prompt-file FILE")
    if system is not None and not chat:
        raise InputError("--system needs --chat")
    params = SamplingParams(max_tokens=max_tokens).with_(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed,
        stop=stop)
    ctx = parse_tokens(context) if context is not None else None
    if prompt_file is not None:
        try:
            prompt = sys.stdin.read() if str(prompt_file) == "-" else prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the prompt file {prompt_file}: {e}") from None
    spec = CacheSpec.parse(cache, bits=bits, window=window)
    loaded = load(model, dtype=dtype, device=device, revision=revision)
    tok = loaded.tokenizer()
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, tokenize=True)
    else:
        ids = tok.encode(prompt)
    if not ids:
        raise InputError("the prompt is empty", hint="pass some text with -p")
    engine = Engine(loaded.model, tok, spec, context=ctx or len(ids) + params.max_tokens, cuda_graph=cuda_graph,
                    sampling=params, artifacts=loaded.artifacts)
    tokens: list[int] = []
    pieces: list[str] = []
    finish = None
    for step in engine.generate(ids):
        tokens.append(step.token)
        pieces.append(step.text)
        finish = step.finish or finish
        if not as_json and step.text:
            sys.stdout.write(step.text)
            sys.stdout.flush()
    stats, mem = engine.stats, engine.memory()
    text = "".join(pieces)
    if as_json:
        typer.echo(dumps("generate", result_object(loaded, spec, engine, prompt, text, tokens, finish, stats, mem)))
        return
    sys.stdout.write("\n")
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[dim]{stats.prompt_tokens} prompt + {stats.generated_tokens} generated tokens ({finish}) | "
        f"prefill {stats.prefill_tok_s:.1f} tok/s, decode {stats.decode_tok_s:.1f} tok/s | "
        f"cache {spec.name}: {format_bytes(mem.cache.total)} (fp16 KV would be {format_bytes(mem.kv_fp16_bytes)}), "
        f"{mem.bytes_per_token:,.0f} B/token past the window = {mem.ratio:.2f}x[/]")


def result_object(loaded, spec, engine, prompt, text, tokens, finish, stats, mem) -> dict[str, Any]:
    """The `--json` data under the envelope; docs/generate.schema.json describes it, field by field."""
    m = mem.as_dict()
    memory = {k: m[k] for k in MEMORY_FIELDS} | {"cache_bytes": m["cache"]}
    return {
        "model": loaded.source.describe(), "cache": spec.name, "device": str(engine.device),
        "dtype": str(loaded.model.dtype).removeprefix("torch."), "decode_mode": engine.decode_mode,
        "prompt": prompt, "text": text, "tokens": tokens, "finish": finish,
        "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
        "timings": {"prefill_s": round(stats.prefill_s, 6), "decode_s": round(stats.decode_s, 6),
                    "prefill_tok_s": round(stats.prefill_tok_s, 3), "decode_tok_s": round(stats.decode_tok_s, 3)},
        "sampling": engine.sampling.as_dict(),
        "memory": memory,
    }
