"""`xq bench`: memory and speed of every cache kind side by side, measured, with the cost model beside it.

What is timed is the model's own forward (no decode engine): one prefill of the context through a fresh
cache, then `decode_tokens` single-token steps through the filled cache, repeated `reps` times after
`warmup` untimed repetitions. Between repetitions the cache is put back to the state it had right after
the prefill (row lengths, and for quantized kinds each stream's sealed/tail counters and full-precision
tail), so every repetition decodes the same positions; codes past the context are simply overwritten.
Prefill and decode compute only the last position's logits (a real engine never needs the rest).
On CUDA, time comes from CUDA events after a synchronize; on CPU from `time.perf_counter`.

Cost model (spec §7-8, per decode step, batch B, context N, L layers, d = hidden, d_kv = n_kv·head_dim):
- FLOPs = 2·(matmul parameters)·B + attention 4·q_dim·N·L·B (QKᵀ and PV) + rebuild FLOPs of the kind:
  `kv`, `kivi-B`: 0 (dequantization is not counted);
  `xquant-B` with latents (GQA, 2·d_kv < d): 2·2·N·d_kv² per layer (K = lat_k·M_k, V = lat_v·M_v);
  `xquant-B` caching X: 2·2·N·d·d_kv per layer (K = X̂·W_k, V = X̂·W_v; MHA: 4·N·d²);
  `xquant-cl-B`: plain XQuant below the seed layer; from the seed layer on, with latents
  8·N·d·d_kv per layer (up-project 2·d_kv -> d, then W_kv d -> 2·d_kv), caching X N·(d + 4·d·d_kv).
- Bytes = weights read per step (every parameter except an untied input embedding, which is only
  indexed) + the stored cache (payload + scales + fp window; the XQuant-CL accumulator is a transient
  workspace and its traffic is not counted).
- Roofline floor = bytes / measured peak bandwidth + rebuild FLOPs / measured peak FLOP/s (no overlap
  assumed; the paper's premise is that the rebuild hides under weight streaming, which would make the
  floor the max of the two terms). Peaks are measured at start: a large device copy (read + write
  bytes) and a large square matmul in the model dtype.

Bytes per token are measured from the filled cache: for each stream, (payload + scales) / tokens it
has quantized (the full-precision window is itemized separately), summed over streams; `xq plan`'s
number (a meta-device cache, window 0) is reported beside it and agrees exactly. Ratios are against
fp16 KV (L·2·d_kv·2 bytes per token) whatever the model dtype, so `kv` in float32 shows 0.5.

Peak memory: `torch.cuda.max_memory_allocated` on CUDA (weights included); on Linux CPUs the growth of
the process peak RSS over its level before the row, after resetting the peak through
/proc/self/clear_refs (weights excluded; memory the allocator already held is not seen); otherwise None.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from xqcli.cache.base import CacheBytes, KVCache
from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.load import make_cache
from xqcli.config import ModelConfig
from xqcli.errors import GateFailed, InputError, MissingDependencyError, ResourceError
from xqcli.model import Transformer

SCHEMA_VERSION = 1
DEFAULT_KINDS = ("kv", "kivi-4", "xquant-4", "xquant-2", "xquant-cl-3")
FORMATS = ("table", "md", "json", "jsonl", "csv")
METRICS = ("ratio", "bytes_per_token", "decode_ms", "prefill_tok_s", "peak_bytes", "max_context")
HF_KIND = "hf"  # rows measured through transformers' generate (its default dynamic cache)
MAX_SECONDS = 30 * 60  # runs estimated longer than this are refused without --force
Progress = Callable[[str], None]


# ------------------------------------------------------------------------------------------- parsing


def parse_contexts(text: str) -> list[int]:
    """'4k,32k' -> [4096, 32768] (k = 1024); plain integers are tokens."""
    out: list[int] = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(k?)", p)
        n = int(float(m.group(1)) * (1024 if m.group(2) else 1)) if m else 0
        if n < 1:
            raise InputError(f"--context: cannot read {part.strip()!r}",
                             hint="write token counts like 256,4k,32k (k = 1024)")
        if n not in out:
            out.append(n)
    if not out:
        raise InputError("--context is empty", hint="e.g. --context 4k,32k")
    return out


def parse_kinds(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """Canonical cache kind names, in order, without duplicates."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for k in items:
        if k.strip():
            name = CacheSpec.parse(k).name
            if name not in out:
                out.append(name)
    if not out:
        raise InputError("--cache is empty", hint=f"e.g. --cache {','.join(DEFAULT_KINDS)}")
    return out


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b, "<": lambda a, b: a < b, ">": lambda a, b: a > b,
}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?"
_GATE = re.compile(r"^\s*([a-z0-9+\-]+)\.([a-z_]+)\s*(<=|>=|==|!=|<|>)\s*(" + _NUMBER + r")\s*$")


@dataclass(frozen=True)
class Gate:
    """`--fail-if KIND.METRIC OP NUMBER`: fails when the comparison is true for any context row of KIND
    (equivalently: the gate passes only if the condition is false at every context)."""

    kind: str
    metric: str
    op: str
    value: float
    text: str

    @classmethod
    def parse(cls, text: str, kinds: list[str]) -> "Gate":
        m = _GATE.match(text.lower())
        if not m:
            raise InputError(f"--fail-if {text!r}: expected KIND.METRIC OP NUMBER",
                             hint="e.g. 'xquant-4.ratio<3.5'; OP in < <= > >= == !=; "
                                  f"metrics: {', '.join(METRICS)}")
        kind, metric, op, num = m.groups()
        if kind != HF_KIND:
            kind = CacheSpec.parse(kind).name
        if kind not in kinds:
            raise InputError(f"--fail-if {text!r}: kind {kind!r} is not benchmarked in this run",
                             hint=f"benchmarked: {', '.join(kinds)}")
        if metric not in METRICS:
            raise InputError(f"--fail-if {text!r}: unknown metric {metric!r}",
                             hint=f"metrics: {', '.join(METRICS)}")
        return cls(kind, metric, op, float(num), text.strip())

    def failures(self, rows: list["Row"]) -> list[str]:
        """One message per context row where the gate fires (or its metric was not measured)."""
        out = []
        for r in rows:
            if r.kind != self.kind:
                continue
            v = getattr(r, self.metric)
            if v is None:
                out.append(f"{self.text}: {self.metric} not measured at context {r.context}"
                           + (f" ({r.error})" if r.error else ""))
            elif _OPS[self.op](float(v), self.value):
                out.append(f"{self.text}: {self.kind} {self.metric} = {_num(v)} at context {r.context}")
        return out


def check_gates(result: "BenchResult", gates: list[Gate]) -> list[str]:
    return [msg for g in gates for msg in g.failures(result.rows)]


# --------------------------------------------------------------------------------------- cost model


def _elem(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters multiplied per token: every linear layer and the LM head (norms and the lookup excluded)."""
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    attn = d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d
    if cfg.attention_bias:
        attn += cfg.q_dim + 2 * cfg.kv_dim
    mlp = 3 * d * cfg.intermediate_size
    return L * (attn + mlp) + cfg.vocab_size * d


def weights_read_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Weight bytes a decode step streams: the matmul parameters plus the norms."""
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    return (matmul_params(cfg) + norms) * _elem(dtype)


def rebuild_flops(cfg: ModelConfig, spec: CacheSpec, n: int, batch: int = 1) -> int:
    """FLOPs to rebuild K and V of n cached tokens in every layer (module docstring)."""
    if spec.method in ("kv", "kivi"):
        return 0
    d, dkv, L = cfg.hidden_size, cfg.kv_dim, cfg.num_hidden_layers
    lat = uses_latents(cfg)
    plain = 4 * dkv * dkv if lat else 4 * d * dkv  # per token per layer
    if spec.method == "xquant":
        return batch * n * L * plain
    plain_layers = min(max(spec.base_layers - 1, 0), L)
    cl = 8 * d * dkv if lat else d + 4 * d * dkv
    return batch * n * (plain_layers * plain + (L - plain_layers) * cl)


def attention_flops(cfg: ModelConfig, n: int, batch: int = 1) -> int:
    """QKᵀ and PV of one new token against n cached ones, all layers."""
    return 4 * cfg.q_dim * n * cfg.num_hidden_layers * batch


def decode_flops(cfg: ModelConfig, spec: CacheSpec | None, n: int, batch: int = 1) -> int:
    rb = rebuild_flops(cfg, spec, n, batch) if spec is not None else 0
    return 2 * matmul_params(cfg) * batch + attention_flops(cfg, n, batch) + rb


def prefill_flops(cfg: ModelConfig, spec: CacheSpec | None, n: int, batch: int = 1) -> int:
    """n tokens through every layer (causal attention), the LM head on the last one, the cache rebuild."""
    body = 2 * (matmul_params(cfg) - cfg.vocab_size * cfg.hidden_size) * n * batch
    head = 2 * cfg.vocab_size * cfg.hidden_size * batch
    attn = 2 * cfg.q_dim * n * n * cfg.num_hidden_layers * batch
    return body + head + attn + (rebuild_flops(cfg, spec, n, batch) if spec is not None else 0)


# ------------------------------------------------------------------------------- device measurements


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


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


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
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        except OSError:
            return None
        return "cpu_peak_rss_delta" if _proc_status_kib("VmHWM") is not None else None

    @property
    def includes_weights(self) -> bool:
        return self.source == "cuda_max_memory_allocated"

    def start(self) -> None:
        if self.source == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source:
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _proc_status_kib("VmRSS") or 0

    def stop(self) -> int | None:
        if self.source == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.source:
            hwm = _proc_status_kib("VmHWM")
            return None if hwm is None else max(0, hwm - self._base) * 1024
        return None


@dataclass
class Peaks:
    """Peak rates measured at bench start."""

    bandwidth_gb_s: float  # device copy: (read + write bytes) / time, best of reps
    tflop_s: float  # square matmul: 2·n³ / time, best of reps
    copy_bytes: int
    matmul_n: int
    dtype: str
    seconds: float  # what the calibration took


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


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_free_bytes(device: torch.device) -> tuple[int | None, str | None]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(device)[0]), "cuda_free"
    avail = _mem_available()
    return avail, ("mem_available" if avail is not None else None)


# -------------------------------------------------------------------------------------- environment


def _git_commit() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None, None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip() != ""
        return rev or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


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

    commit, dirty = _git_commit()
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


# ------------------------------------------------------------------------------------------ results


@dataclass
class Row:
    """One cache kind at one context."""

    kind: str
    engine: str  # "xq" (our model and caches) or "transformers" (--hf)
    context: int
    batch: int
    bytes_per_token: float | None = None  # measured: (payload + scales) per quantized token, per sequence
    plan_bytes_per_token: float | None = None  # `xq plan` (meta-device cache, window 0)
    paper_bytes_per_token: float | None = None  # the paper's formula (bits + 32/g per element)
    ratio: float | None = None  # fp16 KV bytes per token / bytes_per_token
    plan_ratio: float | None = None
    cache_bytes: dict[str, int] | None = None  # held at the context (CacheBytes.as_dict: payload, scales,
    # fp_window, workspace, total)
    prefill_s: float | None = None
    prefill_tok_s: float | None = None
    decode_ms: float | None = None  # median per token over reps
    decode_ms_p90: float | None = None
    decode_ms_reps: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    max_context: int | None = None  # per sequence at this batch, for the cache budget
    step_bytes: int | None = None  # weights + stored cache read per decode step
    step_flops: int | None = None  # 2·matmul params·B + attention + rebuild
    rebuild_flops: int | None = None
    achieved_gb_s: float | None = None
    achieved_tflop_s: float | None = None
    roofline_ms: float | None = None  # memory term + rebuild compute term
    roofline_mem_ms: float | None = None
    roofline_compute_ms: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Verdict:
    context: int
    fastest: str | None
    fits_longest: str | None
    text: str


@dataclass
class BenchResult:
    target: str
    model: dict[str, Any]
    settings: dict[str, Any]
    environment: dict[str, Any]
    peaks: Peaks
    memory: dict[str, Any]
    estimate: dict[str, Any]
    rows: list[Row]
    verdicts: list[Verdict]
    notes: list[str]
    elapsed_s: float
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "tool": "xq bench", "target": self.target,
                "model": self.model, "settings": self.settings, "environment": self.environment,
                "peaks": asdict(self.peaks), "memory": self.memory, "estimate": self.estimate,
                "rows": [r.as_dict() for r in self.rows], "verdicts": [asdict(v) for v in self.verdicts],
                "notes": self.notes, "elapsed_s": round(self.elapsed_s, 3)}

    def __rich__(self):
        return rich_table(self)


# ---------------------------------------------------------------------------------------- measuring


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


def _stored_bytes_per_token(cache) -> float | None:
    """(payload + scales) per quantized token and sequence, summed over streams; None if none sealed yet."""
    if isinstance(cache, KVCache):
        n = int(cache.lengths.sum())
        return cache.nbytes().payload / n if n else None
    total = 0.0
    for layer in getattr(cache, "streams", []):
        for st in layer:
            n = sum(st.sealed)
            if n == 0:
                return None
            b = st.nbytes()
            total += (b.payload + b.scales) / n
    return total


class _Snapshot:
    """A cache's state right after prefill: row lengths and each stream's counters and fp tail."""

    def __init__(self, cache) -> None:
        self.lengths, self.host_lengths = cache.lengths.clone(), list(cache.host_lengths)
        self.streams = [[(list(st.sealed), list(st.tail_len),
                          st.tail.clone() if hasattr(st, "tail") else None)  # unquantized: no tail
                         for st in layer] for layer in getattr(cache, "streams", [])]

    def restore(self, cache) -> None:
        cache.set_lengths(self.lengths.clone(), list(self.host_lengths))
        for layer, saved in zip(getattr(cache, "streams", []), self.streams, strict=True):
            for st, (sealed, tail_len, tail) in zip(layer, saved, strict=True):
                st.sealed, st.tail_len = list(sealed), list(tail_len)
                if tail is not None:
                    st.tail.copy_(tail)


def _last_logits(model: Transformer, tokens: torch.Tensor, cache) -> torch.Tensor:
    h = model.hidden_states(tokens, cache)
    return F.linear(h[:, -1], model.output_weight())


def _prefill(model: Transformer, tokens: torch.Tensor, cache, chunk: int | None) -> torch.Tensor:
    """One forward of the whole context, or consecutive chunks of `chunk` tokens through the same cache."""
    if not chunk or tokens.shape[1] <= chunk:
        return _last_logits(model, tokens, cache)
    for s in range(0, tokens.shape[1], chunk):
        logits = _last_logits(model, tokens[:, s:s + chunk], cache)
    return logits


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _cache_budget(budget: int | None, weights: int, free: int | None) -> int | None:
    if budget is not None:
        return max(0, budget - weights)
    return free


def _fit(cache_budget: int | None, bpt: float | None, fixed: int, ws_per_token: float,
         batch: int) -> int | None:
    if cache_budget is None or not bpt:
        return None
    return max(0, int((cache_budget - fixed) // ((bpt + ws_per_token) * batch)))


def _meta_cache_terms(model_meta: Transformer, spec: CacheSpec, batch: int) -> tuple[int, float]:
    """(fixed fp-window bytes, workspace bytes per token) for `batch` rows, from meta-device caches."""
    a1 = make_cache(model_meta, spec, batch, 1024, device=torch.device("meta")).allocated()
    a2 = make_cache(model_meta, spec, batch, 2048, device=torch.device("meta")).allocated()
    return a1.fp_window, (a2.workspace - a1.workspace) / 1024 / batch


def _measure_xq(model: Transformer, spec: CacheSpec, context: int, batch: int, decode_tokens: int,
                warmup: int, reps: int, timer_dev: torch.device, peak: PeakMemory, gen: torch.Generator,
                prefill_chunk: int | None = None) -> Row:
    cfg = model.config
    row = Row(spec.name, "xq", context, batch)
    if spec.method in ("xquant", "xquant-cl") and uses_latents(cfg):
        from xqcli.bundle.projections import model_projections

        model_projections(model)  # the SVD (or a bundle's factors) once, outside every timed region
    tokens = torch.randint(0, cfg.vocab_size, (batch, context), device=model.device, generator=gen)
    peak.start()
    cache = make_cache(model, spec, batch, context + decode_tokens)
    with torch.inference_mode():
        if warmup > 0:  # an untimed prefill first: kernel selection, allocator growth, lazy inits
            _prefill(model, tokens, cache, prefill_chunk)
            cache.reset()
        with Timer(timer_dev) as t:
            logits = _prefill(model, tokens, cache, prefill_chunk)
        row.prefill_s = t.seconds
        row.prefill_tok_s = batch * context / t.seconds if t.seconds > 0 else None
        row.cache_bytes = cache.nbytes().as_dict()
        row.bytes_per_token = _stored_bytes_per_token(cache)
        first = logits.argmax(-1, keepdim=True)  # (B, 1)
        snap = _Snapshot(cache)
        per_token: list[float] = []
        for r in range(warmup + reps):
            snap.restore(cache)
            tok = first
            with Timer(timer_dev) as t:
                for _ in range(decode_tokens):
                    tok = _last_logits(model, tok, cache).argmax(-1, keepdim=True)
            if r >= warmup:
                per_token.append(t.seconds / decode_tokens * 1e3)
    row.peak_bytes = peak.stop()
    row.decode_ms_reps = [round(x, 4) for x in per_token]
    row.decode_ms = statistics.median(per_token)
    row.decode_ms_p90 = _percentile(per_token, 0.9)
    del cache, snap
    return row


def _finish_row(row: Row, cfg: ModelConfig, spec: CacheSpec | None, dtype: torch.dtype, peaks: Peaks) -> None:
    """Derived columns: ratio, bytes and FLOPs per step, achieved rates, roofline floor."""
    kv16 = cfg.num_hidden_layers * 2 * cfg.kv_dim * 2
    if row.bytes_per_token:
        row.ratio = kv16 / row.bytes_per_token
    if row.plan_bytes_per_token:
        row.plan_ratio = kv16 / row.plan_bytes_per_token
    if row.cache_bytes is None:
        return
    n = row.context
    stored = row.cache_bytes["payload"] + row.cache_bytes["scales"] + row.cache_bytes["fp_window"]
    row.step_bytes = weights_read_bytes(cfg, dtype) + stored
    row.rebuild_flops = rebuild_flops(cfg, spec, n, row.batch) if spec is not None else 0
    row.step_flops = decode_flops(cfg, spec, n, row.batch)
    mem_s = row.step_bytes / (peaks.bandwidth_gb_s * 1e9)
    comp_s = row.rebuild_flops / (peaks.tflop_s * 1e12)
    row.roofline_mem_ms, row.roofline_compute_ms = mem_s * 1e3, comp_s * 1e3
    row.roofline_ms = (mem_s + comp_s) * 1e3
    if row.decode_ms:
        step_s = row.decode_ms / 1e3
        row.achieved_gb_s = row.step_bytes / step_s / 1e9
        row.achieved_tflop_s = row.step_flops / step_s / 1e12


# ----------------------------------------------------------------------------------- transformers


def _hf_model(model: Transformer):
    """transformers' CausalLM for our config, holding the very same weight tensors (assign=True)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise MissingDependencyError("--hf needs transformers, which is not installed",
                                     hint="pip install transformers") from None
    cfg = model.config
    raw = cfg.to_dict()
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
            "max_position_embeddings",
            "tie_word_embeddings", "attention_bias")
    kwargs = {k: raw[k] for k in keep if k in raw}
    if kwargs.get("rope_scaling") is None:
        kwargs.pop("rope_scaling", None)
    if cfg.model_type == "qwen2":
        kwargs.pop("attention_bias", None)
    if cfg.model_type == "mistral":  # MistralConfig defaults to a 4096-token window: say ours, even if none
        kwargs["sliding_window"] = cfg.sliding_window
    hf_cfg = AutoConfig.for_model(cfg.model_type, **kwargs)
    hf_cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    try:
        with torch.device(model.device):
            hf = AutoModelForCausalLM.from_config(hf_cfg)
    finally:
        torch.set_default_dtype(prev)
    result = hf.load_state_dict(model.state_dict(), strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and cfg.tie_word_embeddings)
               and not k.endswith("inv_freq")]
    if missing or result.unexpected_keys:
        raise InputError(f"--hf: transformers' model does not match ours (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")
    if cfg.tie_word_embeddings:
        hf.get_output_embeddings().weight = hf.get_input_embeddings().weight
    return hf.to(model.device).eval()


def _measure_hf(hf, model: Transformer, context: int, batch: int, decode_tokens: int, warmup: int, reps: int,
                timer_dev: torch.device, peak: PeakMemory, gen: torch.Generator) -> Row:
    """One greedy generate of 1 + decode_tokens new tokens per rep; a logits processor stamps the time
    (after a synchronize on GPUs) each time a forward has produced logits: the first stamp ends the
    prefill, the rest are decode steps (generate's own per-step overhead included)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamps(LogitsProcessor):
        def __init__(self) -> None:
            self.t: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if timer_dev.type == "cuda":
                torch.cuda.synchronize(timer_dev)
            self.t.append(time.perf_counter())
            return scores

    cfg = model.config
    row = Row(HF_KIND, "transformers", context, batch)
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device=model.device, generator=gen)
    mask = torch.ones_like(ids)
    n = 1 + decode_tokens

    def run() -> tuple[float, float]:
        stamps = Stamps()
        if timer_dev.type == "cuda":
            torch.cuda.synchronize(timer_dev)
        t0 = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0, eos_token_id=None, use_cache=True,
                    logits_processor=LogitsProcessorList([stamps]))
        t = stamps.t
        if len(t) != n:
            raise RuntimeError(f"transformers' generate made {len(t)} steps, expected {n}")
        return t[0] - t0, (t[-1] - t[0]) / decode_tokens * 1e3

    peak.start()
    with torch.inference_mode():
        for _ in range(warmup):
            run()
        pre, dec = [], []
        for _ in range(reps):
            p, d = run()
            pre.append(p)
            dec.append(d)
    row.peak_bytes = peak.stop()
    row.prefill_s = statistics.median(pre)
    row.prefill_tok_s = batch * context / row.prefill_s if row.prefill_s > 0 else None
    row.decode_ms_reps = [round(x, 4) for x in dec]
    row.decode_ms = statistics.median(dec)
    row.decode_ms_p90 = _percentile(dec, 0.9)
    bpt = cfg.num_hidden_layers * 2 * cfg.kv_dim * _elem(model.dtype)  # its dynamic cache, model dtype
    row.bytes_per_token = row.plan_bytes_per_token = float(bpt)
    row.cache_bytes = CacheBytes(payload=bpt * context * batch).as_dict()
    return row


def _check_hf_matches(hf, model: Transformer) -> str | None:
    """Compare last-position logits of a short prompt (check before timing); a note when they differ."""
    ids = torch.arange(1, 17, device=model.device)[None] % model.config.vocab_size
    with torch.inference_mode():
        ours = model(ids)[:, -1].float()
        theirs = hf(input_ids=ids).logits[:, -1].float()
    err = float((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-6))
    tol = 1e-3 if model.dtype == torch.float32 else 5e-2
    if err <= tol:
        return None
    return f"--hf: transformers' logits differ from ours (max relative error {err:.2e})"


# --------------------------------------------------------------------------------------- estimating


EFFICIENCY = 0.5  # fraction of the measured peaks a run is assumed to reach, for the refusal estimate


def reference_traffic(cfg: ModelConfig, spec: CacheSpec | None, n: int, batch: int, elem: int) -> int:
    """Extra bytes the pure-torch path moves per step for a quantized kind: every stored token is
    dequantized and rebuilt into dense tensors in the model dtype (written, then read) in every layer."""
    if spec is None or spec.method == "kv":
        return 0
    d, kv = cfg.hidden_size, cfg.kv_dim
    width = {"kivi": 5 * kv, "xquant": 5 * kv if uses_latents(cfg) else d + 3 * kv,
             "xquant-cl": 3 * d + 3 * kv}
    return 2 * batch * n * cfg.num_hidden_layers * elem * width[spec.method]


def _problems(est: dict[str, Any], limit: int | None, is_budget: bool, longest: int,
              peaks: Peaks) -> list[str]:
    problems = []
    if limit is not None and est["memory_bytes"] > limit:
        problems.append(f"needs about {est['memory_bytes'] / 2**30:.2f} GiB (weights "
                        f"{est['weights_bytes'] / 2**30:.2f} GiB + cache and activations at context "
                        f"{longest:,}) but {'--budget' if is_budget else 'free memory'} is "
                        f"{limit / 2**30:.2f} GiB")
    if est["seconds"] > MAX_SECONDS:
        problems.append(f"would take about {_duration(est['seconds'])} ({est['flops'] / 1e12:,.1f} TFLOP at "
                        f"{EFFICIENCY:.0%} of the measured {peaks.tflop_s * 1e3:,.1f} GFLOP/s and "
                        f"{peaks.bandwidth_gb_s:,.1f} GB/s; refused above {MAX_SECONDS // 60} min)")
    return problems


def _calibrate_step(model: Transformer, device: torch.device, n: int = 8) -> float:
    """Seconds of one decode step at a short context (best of 2), after an untimed n-token prefill."""
    cache = KVCache(model, 1, n + 3)
    tokens = (torch.arange(n, device=model.device) % model.config.vocab_size)[None]
    best = math.inf
    with torch.inference_mode():
        tok = _last_logits(model, tokens, cache).argmax(-1, keepdim=True)
        for _ in range(2):
            with Timer(device) as t:
                tok = _last_logits(model, tok, cache).argmax(-1, keepdim=True)
            best = min(best, t.seconds)
    return best


def estimate_run(cfg: ModelConfig, specs: list[CacheSpec], contexts: list[int], *, batch: int,
                 decode_tokens: int, warmup: int, reps: int, dtype: torch.dtype, peaks: Peaks, hf: bool,
                 prefill_chunk: int | None = None, step_floor_s: float | None = None) -> dict[str, Any]:
    """Peak memory (weights + largest cache + prefill activations) and seconds (FLOPs and bytes at
    EFFICIENCY times the measured peaks, plus the reference path's dequantize/rebuild traffic). Every
    forward takes at least `step_floor_s` (a measured short-context decode step, once the model is built:
    it catches per-layer overheads the rates miss). Rough: on busy CPUs the pure-torch caches' per-row
    loops can make real runs several times longer still."""
    from xqcli.readouts.plan import meta_model

    el = _elem(dtype)
    meta = meta_model(cfg, dtype)
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    flop_rate, byte_rate = peaks.tflop_s * 1e12 * EFFICIENCY, peaks.bandwidth_gb_s * 1e9 * EFFICIENCY
    wread = weights_read_bytes(cfg, dtype)
    floor = step_floor_s or 0.0
    d, inter, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    worst, seconds, flops = 0, 0.0, 0
    for n in contexts:
        t = min(n, prefill_chunk or n)  # tokens per prefill forward
        act = batch * t * el * (2 * inter + 4 * d + cfg.q_dim + 6 * cfg.kv_dim) + batch * t * n  # + bool mask
        for spec in specs:
            c = make_cache(meta, spec, batch, n + decode_tokens, device=torch.device("meta")).allocated()
            rebuilt = batch * n * el * (3 * d if spec.method == "xquant-cl" else 6 * cfg.kv_dim)
            worst = max(worst, c.total + act + rebuilt)
            pf = prefill_flops(cfg, spec, n, batch)
            df = decode_flops(cfg, spec, n, batch)
            steps = (warmup + reps) * decode_tokens
            n_pre = 1 + (warmup > 0)
            flops += n_pre * pf + steps * df
            extra = reference_traffic(cfg, spec, n, batch, el)
            seconds += n_pre * max(floor, pf / flop_rate + (wread + extra) / byte_rate)
            seconds += steps * max(floor, df / flop_rate + (wread + c.total + extra) / byte_rate)
        if hf:
            kvb = batch * (n + decode_tokens + 1) * L * 2 * cfg.kv_dim * el
            worst = max(worst, kvb + act + weights)  # + a random-init copy of the weights while building
            runs = warmup + reps  # one generate (a prefill and decode_tokens steps) per run
            pf, df = prefill_flops(cfg, None, n, batch), decode_flops(cfg, None, n, batch)
            flops += runs * (pf + decode_tokens * df)
            seconds += runs * (max(floor, pf / flop_rate + wread / byte_rate)
                               + decode_tokens * max(floor, df / flop_rate + (wread + kvb) / byte_rate))
    return {"weights_bytes": weights, "memory_bytes": weights + worst, "flops": flops, "seconds": seconds,
            "step_floor_s": step_floor_s}


# ------------------------------------------------------------------------------------------ the run


def run_bench(src: str | Path | None = None, *, shape: str | None = None,
              contexts: list[int] | str = "4k,32k", batch: int = 1, kinds: list[str] | str = DEFAULT_KINDS,
              decode_tokens: int = 16, warmup: int = 1, reps: int = 5, device: str | None = "auto",
              dtype: str | torch.dtype | None = None,
              budget: int | str | None = None, force: bool = False, hf: bool = False, seed: int = 0,
              prefill_chunk: int | None = None, progress: Progress | None = None) -> BenchResult:
    """Benchmark every cache kind at every context on one model (a source loader.load accepts, or a
    named shape with random weights built on the device). Raises ResourceError before any work when the
    estimated memory exceeds the budget (or free memory) or the estimated time exceeds 30 minutes,
    unless `force`. `prefill_chunk` prefills in chunks of that many tokens (bounds attention memory at long
    contexts; the default is one forward of the whole context)."""
    from xqcli.load import default_dtype, load, pick_device
    from xqcli.readouts.plan import SHAPES, config_for, meta_model, parse_bytes, plan, shape_config
    from xqcli.sources.hf import parse_dtype

    t_start = time.perf_counter()
    say = progress or (lambda _msg: None)
    if shape is None and src is not None and str(src).lower() in SHAPES and not Path(src).exists():
        shape, src = str(src), None  # `xq bench llama-3.1-8b` as `xq plan` takes it
    if (src is None) == (shape is None):
        raise InputError("give a model source (folder, bundle, .gguf, HF id) or --shape NAME, not both")
    ctxs = parse_contexts(contexts) if isinstance(contexts, str) else list(contexts)
    names = parse_kinds(kinds)
    specs = [CacheSpec.parse(k) for k in names]
    for label, v, lo in (("--batch", batch, 1), ("--decode-tokens", decode_tokens, 1), ("--reps", reps, 1),
                         ("--warmup", warmup, 0)):
        if v < lo:
            raise InputError(f"{label} must be >= {lo} (got {v})")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise InputError(f"--prefill-chunk must be >= 1 (got {prefill_chunk})")
    if any(n < 1 for n in ctxs):
        raise InputError(f"--context values must be >= 1 (got {ctxs})")
    budget_b = parse_bytes(budget) if isinstance(budget, str) else budget
    dev = pick_device(device)
    dt = parse_dtype(dtype) if dtype is not None else default_dtype(dev)

    # Config first (a folder's config.json, or the named shape), so a hopeless run is refused before loading.
    loaded = None
    if shape is not None:
        cfg, target = shape_config(shape), f"shape {shape.lower()} (random weights)"
    else:
        try:
            cfg, target = config_for(str(src))
        except InputError:  # an HF id or a .gguf: load it to learn its shapes
            say(f"loading {src}")
            loaded = load(src, dtype=dt, device=str(dev))
            cfg, target = loaded.config, loaded.source.describe()

    say(f"measuring peak bandwidth and FLOP/s on {dev}")
    peaks = measure_peaks(dev, dt)
    est = estimate_run(cfg, specs, ctxs, batch=batch, decode_tokens=decode_tokens, warmup=warmup, reps=reps,
                       dtype=dt, peaks=peaks, hf=hf, prefill_chunk=prefill_chunk)
    free, free_source = device_free_bytes(dev)
    if loaded is not None and free is not None:
        free += est["weights_bytes"]  # already resident
    limit = budget_b if budget_b is not None else free
    est["limit_bytes"], est["limit_source"] = limit, ("budget" if budget_b is not None else free_source)
    problems = _problems(est, limit, budget_b is not None, max(ctxs), peaks)
    if problems and not force:
        raise ResourceError("xq bench refused: it " + "; it ".join(problems),
                            hint="shorten --context, lower --reps/--decode-tokens/--batch, or pass --force")
    say(f"estimate: {_duration(est['seconds'])}, peak {est['memory_bytes'] / 2**30:.2f} GiB"
        + (" (forced)" if problems else ""))

    gen = torch.Generator(device=dev).manual_seed(seed)
    if loaded is None:
        if shape is not None:
            say(f"building {shape} with random weights on {dev} ({str(dt).removeprefix('torch.')})")
            torch.manual_seed(seed)
            model = random_model(cfg, dt, dev, seed)
        else:
            say(f"loading {src}")
            loaded = load(src, dtype=dt, device=str(dev))
            model = loaded.model
    else:
        model = loaded.model
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    free_after, free_source = device_free_bytes(dev)
    cache_budget = _cache_budget(budget_b, weights, free_after)
    peak = PeakMemory(dev)

    # A short untimed forward pages the weights in and runs lazy initializations; its decode step is the
    # floor of every later forward, which re-checks the time estimate before anything is measured.
    floor = _calibrate_step(model, dev)
    est = estimate_run(cfg, specs, ctxs, batch=batch, decode_tokens=decode_tokens, warmup=warmup, reps=reps,
                       dtype=dt, peaks=peaks, hf=hf, prefill_chunk=prefill_chunk, step_floor_s=floor)
    est["limit_bytes"], est["limit_source"] = limit, ("budget" if budget_b is not None else free_source)
    if est["seconds"] > MAX_SECONDS and not force:
        raise ResourceError(f"xq bench refused: one decode step takes {floor * 1e3:,.1f} ms here even at a "
                            f"short context, so the run would take about {_duration(est['seconds'])} "
                            f"(refused above {MAX_SECONDS // 60} min)",
                            hint="shorten --context, lower --reps/--decode-tokens/--batch, or pass --force")
    say(f"calibrated: a short decode step takes {floor * 1e3:,.1f} ms; estimate {_duration(est['seconds'])}")

    plan_rows = {r.kind: r for r in plan(cfg, names, dtype=dt)}
    meta = meta_model(cfg, dt)
    terms = {s.name: _meta_cache_terms(meta, s, batch) for s in specs}
    notes: list[str] = []
    rows: list[Row] = []
    hf_model = None
    if hf:
        say("building the transformers model (same weights)")
        hf_model = _hf_model(model)
        note = _check_hf_matches(hf_model, model)
        if note:
            notes.append(note)
    for n in ctxs:
        for spec in specs:
            say(f"{spec.name} at context {n:,}: prefill, then {warmup}+{reps} reps of {decode_tokens} "
                "decode steps")
            try:
                row = _measure_xq(model, spec, n, batch, decode_tokens, warmup, reps, dev, peak, gen,
                                  prefill_chunk)
            except torch.cuda.OutOfMemoryError:
                row = Row(spec.name, "xq", n, batch, error="out of memory" + ("" if prefill_chunk else
                                                                              " (try --prefill-chunk 4k)"))
            if row.error:
                torch.cuda.empty_cache()  # after the except block, once the failed frame is gone
            pr = plan_rows[spec.name]
            row.plan_bytes_per_token, row.paper_bytes_per_token = pr.bytes_per_token, pr.paper_bytes_per_token
            fixed, ws = terms[spec.name]
            row.max_context = _fit(cache_budget, row.bytes_per_token or pr.bytes_per_token, fixed, ws, batch)
            _finish_row(row, cfg, spec, dt, peaks)
            rows.append(row)
        if hf_model is not None:
            say(f"transformers generate at context {n:,}")
            try:
                row = _measure_hf(hf_model, model, n, batch, decode_tokens, warmup, reps, dev, peak, gen)
            except torch.cuda.OutOfMemoryError:
                row = Row(HF_KIND, "transformers", n, batch, error="out of memory")
            if row.error:
                torch.cuda.empty_cache()
            row.max_context = _fit(cache_budget, row.bytes_per_token, 0, 0.0, batch)
            _finish_row(row, cfg, None, dt, peaks)
            rows.append(row)
    if any(r.bytes_per_token is None and r.error is None for r in rows):
        notes.append("some contexts are shorter than the full-precision window plus a 128-token block: "
                     "nothing was quantized yet, so bytes/token and ratio are not measured there "
                     "(max context uses the plan number)")
    if peak.source is None:
        notes.append("peak memory is not measurable here (no CUDA, no /proc/self/clear_refs)")
    params = sum(p.numel() for p in model.parameters())
    return BenchResult(
        target=target,
        model={"model_type": cfg.model_type, "params": params, "weights_bytes": weights,
               "dtype": str(dt).removeprefix("torch."), "layers": cfg.num_hidden_layers,
               "hidden_size": cfg.hidden_size, "heads": cfg.num_attention_heads,
               "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
               "vocab_size": cfg.vocab_size, "latents": uses_latents(cfg)},
        settings={"contexts": ctxs, "batch": batch, "kinds": names + ([HF_KIND] if hf else []),
                  "decode_tokens": decode_tokens, "warmup": warmup, "reps": reps, "device": str(dev),
                  "dtype": str(dt).removeprefix("torch."), "budget_bytes": budget_b, "force": force, "hf": hf,
                  "seed": seed, "prefill_chunk": prefill_chunk},
        environment=environment(dev), peaks=peaks,
        memory={"cache_budget_bytes": cache_budget,
                "cache_budget_source": "budget" if budget_b is not None else free_source,
                "peak_source": peak.source, "peak_includes_weights": peak.includes_weights},
        estimate=est, rows=rows, verdicts=verdicts(rows, ctxs), notes=notes,
        elapsed_s=time.perf_counter() - t_start)


def verdicts(rows: list[Row], contexts: list[int]) -> list[Verdict]:
    out = []
    for n in contexts:
        at = [r for r in rows if r.context == n and r.error is None]
        timed = [r for r in at if r.decode_ms is not None]
        fits = [r for r in at if r.max_context is not None]
        fastest = min(timed, key=lambda r: r.decode_ms) if timed else None
        longest = max(fits, key=lambda r: r.max_context) if fits else None
        parts = []
        if fastest:
            kv = next((r for r in timed if r.kind == "kv"), None)
            vs = f", kv {_ms(kv.decode_ms)}" if kv and kv is not fastest else ""
            parts.append(f"fastest {fastest.kind} ({_ms(fastest.decode_ms)} ms/token{vs})")
        if longest:
            kv = next((r for r in fits if r.kind == "kv"), None)
            vs = f", kv {kv.max_context:,}" if kv and kv is not longest else ""
            parts.append(f"fits longest {longest.kind} ({longest.max_context:,} tokens{vs})")
        else:
            small = min((r for r in at if r.bytes_per_token), key=lambda r: r.bytes_per_token, default=None)
            if small:
                parts.append(f"smallest cache {small.kind} ({small.bytes_per_token:,.0f} B/token; "
                             "no memory budget known)")
        text = f"context {_ctx(n)}: " + ("; ".join(parts) if parts else "nothing measured")
        out.append(Verdict(n, fastest.kind if fastest else None, longest.kind if longest else None, text))
    return out


# ---------------------------------------------------------------------------------------- rendering


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _ms(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


COLUMNS = ("cache", "context", "B/token", "plan B/token", "vs fp16 KV", "cache MiB", "fp window MiB",
           "workspace MiB", "prefill tok/s", "decode ms/token (p50 / p90)", "peak MiB", "max context", "GB/s",
           "TFLOP/s",
           "floor ms")


def _cells(r: Row) -> list[str]:
    c = r.cache_bytes or {}
    kind = r.kind + (" (transformers)" if r.engine == "transformers" else "")
    if r.error:
        return [kind, f"{r.context:,}", f"error: {r.error}"] + ["-"] * (len(COLUMNS) - 3)
    q = (c.get("payload", 0) + c.get("scales", 0)) if c else None
    return [kind, f"{r.context:,}", _f(r.bytes_per_token, ",.1f"), _f(r.plan_bytes_per_token, ",.1f"),
            _f(r.ratio, ".2f") + ("x" if r.ratio else ""), _mib(q), _mib(c.get("fp_window")),
            _mib(c.get("workspace")), _f(r.prefill_tok_s, ",.1f"),
            f"{_f(r.decode_ms, '.3f')} / {_f(r.decode_ms_p90, '.3f')}", _mib(r.peak_bytes),
            _f(r.max_context, ","), _f(r.achieved_gb_s, ".2f"), _f(r.achieved_tflop_s, ".4f"),
            _f(r.roofline_ms, ".3f")]


def header_lines(res: BenchResult) -> list[str]:
    env, m, s, p = res.environment, res.model, res.settings, res.peaks
    if env.get("gpu"):
        g = env["gpu"]
        hw = (f"{g['name']} (sm {g['capability']}, {g['total_bytes'] / 2**30:.0f} GiB, "
              f"driver {g['driver'] or '?'})")
    else:
        cpu = env["cpu"]
        hw = f"CPU {cpu['model']} ({cpu['cores']} cores, {cpu['torch_threads']} torch threads)"
    load = f", load average {env['load_avg'][0]}" if env.get("load_avg") else ""
    commit = "n/a"
    if env.get("git_commit"):
        commit = env["git_commit"][:12] + ("-dirty" if env.get("git_dirty") else "")
    mem = res.memory
    budget = ("unknown" if mem["cache_budget_bytes"] is None else
              f"{mem['cache_budget_bytes'] / 2**30:,.2f} GiB ({mem['cache_budget_source']})")
    peak = {"cuda_max_memory_allocated": "torch.cuda.max_memory_allocated (weights included)",
            "cpu_peak_rss_delta": "process peak RSS growth during the row (weights excluded)"}.get(
        mem["peak_source"], "not measured")
    return [
        f"device: {hw}{load}",
        f"versions: xq {env['xq']} (commit {commit}), torch {env['torch']}, triton {env['triton'] or 'n/a'}, "
        f"transformers {env['transformers'] or 'n/a'}, CUDA {env['cuda'] or 'n/a'}",
        f"model: {m['model_type']}, {m['layers']} layers, d {m['hidden_size']}, "
        f"{m['heads']}/{m['kv_heads']} heads, {m['params'] / 1e6:,.1f}M params, "
        f"weights {m['weights_bytes'] / 2**30:.3f} GiB {m['dtype']}",
        f"run: batch {s['batch']}, {s['decode_tokens']} decode tokens x {s['reps']} reps "
        f"(+{s['warmup']} warmup), elapsed {_duration(res.elapsed_s)}",
        f"measured peaks: copy {p.bandwidth_gb_s:,.1f} GB/s, matmul {p.tflop_s:,.3f} TFLOP/s "
        f"({p.dtype}, n={p.matmul_n})",
        f"max context: cache budget {budget}; peak memory: {peak}",
    ]


def render_md(res: BenchResult) -> str:
    lines = [f"## xq bench: {res.target}", ""] + [f"- {h}" for h in header_lines(res)] + [""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if c == "cache" else "---:" for c in COLUMNS) + "|")
    for r in res.rows:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    lines.append("")
    lines += [f"- {v.text}" for v in res.verdicts]
    lines += [f"- note: {n}" for n in res.notes]
    return "\n".join(lines) + "\n"


def render_json(res: BenchResult) -> str:
    return json.dumps(res.to_dict(), indent=2) + "\n"


def jsonl_records(res: BenchResult) -> list[dict[str, Any]]:
    """One flat object per row, each with schema_version, target, device and dtype (for log files)."""
    dev = res.environment["gpu"]["name"] if res.environment.get("gpu") else res.settings["device"]
    return [{"schema_version": res.schema_version, "target": res.target, "device_name": dev,
             "dtype": res.settings["dtype"]} | r.as_dict() for r in res.rows]


def render_jsonl(res: BenchResult) -> str:
    return "".join(json.dumps(rec) + "\n" for rec in jsonl_records(res))


CSV_FIELDS = [f.name for f in fields(Row) if f.name not in ("cache_bytes", "decode_ms_reps")] + [
    "cache_payload", "cache_scales", "cache_fp_window", "cache_workspace", "cache_total", "decode_ms_reps"]


def render_csv(res: BenchResult) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["target", "device_name", "dtype"] + CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for rec in jsonl_records(res):
        cb = rec.pop("cache_bytes") or {}
        rec.pop("schema_version")
        for k in ("payload", "scales", "fp_window", "workspace", "total"):
            rec[f"cache_{k}"] = cb.get(k)
        rec["decode_ms_reps"] = ";".join(_num(x) for x in rec["decode_ms_reps"])
        w.writerow({k: ("" if v is None else v) for k, v in rec.items()})
    return buf.getvalue()


def rich_table(res: BenchResult):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"xq bench: {res.target}", caption="\n".join(header_lines(res)),
                  caption_justify="left")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "cache" else "right", no_wrap=c == "cache")
    for r in res.rows:
        table.add_row(*_cells(r))
    extra = [Text(v.text) for v in res.verdicts] + [Text("note: " + n, style="dim") for n in res.notes]
    return Group(table, *extra)


def render(res: BenchResult, fmt: str) -> str:
    """The result as text in one of md, json, jsonl, csv (`table` renders the rich table as plain text)."""
    if fmt == "md":
        return render_md(res)
    if fmt == "json":
        return render_json(res)
    if fmt == "jsonl":
        return render_jsonl(res)
    if fmt == "csv":
        return render_csv(res)
    if fmt == "table":
        from rich.console import Console

        console = Console(record=True, width=200, file=io.StringIO())
        console.print(rich_table(res))
        return console.export_text()
    raise InputError(f"unknown --format {fmt!r} (choose from {', '.join(FORMATS)})")


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib, which is not installed",
                                     hint="pip install 'xqcli[plot]'") from None


def plot(res: BenchResult, path: str | Path) -> Path:
    """Decode ms/token and cache GB against context, one line per kind, side by side, as a PNG."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r.kind for r in res.rows))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k in kinds:
        rs = sorted((r for r in res.rows if r.kind == k and r.error is None), key=lambda r: r.context)
        ax_t.plot([r.context for r in rs], [r.decode_ms for r in rs], marker="o", label=k)
        gb = [(r.cache_bytes or {}).get("total", 0) / 1e9 for r in rs]
        ax_m.plot([r.context for r in rs], gb, marker="o", label=k)
    for ax, ylabel in ((ax_t, "decode ms/token"), (ax_m, "cache GB at context")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize="small")
    dev = res.environment["gpu"]["name"] if res.environment.get("gpu") else "CPU"
    fig.suptitle(f"xq bench: {res.target} on {dev}, batch {res.settings['batch']}, {res.settings['dtype']}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def gate_error(failures: list[str]) -> GateFailed:
    return GateFailed(f"{len(failures)} --fail-if gate(s) failed: " + "; ".join(failures))
