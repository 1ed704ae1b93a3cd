"""`xq generate`: one completion for scripts (stdout: the text, or one JSON object; see docs/generate.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from xqcli.commands._options import (
    MAX_INT,
    AllowLongContextOpt,
    BitsOpt,
    CacheOpt,
    CudaGraphOpt,
    DeviceOpt,
    DtypeOpt,
    GenerateContextOpt,
    JsonOpt,
    MinPOpt,
    OfflineOpt,
    RepeatPenaltyOpt,
    RevisionOpt,
    SeedOpt,
    StopOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    WindowOpt,
    at_most,
    utf8_text,
)

EXAMPLES = ('xq generate smollm2-xq -p "The capital of France is" -n 16',
            'git diff | xq generate smollm2-xq --chat -p - --context 8k --json > answer.json')

MEMORY_FIELDS = ("context_tokens", "capacity_tokens", "cache_allocated", "kv_fp16_bytes", "ratio_now", "model_dtype",
                 "kv_model_bytes", "ratio_now_model", "window", "compression_from", "bytes_per_token",
                 "kv_fp16_bytes_per_token", "ratio", "workspace_bytes_per_token", "tokens_left", "tokens_left_limit",
                 "trained_tokens", "budget", "budget_source", "device", "allocated", "reserved", "peak", "rss")


def generate(
    model: Annotated[str, typer.Argument(help="Model folder, .gguf file, bundle or HF id org/name[@revision].")],
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", callback=utf8_text, help="Prompt text; - reads it from stdin.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", "-f", help="Read the prompt from a UTF-8 file (- for stdin).")] = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", "-n", callback=at_most(MAX_INT), help="Tokens to generate at most.")] = 64,
    cache: CacheOpt = None,
    bits: BitsOpt = None,
    window: WindowOpt = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[Optional[str], typer.Option(
        "--system", "-s", callback=utf8_text, help="System prompt (with --chat).")] = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    context: GenerateContextOpt = None,
    allow_long_context: AllowLongContextOpt = False,
    cuda_graph: CudaGraphOpt = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    offline: OfflineOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Complete a prompt (greedy unless --temperature > 0) through the cache `xq chat` would use. The text
    streams to stdout; stats go to stderr. With --json, stdout is one object described by
    docs/generate.schema.json (installed with xq: `xq doctor` shows the folder)."""
    from xqcli.bundle.defaults import choose_spec
    from xqcli.engine import Engine, SamplingParams
    from xqcli.errors import InputError
    from xqcli.load import load
    from xqcli.readouts.render import dumps
    from xqcli.readouts.stats import memory_summary
    from xqcli.sources.hub import apply_offline
    from xqcli.units import parse_tokens

    if (prompt is None) == (prompt_file is None):
        raise InputError("give exactly one of --prompt/-p TEXT or --prompt-file/-f FILE (- for stdin)")
    if prompt == "-":  # as in most tools: "-" is stdin
        prompt, prompt_file = None, Path("-")
    if system is not None and not chat:
        raise InputError("--system needs --chat")
    params = SamplingParams(max_tokens=max_tokens).with_(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed,
        stop=stop)
    ctx = parse_tokens(context) if context is not None else None
    if prompt_file is not None:
        try:  # stdin as bytes: its text layer may let undecodable bytes through as surrogates
            raw = sys.stdin.buffer.read() if str(prompt_file) == "-" else prompt_file.read_bytes()
            prompt = raw.decode("utf-8")
        except FileNotFoundError:
            raise InputError(f"the prompt file {prompt_file} does not exist",
                             hint="check the path; -f - reads the prompt from stdin") from None
        except OSError as e:
            raise InputError(f"cannot read the prompt file {prompt_file}: {e.strerror or e}",
                             hint="check the path and its permissions") from None
        except UnicodeDecodeError as e:
            raise InputError(f"cannot read the prompt file {prompt_file}: {e}",
                             hint="the prompt must be UTF-8 text") from None
    if cache is not None:
        choose_spec(cache, bits=bits, window=window)  # fail on a bad kind before loading anything
    apply_offline(offline)
    loaded = load(model, dtype=dtype, device=device, revision=revision)
    bundle_defaults = loaded.bundle.manifest.get("cache_defaults") if loaded.bundle is not None else None
    spec = choose_spec(cache, bits=bits, window=window, cache_defaults=bundle_defaults)
    tok = loaded.tokenizer()
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, tokenize=True)
    else:
        ids = tok.encode(prompt)
    if not ids:
        raise InputError("the prompt is empty", hint="pass some text with -p")
    if ctx is None:  # room for the answer, within the trained positions unless allowed past them
        ctx = len(ids) + params.max_tokens
        if not allow_long_context:
            ctx = min(ctx, loaded.config.max_position_embeddings)
    engine = Engine(loaded.model, tok, spec, context=ctx, cuda_graph=cuda_graph, sampling=params,
                    artifacts=loaded.artifacts, allow_long_context=allow_long_context)
    if engine.decode_note and not as_json:
        print(engine.decode_note, file=sys.stderr)
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
        f"{stats.prompt_tokens} prompt + {stats.generated_tokens} generated tokens ({finish}) | "
        f"prefill {stats.prefill_tok_s:.1f} tok/s, decode {stats.decode_tok_s:.1f} tok/s | {memory_summary(mem)}",
        style="dim", markup=False)


def result_object(loaded, spec, engine, prompt, text, tokens, finish, stats, mem) -> dict[str, Any]:
    """The `--json` data under the envelope; docs/generate.schema.json describes it, field by field."""
    from xqcli.readouts.stats import memory_summary

    m = mem.as_dict()
    memory = {k: m[k] for k in MEMORY_FIELDS} | {"cache_bytes": m["cache"], "summary": memory_summary(mem)}
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
