"""Build a cache of any kind by name: `kv`, `kivi-B`, `xquant-B`, `xquant-cl-B` (B in {2, 3, 4, 8}).

One vocabulary everywhere (`xqcli.cache.spec`); `-fp` instead of a bit width turns quantization off.
The factory takes a spec and what the cache needs from the model; callers go through
`xqcli.load.make_cache`, which gathers those from a loaded model.
"""

from __future__ import annotations

import os

import torch

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.base import ModelCache, ModelParts
from xqcli.cache.kivi import KiviCache
from xqcli.cache.kv import KVCache
from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.cache.xquant import XQuantCache
from xqcli.cache.xquant_cl import XQuantCLCache
from xqcli.errors import InputError

STREAM_CACHES = {"kivi": KiviCache, "xquant": XQuantCache, "xquant-cl": XQuantCLCache}


def kernels_setting() -> str:
    """XQ_KERNELS from the environment: "auto" (default) or "off"; anything else is an error."""
    env = os.environ.get("XQ_KERNELS", "auto").strip().lower() or "auto"
    if env not in ("auto", "off"):
        raise InputError(f"XQ_KERNELS={env!r}: use auto or off")
    return env


def build_cache(spec: CacheSpec, parts: ModelParts, batch: int, max_len: int, *, device: torch.device | str,
                artifacts: Artifacts, kernels: str = "auto") -> ModelCache:
    """A cache of `spec`'s kind for `batch` rows of up to `max_len` tokens.

    `kernels`: "auto" uses the fused Triton decode kernels on CUDA tensors, "triton" forces them (CPU
    tests under TRITON_INTERPRET=1), "off" keeps the pure-torch reference path. The environment
    variable XQ_KERNELS=off turns "auto" off: an escape hatch should a kernel misbehave on some GPU."""
    if kernels == "auto":
        kernels = kernels_setting()
    if spec.fp16_channel0 and not uses_latents(parts.config):
        raise InputError(f"{spec.name}: +ch0 keeps channel 0 of the latent X·U_k in full precision, and this model "
                         f"caches X itself (no latents: 2·d_kv >= d, as in MHA models), so it would change nothing",
                         hint=f"drop +ch0: --cache {spec.name.replace('+ch0', '')}")
    if spec.method == "kv":
        return KVCache(parts, batch, max_len, device)
    return STREAM_CACHES[spec.method](parts, spec, batch, max_len, device, artifacts, kernels)
