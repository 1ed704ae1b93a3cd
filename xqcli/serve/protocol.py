"""The OpenAI request bodies `xq serve` accepts, checked field by field, and the response objects it sends.

Every field is checked for its type and range; an unknown field is refused (400 naming it) rather than
silently ignored, so a client never believes a setting took effect when it did not. Fields a client sends
with their neutral value (`frequency_penalty: 0`, `logprobs: false`, `n: 1`, ...) are accepted. Beyond
OpenAI, `top_k`, `min_p` and `repeat_penalty` are taken (as llama-server takes them).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from xqcli.engine.sampling import SamplingParams
from xqcli.serve.errors import APIError

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # OpenAI's limit on stop strings
# Finish reasons of the engine -> OpenAI's: an end-of-sequence token or a stop string is "stop", a limit "length".
FINISH = {"eos": "stop", "stop": "stop", "max_tokens": "length", "context": "length"}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Parsed:
    """A checked request: what to render or encode, and how to sample."""

    endpoint: str  # "chat" | "completion"
    messages: list[dict[str, str]] | None  # chat
    prompt: str | None  # completion
    params: SamplingParams  # max_tokens: `max_tokens`, or 1 until the prompt is known when it is None
    max_tokens: int | None  # None: the client sent none (the server picks it once the prompt is known)
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, lo: float, hi: float, *, lo_open: bool = False,
            hi_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"'{key}' must be a number (got {v!r})", param=key)
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        raise APIError(400, f"'{key}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'} "
                            f"(got {v:g})", param=key)
    return float(v)


def _integer(body: dict, key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"'{key}' must be an integer (got {v!r})", param=key)
    if not lo <= v <= hi:
        raise APIError(400, f"'{key}' must be in [{lo}, {hi}] (got {v})", param=key)
    return v


def _neutral(body: dict, key: str, allowed: tuple) -> None:
    """A field xq does not implement, accepted only with the value that means "off" (or left out: null)."""
    if key in body and body[key] not in allowed:
        shown = " or ".join(json.dumps(v) for v in allowed if v is not None)
        raise APIError(400, f"'{key}' is not supported by xq serve: leave it out or send {shown}",
                       param=key)


COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "user",
          "frequency_penalty", "presence_penalty", "logprobs", "top_k", "min_p", "repeat_penalty"}
CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_ONLY = {"prompt", "echo", "suffix", "best_of"}


def parse(body: Any, endpoint: str) -> Parsed:
    """Check a request body of `/v1/chat/completions` (endpoint "chat") or `/v1/completions` ("completion")."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    known = COMMON | (CHAT_ONLY if endpoint == "chat" else COMPLETION_ONLY)
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(400, f"unknown field '{unknown[0]}' (this server takes: {', '.join(sorted(known))})",
                       param=unknown[0])
    if "model" in body and not isinstance(body["model"], str):
        raise APIError(400, "'model' must be a string", param="model")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise APIError(400, "'user' must be a string", param="user")
    n = _integer(body, "n", 1, 1 << 20)
    if n not in (None, 1):
        raise APIError(400, f"'n' must be 1: one completion per request (got {n})", param="n")
    for key in ("frequency_penalty", "presence_penalty"):
        _neutral(body, key, (0, None))  # 0.0 == 0
    _neutral(body, "logprobs", (False, None) if endpoint == "chat" else (None, 0))
    _neutral(body, "top_logprobs", (None, 0))
    _neutral(body, "echo", (False, None))
    _neutral(body, "suffix", (None, ""))
    _neutral(body, "best_of", (None, 1))
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be true or false (got {stream!r})", param="stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    if endpoint == "chat":
        messages, prompt = _messages(body.get("messages")), None
        max_tokens = _integer(body, "max_completion_tokens", 1, 1 << 40)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", 1, 1 << 40)
    else:
        messages, prompt = None, _prompt(body.get("prompt"))
        max_tokens = _integer(body, "max_tokens", 1, 1 << 40)
    # The ranges SamplingParams.check takes, so a value out of range is refused here, naming its field.
    sampling = {"temperature": _number(body, "temperature", 0, 2), "top_p": _number(body, "top_p", 0, 1, lo_open=True),
                "seed": _integer(body, "seed", 0, 2**63 - 1), "top_k": _integer(body, "top_k", 0, 1 << 30),
                "min_p": _number(body, "min_p", 0, 1, hi_open=True),
                "repeat_penalty": _number(body, "repeat_penalty", 0, 100, lo_open=True), "stop": _stop(body.get("stop"))}
    params = SamplingParams(max_tokens=max_tokens or 1).with_(**sampling)
    return Parsed(endpoint, messages, prompt, params, max_tokens, stream, include_usage)


def _stream_options(v: Any, stream: bool) -> bool:
    if v is None:
        return False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    if not isinstance(v, dict) or set(v) - {"include_usage"} or not isinstance(v.get("include_usage", False), bool):
        raise APIError(400, "'stream_options' takes {\"include_usage\": true|false}", param="stream_options")
    return bool(v.get("include_usage", False))


def _text(v: Any, param: str) -> str:
    """A content value: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in v):
        return "".join(p["text"] for p in v)
    raise APIError(400, f"'{param}' must be a string or a list of text parts (xq serve takes text only)", param=param)


def _messages(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"'{where}' must be an object", param=where)
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise APIError(400, f"unknown field '{where}.{extra[0]}' (xq serve takes role, content, name)",
                           param=f"{where}.{extra[0]}")
        if m.get("role") not in ROLES:
            raise APIError(400, f"'{where}.role' must be one of {', '.join(ROLES)} (got {m.get('role')!r})",
                           param=f"{where}.role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text(m.get("content"), f"{where}.content")})
    return out


def _prompt(v: Any) -> str:
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    if not isinstance(v, str):
        raise APIError(400, "'prompt' must be a string (or a list of one string; token arrays are not taken)",
                       param="prompt")
    return v


def _stop(v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > MAX_STOP:
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    return tuple(items)


# --- responses -------------------------------------------------------------------------------------------
def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, reused: int) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens` counts the prompt tokens found in the cache (prefix reuse)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": reused}}


def completion(endpoint: str, rid: str, model: str, text: str, finish: str, use: dict[str, Any]) -> dict[str, Any]:
    """The whole answer of a request without streaming."""
    if endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": FINISH.get(finish, "stop")}
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [choice], "usage": use}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH.get(finish, "stop")}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use}


def chunk(endpoint: str, rid: str, model: str, created: int, *, text: str | None = None, role: bool = False,
          finish: str | None = None, use: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed piece: a text delta, the final finish reason, or (with include_usage) the usage alone."""
    obj = {"id": rid, "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion",
           "created": created, "model": model}
    if use is not None:
        return obj | {"choices": [], "usage": use}
    reason = FINISH.get(finish, "stop") if finish else None
    if endpoint == "chat":
        delta: dict[str, Any] = ({"role": "assistant", "content": ""} if role else
                                 {} if text is None else {"content": text})
        return obj | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
    return obj | {"choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}
