"""`xq generate`: one greedy completion for scripts (stdout: the text, or one JSON object)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from xqcli.commands import _options as opt


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
        device: str = opt.DEVICE,
        dtype: Optional[str] = opt.DTYPE,
        revision: Optional[str] = opt.REVISION,
        as_json: bool = opt.JSON,
    ) -> None:
        """Greedy completion of a prompt. The text streams to stdout; stats go to stderr."""
        from xqcli.caches import CacheSpec
        from xqcli.errors import InputError

        if (prompt is None) == (prompt_file is None):
            raise InputError("give exactly one of --prompt/-p TEXT or --prompt-file FILE")
        if prompt_file is not None:
            try:
                prompt = sys.stdin.read() if str(prompt_file) == "-" else prompt_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"cannot read the prompt file {prompt_file}: {e}") from None
        spec = CacheSpec.parse(cache, bits=bits, window=window)
        from xqcli.generate import GenStats, greedy
        from xqcli.loader import load

        loaded = load(model, dtype=dtype, device=device, revision=revision)
        tok = loaded.tokenizer()
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True) if chat else tok.encode(prompt)
        stats = GenStats()
        out_ids: list[int] = []
        stream = tok.stream_decoder()
        for t in greedy(loaded.model, ids, max_tokens=max_tokens, cache=spec, eos_ids=tok.eos_ids, stats=stats):
            out_ids.append(t)
            if not as_json and t not in tok.eos_ids:
                piece = stream.feed(t)
                if piece:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        text = tok.decode([t for t in out_ids if t not in tok.eos_ids])
        if as_json:
            typer.echo(json.dumps({"schema": 1, "model": loaded.source.describe(), "cache": spec.name,
                                   "prompt": prompt, "text": text, "tokens": out_ids} | stats.as_dict()))
            return
        sys.stdout.write(stream.flush() + "\n")
        from rich.console import Console

        c = stats.cache
        Console(stderr=True).print(
            f"[dim]{stats.prompt_tokens} prompt + {stats.generated_tokens} generated tokens | "
            f"prefill {stats.prefill_tok_s:.1f} tok/s, decode {stats.decode_tok_s:.1f} tok/s | "
            f"cache {spec.name}: {c.total / 1024:.1f} KiB (fp16 KV would be {stats.kv_fp16_bytes / 1024:.1f} KiB)[/]")
