"""The one grammar for sizes and token counts, and the one way to print them.

k = 1024 everywhere, as model cards and every LLM tool mean it: `--context 32k` is 32,768 tokens
(`--context 32000` for an exact number), `--budget 6g` is 6 GiB. Byte sizes also take explicit
units: KiB/MiB/GiB/TiB are binary, KB/MB/GB/TB are SI (10^3 steps), as storage vendors write them.
"""

from __future__ import annotations

import re

from xqcli.errors import InputError

K = 1024
MAX_TOKENS = 2**40  # far beyond any real context; bounds every parsed count (no C++ overflow frames)
MAX_BYTES = 2**60

_COUNT_SUFFIX = {"": 1, "k": K, "m": K**2}
_BYTE_UNITS = {"": 1, "b": 1, "k": K, "m": K**2, "g": K**3, "t": K**4,
               "kib": K, "mib": K**2, "gib": K**3, "tib": K**4,
               "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_COUNT = re.compile(r"(\d+(?:\.\d+)?)([km]?)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?(?:e\d+)?)([a-z]*)")


def parse_tokens(text: str | int, option: str = "--context") -> int:
    """'32k' -> 32768, '1.5k' -> 1536, '4096' -> 4096, '1m' -> 1048576 (k = 1024); at least 1."""
    t = str(text).strip().lower().replace("_", "").replace(",", "")
    m = _COUNT.fullmatch(t)
    hint = f"write a whole number of tokens like 4096, 32k or 32000 (k = 1024, at most {MAX_TOKENS:,})"
    if not m:
        raise InputError(f"{option}: cannot read {str(text).strip()!r} as a token count", hint=hint)
    n = int(float(m.group(1)) * _COUNT_SUFFIX[m.group(2)])
    if not 1 <= n <= MAX_TOKENS:
        raise InputError(f"{option} {str(text).strip()}: must be at least 1 and at most {MAX_TOKENS:,} tokens",
                         hint=hint)
    return n


def parse_token_list(text: str, option: str = "--context") -> list[int]:
    """'4k,32k' -> [4096, 32768], in order, duplicates dropped."""
    out: list[int] = []
    for part in text.split(","):
        if part.strip():
            n = parse_tokens(part, option)
            if n not in out:
                out.append(n)
    if not out:
        raise InputError(f"{option} is empty", hint=f"e.g. {option} 4k,32k")
    return out


def parse_bytes(text: str | int, option: str = "--budget") -> int:
    """'24GiB', '24g', '6GB', '512MiB', '1e9' -> bytes (k/m/g/t and KiB.. binary, KB.. SI)."""
    t = str(text).strip().lower().replace(" ", "").replace("_", "")
    m = _SIZE.fullmatch(t)
    hint = "write it like 24GiB, 24g (binary), 6GB (SI) or 512MiB"
    if not m or m.group(2) not in _BYTE_UNITS:
        raise InputError(f"{option}: cannot read the memory size {str(text).strip()!r}", hint=hint)
    n = int(float(m.group(1)) * _BYTE_UNITS[m.group(2)])
    if not 1 <= n <= MAX_BYTES:
        limit = "must be positive (at least 1 byte)" if n < 1 else "is larger than any memory (at most 2**60 bytes)"
        raise InputError(f"{option} {str(text).strip()}: the size {limit}", hint=hint)
    return n


def format_bytes(n: float | None) -> str:
    """Bytes for people: 0 B, 812 B, 12.30 KiB, 4.56 MiB, 1.20 GiB ('n/a' when unknown)."""
    if n is None:
        return "n/a"
    for unit, div in (("TiB", K**4), ("GiB", K**3), ("MiB", K**2), ("KiB", K)):
        if abs(n) >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{int(n):,} B"


def format_tokens(n: int) -> str:
    """Token counts as the grammar writes them: 32768 -> '32k', 1536 -> '1.5k', 1000 -> '1,000'."""
    if n >= K and (n * 2) % K == 0:
        return f"{n / K:g}k"
    return f"{n:,}"
