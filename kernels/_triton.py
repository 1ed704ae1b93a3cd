"""Triton plumbing shared by the kernels: guarded import, interpreter detection, dtype map, launch sizes.

Triton is an optional, Linux-only dependency. Importing it costs about 0.1 s on top of torch, so the
kernel modules import it once, here, and every op falls back to its pure-torch ``*_ref`` when it is
missing. Kernels are written with ``from __future__ import annotations`` so ``tl.constexpr``
annotations are plain strings (Triton only looks for the word ``constexpr`` in them) and the modules
import fine without Triton.

``triton.jit`` decides between compiled and interpreted kernels when a kernel is *decorated*, that is
when its module is imported; so ``INTERPRET`` is read once, at import, and ``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before anything from ``xqcli`` is imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only or non-Linux install: every op runs its reference
    triton = None
    tl = None

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "INTERPRET",
    "cdiv",
    "check_device",
    "interpreting",
    "jit",
    "next_pow2",
    "num_sms",
    "on_device",
    "tl",
    "tl_dtype",
    "triton",
    "use_triton",
]

HAS_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when the kernels were decorated in interpreter mode (TRITON_INTERPRET=1 at import)."""
    return HAS_TRITON and INTERPRET


def jit(fn: Callable | None = None, **kwargs: Any):
    """``triton.jit`` when Triton is importable, otherwise the undecorated function (never launched)."""
    if not HAS_TRITON:
        return fn if fn is not None else (lambda f: f)
    return triton.jit(fn, **kwargs) if fn is not None else triton.jit(**kwargs)


BACKENDS = ("auto", "triton", "ref")


def use_triton(op: str, backend: str, *tensors: torch.Tensor | None) -> bool:
    """Whether op should launch its Triton kernel (True) or run its reference (False).

    ``backend="auto"``: the kernel for CUDA tensors when Triton is importable, the reference otherwise
    (CPU tensors run the reference even under ``TRITON_INTERPRET=1``: the interpreter is a test tool,
    and routing every CPU call through it made the cache tests 7x slower). ``"triton"``: always the
    kernel; needs Triton and CUDA tensors or the interpreter. ``"ref"``: always the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "ref":
        return False
    if backend == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise ValueError(f"{op}: backend='triton' needs the triton package (pip install triton, Linux only)")
    if not (on_cuda or INTERPRET):
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before xqcli.kernels "
            "is imported (the Triton interpreter runs kernels on CPU tensors)"
        )
    return True


def check_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """Raise ValueError unless every given tensor is on one device; return that device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")
    return next(iter(devices.values()))


_TL_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "uint8": "uint8",
              "int32": "int32", "int64": "int64"}


def tl_dtype(dtype: torch.dtype):
    """The ``tl`` dtype of a torch dtype (float16, bfloat16, float32, uint8, int32, int64)."""
    name = str(dtype).removeprefix("torch.")
    if not HAS_TRITON or name not in _TL_DTYPES:
        raise ValueError(f"no Triton dtype for {dtype}")
    return getattr(tl, _TL_DTYPES[name])


def on_device(device: torch.device):
    """Context that makes ``device`` current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
