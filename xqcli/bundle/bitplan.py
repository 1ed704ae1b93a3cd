"""What a bundle's calibration makes of a cache spec: `+mix` per-layer bits and per-layer clip ratios.

Pure functions of calibration data, used before any cache is built: `resolve_spec` turns `xquant-B+mix`
into a per-layer bit plan (the cache factory never plans), `calibrated_specs` gives `xq eval --calibrated`
the twins of its specs with the calibrated clip ratios. Convert records plans made by `bit_plan` too.

The bit plan is greedy: every layer starts at 2 bits and the layer whose next step (2→3→4→8) buys the
largest attention-error drop per extra bit is upgraded, while the average stays within the target.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from xqcli.bundle.artifacts import Artifacts
from xqcli.cache.spec import BITS, CacheSpec
from xqcli.errors import BundleError, InputError

if TYPE_CHECKING:
    from xqcli.bundle.format import Bundle

CALIBRATED_METHODS = ("xquant", "kivi")  # the methods calibration measures clip ratios for


def bit_plan(errors: list[dict[int, float]], target: float) -> list[int]:
    """Per-layer bits averaging at most `target`: greedy best error drop per extra bit, from all-2."""
    bits = [BITS[0]] * len(errors)
    budget = target * len(errors) + 1e-9
    while True:
        best: tuple[float, int, int] | None = None
        for i, b in enumerate(bits):
            nxt = next((n for n in BITS if n > b), None)
            if nxt is None or sum(bits) - b + nxt > budget:
                continue
            gain = (errors[i][b] - errors[i][nxt]) / (nxt - b)
            if best is None or gain > best[0]:
                best = (gain, i, nxt)
        if best is None:
            return bits
        bits[best[1]] = best[2]


def attention_errors(calibration: dict[str, Any]) -> list[dict[int, float]]:
    """Per layer, the xquant attention-output error at each bit width: what `bit_plan` trades off."""
    return [{int(b): e for b, e in layer["attn_error"]["xquant"].items()} for layer in calibration["layers"]]


def resolve_spec(spec: CacheSpec, artifacts: Artifacts, n_layers: int) -> CacheSpec:
    """Fill in what a spec takes from the bundle: the per-layer bits of `+mix` (other specs pass as they are)."""
    if spec.mix is None or spec.layer_bits is not None:
        return spec
    cal = artifacts.calibration
    if not cal:
        raise InputError(f"{spec.name} needs a bundle with a calibration (per-layer errors)",
                         hint="make one with: xq convert MODEL, then use the bundle")
    errors = attention_errors(cal)
    if len(errors) != n_layers:
        raise InputError(f"the calibration has {len(errors)} layers, the model {n_layers}")
    plan = bit_plan(errors, spec.mix)
    if sum(plan) > spec.mix * len(plan) + 1e-9:
        raise InputError(f"no per-layer plan averages {spec.mix:g} bits", hint="the lowest is 2 bits everywhere")
    return replace(spec, layer_bits=tuple(plan))


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
