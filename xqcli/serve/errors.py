"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Clients (the openai package, Open WebUI, `llm`) show `message` and branch on the status; `param` names the
request field at fault, so a client author sees which one to fix.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from xqcli.engine.batcher import PromptTooLong, QueueFull, ShuttingDown
from xqcli.errors import InputError, ResourceError, XQError

RETRY_AFTER_S = 1  # what a 429 asks the client to wait (a row frees as soon as one request ends)


# HTTP status -> OpenAI's error `type`.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server refuses, as the HTTP status and the OpenAI error object it answers with."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_library(e: XQError, prompt_param: str = "prompt") -> APIError:
    """The status for a library error: too many waiting (429), shutting down (503), the request does not fit
    (400 naming `prompt_param`, the request's prompt field, when the prompt alone does not, else max_tokens)
    or is bad (400), anything else a server fault (500)."""
    text = str(e) + (f" ({e.hint})" if e.hint else "")
    if isinstance(e, QueueFull):
        return APIError(429, f"{text}: retry shortly", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, ShuttingDown):
        return APIError(503, text, code="shutting_down")
    if isinstance(e, PromptTooLong):
        return APIError(400, text, param=prompt_param, code="context_length_exceeded")
    if isinstance(e, ResourceError):
        return APIError(400, text, param="max_tokens", code="context_length_exceeded")
    if isinstance(e, InputError):
        return APIError(400, text)
    return APIError(500, text)
