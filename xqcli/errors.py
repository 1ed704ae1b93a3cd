"""Library errors. Each class carries a documented process exit code and a fix hint.

The CLI's single error boundary (`xqcli.cli.main`) prints ``error: <message>`` plus the hint on
stderr and exits with ``exit_code``. The table is documented in README.md ("Exit codes").
"""

from __future__ import annotations


class XQError(Exception):
    """Base class for every error xq reports to a user."""

    exit_code: int = 1
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class InputError(XQError):
    """Bad arguments or input files: unknown method, bad bits, missing path, empty text."""

    exit_code = 2


class ModelError(XQError):
    """The model source cannot be used: bad config.json, weights, tokenizer."""

    exit_code = 3


class UnsupportedModelError(ModelError):
    """A `model_type` or architecture xq does not implement."""


class WeightsError(ModelError):
    """Missing, unexpected, mis-shaped or unreadable weight tensors."""


class GGUFError(ModelError):
    """A `.gguf` file that is corrupt or of a kind xq cannot read."""


class BundleError(XQError):
    """A bundle folder that is corrupt, tampered with, or from a newer schema."""

    exit_code = 4


class HubError(XQError):
    """A Hugging Face download or cache lookup failed (offline, missing, gated)."""

    exit_code = 5


class MissingDependencyError(XQError):
    """An optional extra (gguf, plot, transformers) is needed for this request."""

    exit_code = 6


class ResourceError(XQError):
    """The request does not fit: memory budget, context beyond the cache or the trained positions, disk space."""

    exit_code = 7


class GateFailed(XQError):
    """A `--fail-if` gate of `xq bench` evaluated true (for CI scripts)."""

    exit_code = 8


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected internal error (run with XQ_DEBUG=1 for the traceback and report it)",
    2: "bad input: arguments, paths, texts",
    3: "model source unusable: config, weights, tokenizer, GGUF",
    4: "bundle corrupt, tampered with, or from a newer schema",
    5: "Hugging Face hub: not in the cache while offline, not found, or not authorized",
    6: "an optional dependency is missing",
    7: "does not fit: memory budget, context, or disk space",
    8: "a --fail-if gate failed",
    130: "interrupted (Ctrl-C)",
}
