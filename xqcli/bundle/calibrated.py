"""What a bundle's calibration gives the runtime: per-layer clip ratios for `xq eval --calibrated`.

A pure function of calibration data, used before any cache is built: `calibrated_specs` gives each
quantized xquant/kivi spec a twin with the per-layer clip ratios measured at convert time
(`xqcli.convert.calibrate`). No other command applies the calibration.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from xqcli.cache.spec import CacheSpec
from xqcli.errors import BundleError, InputError

if TYPE_CHECKING:
    from xqcli.bundle.format import Bundle

CALIBRATED_METHODS = ("xquant", "kivi")  # the methods calibration measures clip ratios for


def calibrated_specs(bundle: Bundle | None, specs: list[CacheSpec]) -> list[CacheSpec]:
    """For each quantized xquant/kivi spec, its twin with the bundle's per-layer clip ratios (`... (cal)`)."""
    cal = bundle.calibration() if bundle is not None else None
    if cal is None:
        raise InputError("--calibrated needs a bundle with a calibration",
                         hint="make one with: xq convert MODEL")
    out = []
    for spec in specs:
        if spec.method not in CALIBRATED_METHODS or spec.bits is None:
            continue
        try:
            clips = tuple(float(layer["clip"][spec.method][str(spec.bits)]) for layer in cal["layers"])
        except KeyError:
            raise BundleError(f"calibration.json has no clip ratios for {spec.name}") from None
        out.append(replace(spec, clips=clips))
    if not out:
        raise InputError("--calibrated: calibration covers xquant-B and kivi-B; --methods names neither")
    return out
