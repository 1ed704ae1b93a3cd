"""Caches: the kind vocabulary (`spec`), the interface (`base`), the kinds and the factory that builds them.

`xqcli.load.make_cache` is the entry point callers use: it gathers the model's parts and the bundle's
artifacts and calls `build_cache`. The names below are imported on first use, not here: importing the
leaf `xqcli.cache.spec` (as the bundle format does) runs this file and must not load the runtime kinds.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CacheBytes": "base", "CacheSnapshot": "base", "LayerWeights": "base", "ModelCache": "base", "ModelParts": "base",
    "KVCache": "kv", "build_cache": "factory", "kernels_setting": "factory",
    "CacheSpec": "spec", "kv_bytes_per_token": "spec", "uses_latents": "spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
