"""The engine's decode step on the kernels path: `DecodeStep`, captured once in a CUDA graph and replayed.

On CUDA (and wherever the kernels are forced, as the CPU tests do under the Triton interpreter) the
engine decodes through `xqcli.engine.step.DecodeStep`, the same launches every step for every cache
kind. `StepDecoder` runs it: on CUDA with graphs on, two warm-up steps on a side stream, then one
capture, then a replay per step (the graph's inputs are the step's static `tokens` and `n_new`
buffers); otherwise the same step eagerly. `XQ_GRAPH=off` (`graph_setting`) is the escape hatch that
keeps the step and drops the capture.

One CUDA graph per engine: an engine has one batch size (its cache's rows), so "once per batch size".
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from xqcli.engine.step import DecodeStep
from xqcli.errors import InputError, ResourceError

__all__ = ["StepDecoder", "graph_setting"]


def graph_setting() -> str:
    """XQ_GRAPH from the environment: "on" (default: capture the decode step on CUDA) or "off" (run it
    eagerly); anything else is an error. The one place it is read (`xq doctor` shows it)."""
    env = os.environ.get("XQ_GRAPH", "on").strip().lower() or "on"
    if env not in ("on", "off"):
        raise InputError(f"XQ_GRAPH={env!r}: use on or off")
    return env


class StepDecoder:
    """Decode steps through a `DecodeStep`, captured in a CUDA graph when `graph` is true.

    The step reads the cache's `lengths` tensor in place, and a captured graph keeps pointing at the
    tensor it saw, while prefill and `reset` give the cache new ones. So the decoder owns one lengths
    tensor: before a step it copies the cache's lengths into it (when the cache holds another) and
    lends it to the cache, with the host mirror the engine keeps."""

    WARMUP = 2

    def __init__(self, step: DecodeStep, *, graph: bool) -> None:
        self.step, self.cache = step, step.cache
        self.lengths = torch.zeros_like(self.cache.lengths)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture = graph
        self.logits: Tensor | None = None
        self.warm = 0

    def __call__(self, tokens: Tensor, n_new: Tensor, n_host: list[int]) -> Tensor:
        """Logits (B, vocab) in float32 after one token per row (`n_host[b]` of them real, 0 or 1)."""
        cache, step = self.cache, self.step
        host = cache.host_lengths
        after = [n + k for n, k in zip(host, n_host)]
        if max(after) > cache.max_len:  # the static step cannot check: the host does, from its mirror
            raise ResourceError(f"context full: {max(after)} tokens > cache capacity {cache.max_len}",
                                hint="start a new conversation (/reset) or raise --context")
        if cache.lengths is not self.lengths:
            self.lengths.copy_(cache.lengths)
            cache.set_lengths(self.lengths, host)
        step.tokens.copy_(tokens)
        step.n_new.copy_(n_new)
        logits = self._run()
        cache.set_lengths(self.lengths, after)  # the step advanced the device lengths in place
        return logits

    def _run(self) -> Tensor:
        if not self.capture:
            return self.step()
        if self.graph is None and self.warm < self.WARMUP:  # warm-up (Triton compiles) off the capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step()
            torch.cuda.current_stream().wait_stream(side)
            self.warm += 1
            return out
        if self.graph is None:
            # Capture records the step without running it; the replay just after runs it once.
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.step()
        self.graph.replay()
        return self.logits
