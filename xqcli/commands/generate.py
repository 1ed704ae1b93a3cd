"""`xq generate`: one completion for scripts (stdout: the text, or one JSON object; see docs/generate.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from xqcli.commands import _options as opt
from xqcli.commands.chat import (
    CONTEXT,
    CUDA_GRAPH,
    MIN_P,
    REPEAT_PENALTY,
    SEED,
    STOP,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    parse_context,
    sampling_from_options,
)

SCHEMA_VERSION = 1


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        model: str = typer.Argument(..., help="Model folder, .gguf file, bundle or HF id org/name[@revision]."),
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text."),
        prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from a file (- for stdin)."),
        max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="Tokens to generate at most."),
        cache: str = opt.CACHE,
        bits: Optional[int] = opt.BITS,
        window: int = opt.WINDOW,
        chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
        system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt (with --chat)."),
        temperature: Optional[float] = TEMPERATURE,
        top_k: Optional[int] = TOP_K,
        top_p: Optional[float] = TOP_P,
        min_p: Optional[float] = MIN_P,
        repeat_penalty: Optional[float] = REPEAT_PENALTY,
        seed: Optional[int] = SEED,
        stop: Optional[list[str]] = STOP,
        context: Optional[str] = CONTEXT,
        cuda_graph: bool = CUDA_GRAPH,
        device: str = opt.DEVICE,
        dtype: Optional[str] = opt.DTYPE,
        revision: Optional[str] = opt.REVISION,
        as_json: bool = opt.JSON,
    ) -> None:
        """Complete a prompt (greedy unless --temperature > 0). The text streams to stdout; stats go to
        stderr. With --json, stdout is one object described by docs/generate.schema.json."""
        from xqcli.cache.spec import CacheSpec
        from xqcli.errors import InputError

        if (prompt is None) == (prompt_file is None):
            raise InputError("give exactly one of --prompt/-p TEXT or --prompt-file FILE")
        if system is not None and not chat:
            raise InputError("--system needs --chat")
        params = sampling_from_options({"max_tokens": max_tokens}, temperature=temperature, top_k=top_k, top_p=top_p,
                                       min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=stop)
        ctx = parse_context(context) if context is not None else None
        if prompt_file is not None:
            try:
                prompt = sys.stdin.read() if str(prompt_file) == "-" else prompt_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"cannot read the prompt file {prompt_file}: {e}") from None
        spec = CacheSpec.parse(cache, bits=bits, window=window)
        from xqcli.engine.loop import Engine
        from xqcli.load import load

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
                        sampling=params)
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
            typer.echo(json.dumps(result_object(loaded, spec, engine, prompt, text, tokens, finish, stats, mem)))
            return
        sys.stdout.write("\n")
        from rich.console import Console

        c = mem.cache
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[dim]{stats.prompt_tokens} prompt + {stats.generated_tokens} generated tokens ({finish}) | "
            f"prefill {stats.prefill_tok_s:.1f} tok/s, decode {stats.decode_tok_s:.1f} tok/s | "
            f"cache {spec.name}: {c.total / 1024:.1f} KiB (fp16 KV would be {mem.kv_fp16_bytes / 1024:.1f} KiB), "
            f"{mem.bytes_per_token:,.0f} B/token past the window = {mem.ratio:.2f}x[/]")


def result_object(loaded, spec, engine, prompt, text, tokens, finish, stats, mem) -> dict:
    """The `--json` object; docs/generate.schema.json describes it, field by field."""
    m = mem.as_dict()
    memory = {k: m[k] for k in ("context_tokens", "capacity_tokens", "kv_fp16_bytes", "ratio_now", "bytes_per_token",
                                "kv_fp16_bytes_per_token", "ratio", "workspace_bytes_per_token", "device",
                                "allocated", "reserved", "peak", "rss")}
    memory["cache_bytes"] = m["cache"]
    return {
        "schema_version": SCHEMA_VERSION, "tool": "xq generate", "model": loaded.source.describe(),
        "cache": spec.name, "device": str(engine.device),
        "dtype": str(loaded.model.dtype).removeprefix("torch."), "decode_mode": engine.decode_mode,
        "prompt": prompt, "text": text, "tokens": tokens, "finish": finish,
        "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
        "timings": {"prefill_s": round(stats.prefill_s, 6), "decode_s": round(stats.decode_s, 6),
                    "prefill_tok_s": round(stats.prefill_tok_s, 3), "decode_tok_s": round(stats.decode_tok_s, 3)},
        "sampling": engine.sampling.as_dict(),
        "memory": memory,
    }
