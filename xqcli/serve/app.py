"""The ASGI app of `xq serve` (Starlette): OpenAI routes in front of one engine thread.

The engine runs in one background thread (`Batcher.run`: the decode loop); request handlers talk to it
through thread-safe queues: `Batcher.submit` / `cancel` in, each request's events out through
`loop.call_soon_threadsafe` onto its own asyncio queue. A streaming handler that stops being iterated (the
client went away: Starlette cancels it) cancels its request, and the row is freed before the next step.

Routes: POST /v1/chat/completions, POST /v1/completions (SSE with `stream: true`), GET /v1/models,
GET /health, GET /metrics. With an API key every route but /health wants `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from xqcli.engine.batcher import Batcher, Event, ShuttingDown
from xqcli.engine.batcher import Request as EngineRequest
from xqcli.errors import XQError
from xqcli.serve import metrics, protocol
from xqcli.serve.errors import APIError, from_library

if TYPE_CHECKING:
    from xqcli.tokenizer import Tokenizer

MAX_BODY = 4 << 20  # bytes of a request body (a long conversation is well under it)
CLIENT_GONE = 499  # the status counted for a request whose client disconnected first (nginx's convention)
# A running request ended by the engine's stop, not by its client: what its client is told (503).
STOPPED = ShuttingDown("the server stopped this request (shutting down)")


@dataclass
class Service:
    """What the routes share: the scheduler and its thread, the tokenizer, the served name, the key."""

    batcher: Batcher
    tokenizer: Tokenizer
    model_name: str
    api_key: str | None = None
    max_body: int = MAX_BODY
    requests: metrics.RequestCounts = field(default_factory=metrics.RequestCounts)
    created: int = field(default_factory=lambda: int(time.time()))
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.batcher.run, name="xq-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the engine thread: what is still running is cancelled, what waits is refused."""
        self.batcher.stop()
        if self.thread is not None:
            self.thread.join(timeout)


def build_app(service: Service) -> Starlette:
    """The Starlette app over `service`; starting and stopping it starts and stops the engine thread."""

    def route(path: str, name: str, handler: Callable[[Service, Request], Awaitable[Response]],
              methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                if name != "health":
                    _authorize(service, request)
                response = await handler(service, request)
            except APIError as e:
                response = e.response()
            service.requests.add(name, response.status_code)
            return response

        return Route(path, endpoint, methods=methods, name=name)

    async def no_route(request: Request, exc: HTTPException) -> Response:
        """404 for a path no route has, 405 (with `Allow`) for a method the route does not take; both counted."""
        path, headers = request.url.path, exc.headers or {}
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {path}: use {headers.get('Allow', 'another method')}"
        elif exc.status_code == 404:
            message = f"no route {request.method} {path}"
        else:
            message = str(exc.detail)
        service.requests.add(names.get(path, "other"), exc.status_code)
        return APIError(exc.status_code, message, headers=headers).response()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    routes = [route("/v1/chat/completions", "chat", lambda s, r: _complete(s, r, "chat"), ["POST"]),
              route("/v1/completions", "completion", lambda s, r: _complete(s, r, "completion"), ["POST"]),
              route("/v1/models", "models", _models, ["GET"]),
              route("/health", "health", _health, ["GET"]),
              route("/metrics", "metrics", _metrics, ["GET"])]
    names = {r.path: r.name for r in routes}
    return Starlette(routes=routes, exception_handlers={HTTPException: no_route}, lifespan=lifespan)


def _authorize(service: Service, request: Request) -> None:
    if service.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), service.api_key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' (the server's --api-key)",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _body(service: Service, request: Request) -> Any:
    """The JSON body, read up to the size limit (413 past it, 400 when it is not JSON)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > service.max_body:
        raise APIError(413, f"the request body is {int(declared):,} bytes, more than the limit of "
                            f"{service.max_body:,}")
    data = bytearray()
    try:
        async for part in request.stream():
            data += part
            if len(data) > service.max_body:
                raise APIError(413, f"the request body is more than the limit of {service.max_body:,} bytes")
    except ClientDisconnect:
        raise APIError(400, "the client went away before sending the whole body") from None
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


async def _complete(service: Service, request: Request, endpoint: str) -> Response:
    parsed = protocol.parse(await _body(service, request), endpoint)
    ids = await run_in_threadpool(_tokenize, service.tokenizer, parsed)
    batcher = service.batcher
    max_tokens = parsed.max_tokens
    if max_tokens is None:  # the rest of the context, or what the budget holds (completions: at most 16)
        room = batcher.max_new_tokens(len(ids))
        max_tokens = max(1, room if endpoint == "chat" else min(room, protocol.COMPLETION_MAX_TOKENS))
    params = parsed.params.with_(max_tokens=max_tokens)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:  # engine thread -> this request's queue
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is gone (shutdown): nobody listens any more
            pass

    req = EngineRequest(ids, params, emit)
    try:
        batcher.submit(req)
    except XQError as e:
        raise from_library(e, "messages" if endpoint == "chat" else "prompt") from None
    rid = protocol.new_id(endpoint)
    if parsed.stream:
        return StreamingResponse(_stream(service, req, events, parsed, rid), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_client_gone(request))
    watcher.add_done_callback(lambda task: task.cancelled() or batcher.cancel(req))
    text: list[str] = []
    try:
        while True:
            ev = await events.get()
            if ev.kind == "token":
                text.append(ev.text)
            elif ev.finish == "cancelled" and req.cancelled:  # the client went away: nobody reads the answer
                return Response(status_code=CLIENT_GONE)
            elif ev.kind == "error" or ev.finish == "cancelled":
                raise from_library(ev.error or STOPPED)
            else:
                use = protocol.usage(ev.prompt_tokens, ev.generated_tokens, ev.reused_tokens)
                return JSONResponse(protocol.completion(endpoint, rid, service.model_name, "".join(text),
                                                        ev.finish or "stop", use))
    except asyncio.CancelledError:
        batcher.cancel(req)
        raise
    finally:
        watcher.cancel()


async def _client_gone(request: Request) -> None:
    """Return when the client of a request whose body was read disconnects (the next ASGI message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _tokenize(tokenizer: Tokenizer, parsed: protocol.Parsed) -> list[int]:
    if parsed.endpoint == "chat":
        if not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions with a plain prompt",
                           param="messages")
        try:
            ids = tokenizer.apply_chat_template(parsed.messages, add_generation_prompt=True, tokenize=True)
        except XQError as e:
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
    else:
        ids = tokenizer.encode(parsed.prompt or "")
    if not ids:
        raise APIError(400, "the prompt is empty", param="messages" if parsed.endpoint == "chat" else "prompt")
    return list(ids)


async def _stream(service: Service, req: EngineRequest, events: asyncio.Queue[Event], parsed: protocol.Parsed,
                  rid: str) -> AsyncIterator[str]:
    """Server-sent events: a role chunk (chat), one chunk per piece of text, the finish chunk, the usage
    chunk when asked for, then [DONE]; a failure mid-way is an error object, then [DONE]."""
    name, endpoint, created = service.model_name, parsed.endpoint, int(time.time())
    over = False
    try:
        if endpoint == "chat":
            yield _sse(protocol.chunk(endpoint, rid, name, created, role=True))
        while True:
            ev = await events.get()
            if ev.kind == "token":
                if ev.text:
                    yield _sse(protocol.chunk(endpoint, rid, name, created, text=ev.text))
                continue
            over = True
            if ev.kind == "error" or ev.finish == "cancelled":
                err = from_library(ev.error or STOPPED)
                yield _sse(err.body())
            else:
                yield _sse(protocol.chunk(endpoint, rid, name, created, finish=ev.finish))
                if parsed.include_usage:
                    use = protocol.usage(ev.prompt_tokens, ev.generated_tokens, ev.reused_tokens)
                    yield _sse(protocol.chunk(endpoint, rid, name, created, use=use))
            yield "data: [DONE]\n\n"
            return
    finally:
        if not over:  # the client went away (or the server is cancelling this task): free the row
            service.batcher.cancel(req)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _models(service: Service, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": service.model_name, "object": "model",
                                                      "created": service.created, "owned_by": "xq"}]})


async def _health(service: Service, request: Request) -> Response:
    snap = service.batcher.snapshot
    return JSONResponse({"status": "ok", "model": service.model_name, "active_rows": snap["active_rows"],
                         "rows": snap["rows"], "queue_depth": snap["queue_depth"]})


async def _metrics(service: Service, request: Request) -> Response:
    eng = service.batcher.engine
    info = {"model": service.model_name, "cache": eng.spec.name, "device": str(eng.device)}
    return PlainTextResponse(metrics.render(service.requests, service.batcher.snapshot, info),
                             media_type="text/plain; version=0.0.4")
