"""Bundle data for the runtime, as one explicit object: projections, rotation and memos.

Whoever loads a model holds its `Artifacts` (`xqcli.load.Loaded.artifacts`) and passes it to every
cache built on that model; nothing is stored on the model itself. A bundle provides the SVD factors
and the rotation chosen at convert time (`from_bundle`); its calibration is read only by the commands
that use it (`xq inspect`, `xq eval --calibrated`). Any other model gets
an empty one: the SVD factors are then computed from the layer weights the first time a cache needs
them, once, and kept here like a bundle's. The memos (factors cast to a dtype and device, weights with
a rotation folded in) live here too, so one object holds everything derived from one model: do not
share an `Artifacts` between models.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from xqcli.bundle.projections import LayerProjections, layer_projections

if TYPE_CHECKING:
    from xqcli.bundle.format import Bundle

DEFAULT_ROTATION = ("hadamard", 0)  # `+rot` on a model without a bundle: a (block) Hadamard


class KVWeights(Protocol):
    """One layer's K and V projection weights (out × d), as `xqcli.cache.base.LayerWeights` holds them."""

    w_k: torch.Tensor
    w_v: torch.Tensor


class Artifacts:
    """Projections, rotation (kind, seed) and the derived-weight memos of one model."""

    def __init__(self, projections: list[LayerProjections] | None = None,
                 rotation: tuple[str, int] = DEFAULT_ROTATION) -> None:
        self.rotation = rotation
        # Per-layer SVD factors as held: a bundle's (float32) or computed (float64); None until set or needed.
        self.factors = projections
        self._cast: dict[tuple[torch.dtype, torch.device], list[LayerProjections]] = {}
        self._folded: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Artifacts:
        """The stored projections (no SVD at run time) and rotation of an opened bundle."""
        rotation = bundle.manifest.get("rotation")
        return cls(bundle.projections() if bundle.has_projections else None,
                   (rotation["kind"], int(rotation.get("seed", 0))) if rotation is not None else DEFAULT_ROTATION)

    def set_projections(self, projections: list[LayerProjections]) -> None:
        """Use these factors (a bundle's, or ones just written by convert) instead of computing any."""
        self.factors = projections
        self._cast = {}

    def projections(self, weights: Sequence[KVWeights], dtype: torch.dtype) -> list[LayerProjections]:
        """Every layer's factors in `dtype` on the weights' device; the SVDs (float64) run once, on first need."""
        if self.factors is None:
            self.factors = [layer_projections(w.w_k, w.w_v) for w in weights]
        key = (dtype, weights[0].w_k.device)
        if key not in self._cast:
            self._cast[key] = [p.to(dtype, key[1]) for p in self.factors]
        return self._cast[key]

    def folded(self, key: Hashable, dtype: torch.dtype, device: torch.device,
               make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A weight derived once (a rotation folded into a projection, computed by `make` in float64),
        kept in `dtype` on `device`."""
        k = (key, dtype, device)
        if k not in self._folded:
            self._folded[k] = make().to(device=device, dtype=dtype)
        return self._folded[k]
