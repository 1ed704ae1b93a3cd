"""Cache kinds by name: the one vocabulary (`kv`, `kivi-B`, `xquant-B`, `xquant-cl-B`, variants) and its settings.

A leaf: it imports no runtime code, so the bundle format, the readouts and the commands can all
parse and check kind names. The memory-accounting baseline (fp16 KV bytes per token) lives here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xqcli.errors import InputError
from xqcli.kernels.quant import QuantSpec

METHODS = ("kv", "kivi", "xquant", "xquant-cl")
BITS = (2, 3, 4, 8)
VARIANTS = ("ch0", "rot", "mix")
_NAME = re.compile(r"^(kv|kivi|xquant|xquant-cl)(?:-(\d+(?:\.\d+)?|fp))?((?:\+[a-z0-9]+)*)$")


@dataclass(frozen=True)
class CacheSpec:
    """A cache kind and its settings. `name` is the canonical spelling (`xquant-4+ch0`)."""

    method: str
    bits: int | None = None  # None: unquantized ("-fp"), for checking the algebra
    group_size: int = 128
    window: int = 128
    base_layers: int = 3
    base_bits: int = 4
    fp16_channel0: bool = False
    quantize_partial: bool = False
    clip: float = 1.0
    clips: tuple[float, ...] | None = None  # per-layer clip ratios (calibration); None: `clip` everywhere
    rotate: bool = False  # `+rot`: per-token streams hold X·R (R orthogonal, folded into the weights)
    mix: float | None = None  # `+mix`: average bits of a calibrated per-layer plan (xquant only)
    layer_bits: tuple[int, ...] | None = None  # the per-layer plan, resolved from the bundle (`resolve`)

    @property
    def name(self) -> str:
        if self.method == "kv":
            return "kv"
        bits = f"{self.mix:g}" if self.mix is not None else (self.bits or "fp")
        flags = [f for f, on in (("ch0", self.fp16_channel0), ("rot", self.rotate), ("mix", self.mix is not None)) if on]
        return f"{self.method}-{bits}" + "".join("+" + f for f in flags) + (" (cal)" if self.clips is not None else "")

    @classmethod
    def parse(cls, name: str, **settings) -> "CacheSpec":
        """`xquant-4`, `kivi-2`, `xquant-cl-3+ch0`, `kv`; `--cache xquant --bits 4` is `parse('xquant', bits=4)`."""
        m = _NAME.match(name.strip().lower())
        if not m:
            raise InputError(f"unknown cache kind {name!r}",
                             hint="use kv, kivi-B, xquant-B or xquant-cl-B with B in 2, 3, 4, 8 (e.g. xquant-4)")
        method, bits_s, variants = m.group(1), m.group(2), m.group(3)
        flags = [v for v in variants.split("+") if v]
        unknown = [v for v in flags if v not in VARIANTS]
        if unknown:
            raise InputError(f"{name!r}: unknown variant +{unknown[0]} (known: {', '.join('+' + v for v in VARIANTS)})")
        bits = settings.pop("bits", None)
        if "mix" in flags:
            return cls._parse_mix(name, method, bits_s if bits_s is not None else bits, flags, settings)
        if bits_s is not None and "." in bits_s:
            raise InputError(f"{name!r}: bits must be one of 2, 3, 4, 8 (fractional averages need +mix)")
        if bits_s is not None:
            bits = None if bits_s == "fp" else int(bits_s)
        elif method != "kv" and bits is None:
            bits = 4
        if method == "kv":
            if bits_s is not None:
                raise InputError(f"{name!r}: kv takes no bit width (it stores the model dtype)")
            bits = None
        elif bits is not None and bits not in BITS:
            raise InputError(f"{name!r}: bits must be one of 2, 3, 4, 8 (got {bits})")
        if "rot" in flags and method not in ("xquant", "xquant-cl"):
            raise InputError(f"{name!r}: +rot applies to xquant and xquant-cl (K carries RoPE, X does not)")
        spec = cls(method=method, bits=bits, fp16_channel0="ch0" in flags, rotate="rot" in flags, **settings)
        spec.check()
        return spec

    @classmethod
    def _parse_mix(cls, name: str, method: str, avg: str | float | None, flags: list[str], settings) -> "CacheSpec":
        """`xquant-3+mix`, `xquant-2.5+mix`: per-layer bits from the bundle's calibration, averaging at most B."""
        if method != "xquant":
            raise InputError(f"{name!r}: +mix (calibrated bits per layer) applies to xquant")
        try:
            target = float(avg) if avg not in (None, "fp") else None
        except ValueError:
            target = None
        if target is None or not BITS[0] <= target <= BITS[-1]:
            raise InputError(f"{name!r}: no per-layer plan can average {avg} bits (choose 2 to 8)",
                             hint="e.g. xquant-3+mix or xquant-2.5+mix")
        spec = cls(method=method, bits=BITS[-1], fp16_channel0="ch0" in flags, rotate="rot" in flags, mix=target,
                   **settings)
        spec.check()
        return spec

    def bits_for(self, layer: int) -> int | None:
        """This layer's bit width: the per-layer plan when one is resolved, else `bits`."""
        return self.layer_bits[layer] if self.layer_bits is not None else self.bits

    def check(self) -> None:
        if self.group_size < 1:
            raise InputError(f"group size must be >= 1 (got {self.group_size})")
        if self.window < 0:
            raise InputError(f"window must be >= 0 (got {self.window})")
        if self.base_layers < 1 and self.method == "xquant-cl":
            raise InputError(f"xquant-cl needs base_layers >= 1 (got {self.base_layers})")
        if self.base_bits not in BITS:
            raise InputError(f"base bits must be one of 2, 3, 4, 8 (got {self.base_bits})")
        for c in (self.clip, *(self.clips or ())):
            if not 0 < c <= 1:
                raise InputError(f"clip ratio must be in (0, 1] (got {c})")

    def quant(self, axis: str, bits: int | None = None, layer: int | None = None) -> QuantSpec | None:
        """The stream quantizer; `layer` selects that layer's clip ratio when `clips` is set."""
        bits = (self.bits_for(layer) if layer is not None else self.bits) if bits is None else bits
        clip = self.clips[layer] if self.clips is not None and layer is not None else self.clip
        return None if bits is None else QuantSpec(bits, self.group_size, axis, clip)


def uses_latents(cfg) -> bool:
    """GQA models cache SVD latents when those are narrower than X (2·d_kv < d)."""
    return 2 * cfg.kv_dim < cfg.hidden_size


def kv_bytes_per_token(cfg, elem_bytes: int = 2) -> int:
    """K and V of every layer for one token: L·2·d_kv·elem (fp16 KV, the paper's baseline, by default)."""
    return cfg.num_hidden_layers * 2 * cfg.kv_dim * elem_bytes
