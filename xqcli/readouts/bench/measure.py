"""Measuring on the device: timers, peak memory, peak rates, free memory, the environment, one cache kind.

What is timed is the model's own forward (no decode engine): one prefill of the context through a fresh
cache, then `decode_tokens` single-token steps through the filled cache, repeated `reps` times after
`warmup` untimed repetitions. Between repetitions the cache is restored to its snapshot taken right after
the prefill (`cache.snapshot()` / `cache.restore()`), so every repetition decodes the same positions.
Prefill and decode compute only the last position's logits (a real engine never needs the rest).
On CUDA, time comes from CUDA events after a synchronize; on CPU from `time.perf_counter`.

Bytes per token are measured from the filled cache (`cache.bytes_per_token()`: payload + scales per
quantized token; the full-precision window is itemized separately); `xq plan`'s number (a meta-device
cache, window 0) is reported beside it and agrees exactly.

Peak memory: `torch.cuda.max_memory_allocated` on CUDA (weights included); on Linux CPUs the growth of
the process peak RSS over its level before the row, after resetting the peak through
/proc/self/clear_refs (weights excluded; memory the allocator already held is not seen); otherwise None.
Peak rates are measured at start: a large device copy (read + write bytes) and a large square matmul in
the model dtype.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.config import ModelConfig
from xqcli.load import make_cache, model_projections
from xqcli.model import Transformer
from xqcli.readouts.bench.results import Peaks, Row
from xqcli.system import available_memory, git_commit, peak_rss_since_reset, process_memory, reset_peak_rss


class Timer:
    """Wall time of a region; CUDA events after a synchronize on GPUs."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def __enter__(self) -> "Timer":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a region: CUDA max_memory_allocated, or the process peak RSS growth on Linux."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.source = self._probe()

    def _probe(self) -> str | None:
        if self.device.type == "cuda":
            return "cuda_max_memory_allocated"
        return "cpu_peak_rss_delta" if reset_peak_rss() and peak_rss_since_reset() is not None else None

    @property
    def includes_weights(self) -> bool:
        return self.source == "cuda_max_memory_allocated"

    def start(self) -> None:
        if self.source == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source:
            _malloc_trim()
            reset_peak_rss()
            self._base = process_memory()[0] or 0

    def stop(self) -> int | None:
        if self.source == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.source:
            hwm = peak_rss_since_reset()
            return None if hwm is None else max(0, hwm - self._base)
        return None


def measure_peaks(device: torch.device, dtype: torch.dtype) -> Peaks:
    """A large device copy and a large matmul (small on CPUs, so the calibration stays under a second)."""
    t0 = time.perf_counter()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes, n, reps = int(min(2**30, free // 8)) // 4 * 4, 8192, 10
    else:
        nbytes, n, reps = 64 * 2**20, 1024, 3
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    y.copy_(x)
    best = math.inf
    for _ in range(reps):
        with Timer(device) as t:
            y.copy_(x)
        best = min(best, t.seconds)
    bw = 2 * nbytes / best
    del x, y
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = math.inf
    for _ in range(reps):
        with Timer(device) as t:
            a @ b
        best = min(best, t.seconds)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Peaks(bw / 1e9, 2 * n**3 / best / 1e12, nbytes, n, str(dtype).removeprefix("torch."),
                 time.perf_counter() - t0)


def device_free_bytes(device: torch.device) -> tuple[int | None, str | None]:
    """(free bytes, where the number comes from): CUDA's free memory, or the system's available memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(device)[0]), "cuda_free"
    avail = available_memory()
    return avail, ("mem_available" if avail is not None else None)


# ------------------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return out.splitlines()[0].strip() if out else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware for the record (GPU name, driver, torch/triton/xq versions, git commit, CPU)."""
    from xqcli import __version__

    commit, dirty = git_commit()
    env: dict[str, Any] = {"xq": __version__, "git_commit": commit, "git_dirty": dirty,
                           "python": platform.python_version(), "platform": platform.platform(),
                           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": None,
                           "transformers": None,
                           "cpu": {"model": _cpu_model(), "cores": os.cpu_count(),
                                   "torch_threads": torch.get_num_threads()},
                           "load_avg": None, "gpu": None}
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a broken optional package only loses its version line
            env[mod] = None
    try:
        env["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "total_bytes": int(props.total_memory), "driver": _nvidia_driver(),
                      "sm_count": props.multi_processor_count}
    return env


# ---------------------------------------------------------------------------------------- a cache kind


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Transformer:
    """Random weights at the real shapes, built directly on the device: N(0, 0.02), norms 1, biases 0."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def last_logits(model: Transformer, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Logits of the last position only (all a decode step needs), after `tokens` went through the cache."""
    h = model.hidden_states(tokens, cache)
    return F.linear(h[:, -1], model.output_weight())


def prefill(model: Transformer, tokens: torch.Tensor, cache, chunk: int | None) -> torch.Tensor:
    """One forward of the whole context, or consecutive chunks of `chunk` tokens through the same cache."""
    if not chunk or tokens.shape[1] <= chunk:
        return last_logits(model, tokens, cache)
    for s in range(0, tokens.shape[1], chunk):
        logits = last_logits(model, tokens[:, s:s + chunk], cache)
    return logits


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_decode(row: Row, per_token_ms: list[float]) -> None:
    """Fill a row's decode columns from the per-token times of the timed repetitions."""
    row.decode_ms_reps = [round(x, 4) for x in per_token_ms]
    row.decode_ms = statistics.median(per_token_ms)
    row.decode_ms_p90 = percentile(per_token_ms, 0.9)


def measure_kind(model: Transformer, artifacts: Artifacts, spec: CacheSpec, context: int, batch: int,
                 decode_tokens: int, warmup: int, reps: int, timer_dev: torch.device, peak: PeakMemory,
                 gen: torch.Generator, prefill_chunk: int | None = None) -> Row:
    """Prefill `context` random tokens through a fresh cache of kind `spec`, then time the decode steps."""
    cfg = model.config
    row = Row(spec.name, "xq", context, batch)
    if spec.method in ("xquant", "xquant-cl") and uses_latents(cfg):
        model_projections(model, artifacts)  # the SVDs (or a bundle's factors) now, outside the timing
    tokens = torch.randint(0, cfg.vocab_size, (batch, context), device=model.device, generator=gen)
    peak.start()
    cache = make_cache(model, spec, batch, context + decode_tokens, artifacts=artifacts)
    with torch.inference_mode():
        if warmup > 0:  # an untimed prefill first: kernel selection, allocator growth, lazy inits
            prefill(model, tokens, cache, prefill_chunk)
            cache.reset()
        with Timer(timer_dev) as t:
            logits = prefill(model, tokens, cache, prefill_chunk)
        row.prefill_s = t.seconds
        row.prefill_tok_s = batch * context / t.seconds if t.seconds > 0 else None
        row.cache_bytes = cache.nbytes().as_dict()
        row.bytes_per_token = cache.bytes_per_token()
        first = logits.argmax(-1, keepdim=True)  # (B, 1)
        snapshot = cache.snapshot()
        per_token: list[float] = []
        for r in range(warmup + reps):
            cache.restore(snapshot)
            tok = first
            with Timer(timer_dev) as t:
                for _ in range(decode_tokens):
                    tok = last_logits(model, tok, cache).argmax(-1, keepdim=True)
            if r >= warmup:
                per_token.append(t.seconds / decode_tokens * 1e3)
    row.peak_bytes = peak.stop()
    time_decode(row, per_token)
    del cache, snapshot
    return row


def calibrate_step(model: Transformer, device: torch.device, n: int = 8) -> float:
    """Seconds of one decode step at a short context (best of 2), after an untimed n-token prefill."""
    cache = make_cache(model, CacheSpec.parse("kv"), 1, n + 3)
    tokens = (torch.arange(n, device=model.device) % model.config.vocab_size)[None]
    best = math.inf
    with torch.inference_mode():
        tok = last_logits(model, tokens, cache).argmax(-1, keepdim=True)
        for _ in range(2):
            with Timer(device) as t:
                tok = last_logits(model, tok, cache).argmax(-1, keepdim=True)
            best = min(best, t.seconds)
    return best
