"""The cache a command uses when the user names none: the bundle's `cache_defaults`, else xquant-4.

A bundle may record the cache it was converted for (`cache_defaults` in xq.json, docs/bundle.md);
options the user gives (--bits, --window) still win over it.
"""

from __future__ import annotations

from typing import Any

from xqcli.cache.spec import CacheSpec

FALLBACK_METHOD, FALLBACK_BITS = "xquant", 4


def choose_spec(cache: str | None, *, bits: int | None = None, window: int | None = None,
                cache_defaults: dict[str, Any] | None = None) -> CacheSpec:
    """--cache/--bits/--window, else `cache_defaults` (with --bits/--window on top), else xquant-4."""
    given = {"window": window} if window is not None else {}
    if cache is not None:
        return CacheSpec.parse(cache, bits=bits, **given)
    defaults = cache_defaults or {}
    if not defaults.get("cache"):
        return CacheSpec.parse(FALLBACK_METHOD, bits=FALLBACK_BITS if bits is None else bits, **given)
    settings = {k: v for k, v in defaults.items() if k != "cache"} | given
    base = CacheSpec.parse(defaults["cache"], **settings)
    if bits is None:
        return base
    return CacheSpec.parse(base.method + ("+ch0" if base.fp16_channel0 else ""), bits=bits, **settings)
