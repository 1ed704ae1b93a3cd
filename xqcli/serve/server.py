"""Starting `xq serve`: the model, the engine and its scheduler, the socket, Uvicorn, and a clean stop.

Uvicorn runs the app on the main thread's event loop; SIGTERM or Ctrl-C stops accepting connections, lets
running requests finish for up to `shutdown_timeout` seconds, then stops the engine, which ends what still
runs (a stream gets its error event and [DONE], a whole answer its 503) and refuses what waits; the engine
thread is joined and the process exits 0 (a stop that was asked for is no error).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from xqcli.bundle.defaults import choose_spec
from xqcli.cache.spec import CacheSpec
from xqcli.engine import Engine
from xqcli.engine.batcher import Batcher, RowBytes
from xqcli.errors import InputError, ResourceError
from xqcli.load import load
from xqcli.serve.app import MAX_BODY, Service, build_app
from xqcli.units import format_bytes

DEFAULT_ROWS = 8
DEFAULT_QUEUE = 64
# Seconds past --shutdown-timeout that Uvicorn waits before cancelling the handlers itself: they end on their
# own once the engine has stopped their requests (after at most the step running then).
UVICORN_GRACE_S = 60


@dataclass
class ServeOptions:
    """Everything `xq serve` takes besides the model (the command's options, parsed)."""

    cache: str | None = None
    bits: int | None = None
    window: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    context: int | None = None
    budget: int | None = None
    max_rows: int = DEFAULT_ROWS
    max_queue: int = DEFAULT_QUEUE
    api_key: str | None = None
    max_body: int = MAX_BODY
    shutdown_timeout: int = 30
    device: str = "auto"
    dtype: str | None = None
    revision: str | None = None
    cuda_graph: bool = True
    allow_long_context: bool = False


class _Server(uvicorn.Server):
    """Uvicorn, with two changes to its stop. The grace period is ours: `shutdown_timeout` seconds after the
    stop begins, the engine is stopped, so every handler still waiting hears why from the engine and answers
    (Uvicorn's own timeout, set later, would cancel the handlers mid-answer). And a SIGTERM or SIGINT it
    handled is not raised again after the stop (Uvicorn re-raises it: the process would end with the signal
    instead of exit 0)."""

    def __init__(self, config: uvicorn.Config, service: Service, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.service, self.shutdown_timeout = service, shutdown_timeout

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        getattr(self, "_captured_signals", []).clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.shutdown_timeout, self.service.batcher.stop)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def model_name(source: str) -> str:
    """The id `/v1/models` lists: an HF id as given, a folder or file by its name."""
    path = Path(source)
    return path.stem if path.suffix == ".gguf" else path.name if path.exists() else source


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads are wasted on a port that is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"--host {host}: {e.strerror}", hint="give an address such as 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}",
                         hint="choose another --port (0 picks a free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def startup_line(service: Service, spec: CacheSpec, url: str) -> str:
    """One line: what is served where, the rows, and how many tokens the budget admits (beside kv)."""
    b = service.batcher
    eng = b.engine
    tokens = b.budget_tokens()
    kv = RowBytes(eng.model, CacheSpec.parse("kv"), eng.context).tokens_within(b.budget)
    dtype = str(eng.model.dtype).removeprefix("torch.")
    vs_kv = f" (kv: {kv:,}, {tokens / kv:.1f}x)" if spec.method != "kv" and kv else ""
    rows = f"{eng.batch} row{'s' if eng.batch != 1 else ''}"
    return (f"xq serve: {service.model_name}, {spec.name} cache ({eng.device}, {dtype}), on {url}/v1 | "
            f"{rows} x {eng.context:,} tokens, {format_bytes(b.allocated)} allocated | "
            f"budget {format_bytes(b.budget)} holds {tokens:,} tokens{vs_kv} | {eng.decode_mode} decode")


def serve(model: str, opts: ServeOptions) -> None:
    """Load `model`, start the engine thread and serve until SIGTERM or Ctrl-C."""
    if min(opts.max_rows, opts.max_queue, opts.max_body) < 1 or opts.shutdown_timeout < 0:
        raise InputError("--max-rows, --max-queue and --max-body must be >= 1, --shutdown-timeout >= 0")
    if opts.cache is not None:
        choose_spec(opts.cache, bits=opts.bits, window=opts.window)  # a bad kind fails before anything loads
    sock = listen(opts.host, opts.port)
    try:
        loaded = load(model, dtype=opts.dtype, device=opts.device, revision=opts.revision)
        defaults = loaded.bundle.manifest.get("cache_defaults") if loaded.bundle is not None else None
        spec = choose_spec(opts.cache, bits=opts.bits, window=opts.window, cache_defaults=defaults)
        engine = Engine(loaded.model, loaded.tokenizer(), spec, context=opts.context, batch=opts.max_rows,
                        cuda_graph=opts.cuda_graph, artifacts=loaded.artifacts,
                        allow_long_context=opts.allow_long_context)
        batcher = Batcher(engine, budget=opts.budget, max_queue=opts.max_queue)
        if batcher.budget_tokens() < 2:  # a one-token prompt and one generated token: nothing would ever run
            raise ResourceError(f"--budget {format_bytes(batcher.budget)} holds no request: a row of 2 tokens of "
                                f"{spec.name} needs {format_bytes(batcher.row_bytes(2))}",
                                hint="raise --budget (or leave it out: every row full)")
        service = Service(batcher, engine.tokenizer, model_name(model), opts.api_key, opts.max_body)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(startup_line(service, spec, f"http://{shown}:{port}"), file=sys.stderr, flush=True)
        if engine.decode_note:
            print(engine.decode_note, file=sys.stderr, flush=True)
        config = uvicorn.Config(build_app(service), http="h11", lifespan="on", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=opts.shutdown_timeout + UVICORN_GRACE_S)
        _Server(config, service, opts.shutdown_timeout).run(sockets=[sock])
    finally:
        sock.close()
