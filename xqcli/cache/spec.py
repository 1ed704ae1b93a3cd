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
VARIANTS = ("ch0", "rot")
# Variants that existed once: a user who types one learns why it is gone (CHANGELOG).
REMOVED_VARIANTS = {"mix": "+mix (calibrated bits per layer) was removed: it never beat uniform bits at the "
                           "same average (CHANGELOG); use xquant-3 or xquant-3+rot"}
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

    @property
    def name(self) -> str:
        if self.method == "kv":
            return "kv"
        flags = [f for f, on in (("ch0", self.fp16_channel0), ("rot", self.rotate)) if on]
        cal = " (cal)" if self.clips is not None else ""
        return f"{self.method}-{self.bits or 'fp'}" + "".join("+" + f for f in flags) + cal

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
            known = ", ".join("+" + v for v in VARIANTS)
            raise InputError(f"{name!r}: unknown variant +{unknown[0]} (known: {known})",
                             hint=REMOVED_VARIANTS.get(unknown[0]))
        twice = sorted({v for v in flags if flags.count(v) > 1})
        if twice:
            raise InputError(f"{name!r}: +{twice[0]} given twice", hint=f"write it once, e.g. {method}-4+{twice[0]}")
        bits = settings.pop("bits", None)
        if bits is not None and bits_s is not None and bits_s != str(bits):
            raise InputError(f"{name!r}: {name} names {bits_s} bits but --bits {bits} was given",
                             hint=f"give the bit width once: --cache {method} --bits {bits}, or --cache {name}")
        if method == "kv" and bits is not None:
            raise InputError(f"{name!r}: kv takes no bit width (it stores the model dtype; got --bits {bits})",
                             hint="drop --bits, or choose a quantized kind like xquant")
        if bits_s is not None and "." in bits_s:
            raise InputError(f"{name!r}: bits must be one of 2, 3, 4, 8 (got {bits_s})")
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
        if "ch0" in flags and method not in ("xquant", "xquant-cl"):
            raise InputError(f"{name!r}: +ch0 applies to xquant and xquant-cl (channel 0 of the latent X·U_k)")
        spec = cls(method=method, bits=bits, fp16_channel0="ch0" in flags, rotate="rot" in flags, **settings)
        spec.check()
        return spec

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

    def layer_bits(self, layer: int) -> int | None:
        """Layer `layer`'s bits: XQuant-CL keeps its first base_layers layers at base_bits (None: unquantized)."""
        if self.method == "xquant-cl" and layer < self.base_layers and self.bits is not None:
            return self.base_bits
        return self.bits

    def quant(self, axis: str, bits: int | None = None, layer: int | None = None) -> QuantSpec | None:
        """The stream quantizer; `layer` selects that layer's clip ratio when `clips` is set."""
        bits = self.bits if bits is None else bits
        clip = self.clips[layer] if self.clips is not None and layer is not None else self.clip
        return None if bits is None else QuantSpec(bits, self.group_size, axis, clip)


def uses_latents(cfg) -> bool:
    """GQA models cache SVD latents when those are narrower than X (2·d_kv < d)."""
    return 2 * cfg.kv_dim < cfg.hidden_size


def kv_bytes_per_token(cfg, elem_bytes: int = 2) -> int:
    """K and V of every layer for one token: L·2·d_kv·elem (fp16 KV, the paper's baseline, by default)."""
    return cfg.num_hidden_layers * 2 * cfg.kv_dim * elem_bytes
