"""`xq serve`: an OpenAI-compatible server (chat and text completions, SSE streaming) with continuous batching."""

from __future__ import annotations

from typing import Annotated

import typer

from xqcli.commands._options import (
    MAX_INT,
    AllowLongContextOpt,
    BitsOpt,
    CacheOpt,
    CudaGraphOpt,
    DeviceOpt,
    DtypeOpt,
    OfflineOpt,
    RevisionOpt,
    WindowOpt,
    at_most,
)

EXAMPLES = ("xq serve smollm2-xq --cache xquant-4 --budget 512MiB --max-rows 16",
            "XQ_API_KEY=secret xq serve HuggingFaceTB/SmolLM2-135M-Instruct --host 0.0.0.0 --port 8080 --context 8k")


def serve(
    model: Annotated[str, typer.Argument(help="Model folder, .gguf file, bundle or HF id org/name[@revision].")],
    cache: CacheOpt = None,
    bits: BitsOpt = None,
    window: WindowOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: a free one, printed).")] = 8000,
    context: Annotated[str | None, typer.Option(
        "--context", "--ctx-size", help="Tokens per row (prompt plus answer): 4096 or 8k (k = 1024). Default: the "
                                        "model's trained positions, at most 4096.")] = None,
    budget: Annotated[str | None, typer.Option(
        "--budget", help="Memory the cached tokens may hold, e.g. 512MiB: requests are admitted while their prompt "
                         "plus max_tokens fit, at this cache kind's bytes per token (default: every row full).")] = None,
    max_rows: Annotated[int, typer.Option(
        "--max-rows", min=1, max=4096, help="Rows of the batch: requests served at once.")] = 8,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=1, callback=at_most(MAX_INT), help="Requests that may wait for a row; more get 429.")] = 64,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="XQ_API_KEY",
        help="Require 'Authorization: Bearer KEY' on every route but /health (env XQ_API_KEY).")] = None,
    max_body: Annotated[str, typer.Option("--max-body", help="Largest request body, e.g. 4MiB.")] = "4MiB",
    shutdown_timeout: Annotated[int, typer.Option(
        "--shutdown-timeout", min=0, max=86400,
        help="Seconds running requests may take to finish after SIGTERM or Ctrl-C before they are cancelled.")] = 30,
    allow_long_context: AllowLongContextOpt = False,
    cuda_graph: CudaGraphOpt = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    offline: OfflineOpt = None,
) -> None:
    """Serve MODEL over HTTP with the OpenAI API: POST /v1/chat/completions and /v1/completions (streaming
    with SSE), GET /v1/models, /health and /metrics (Prometheus). Requests share the batch between decode
    steps; a smaller cache kind admits more tokens in the same --budget. Stops cleanly on SIGTERM or Ctrl-C
    (exit 0). Needs the serve extra: pip install 'xqcli[serve]'. See docs/serve.md."""
    from xqcli.errors import MissingDependencyError

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"xq serve needs Starlette and Uvicorn ({e.name} is not installed)",
                                     hint="pip install 'xqcli[serve]'") from None
    from xqcli.serve.server import ServeOptions
    from xqcli.serve.server import serve as run
    from xqcli.sources.hub import apply_offline
    from xqcli.units import parse_bytes, parse_tokens

    opts = ServeOptions(cache=cache, bits=bits, window=window, host=host, port=port,
                        context=parse_tokens(context) if context is not None else None,
                        budget=parse_bytes(budget) if budget is not None else None, max_rows=max_rows,
                        max_queue=max_queue, api_key=api_key or None, max_body=parse_bytes(max_body, "--max-body"),
                        shutdown_timeout=shutdown_timeout, device=device, dtype=dtype, revision=revision,
                        cuda_graph=cuda_graph, allow_long_context=allow_long_context)
    apply_offline(offline)
    run(model, opts)
