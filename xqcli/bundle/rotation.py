"""Orthogonal rotations of X folded into the weights (beyond the paper; `+rot` cache variants).

Post-norm X has a few channels 50-100x larger than the median, and per-token groups quantize them
badly. Multiplying by an orthogonal R first spreads those outliers over the group: cache Q(X·R) and
fold Rᵀ into the projection, K = (X·R)·(Rᵀ·W_kᵀ), computed once. Only a new token pays one small
rotation when it is cached; K carries RoPE, so a KV cache cannot do this for free, but X can.

R is a normalized Hadamard matrix when the width is a power of two, else a block-diagonal Hadamard
with the largest power-of-two block that divides the width (576 = 9 blocks of 64), or a seeded random
orthogonal matrix. Applying a (block) Hadamard uses a fast Walsh-Hadamard transform: n·log2(b) adds
instead of an n×n matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xqcli.errors import InputError

KINDS = ("hadamard", "random")
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes without wrapping


def hadamard_block(width: int) -> int:
    """The largest power of two dividing `width` (the Hadamard block size), capped at the width."""
    if width < 1:
        raise InputError(f"rotation width must be >= 1 (got {width})")
    return width & -width


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Normalized fast Walsh-Hadamard transform on consecutive `block`-wide groups of the last axis.

    Equals x @ hadamard_matrix(x.shape[-1], block) (Sylvester order); the transform is its own inverse.
    """
    n = x.shape[-1]
    if block & (block - 1) or n % block:
        raise ValueError(f"fwht: block {block} must be a power of two dividing the width {n}")
    shape = x.shape
    y = x.reshape(-1, n // block, block).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    h = 1
    while h < block:
        y = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[:, :, :, 0, :], y[:, :, :, 1, :]
        y = torch.stack((a + b, a - b), dim=3)
        h *= 2
    return (y.reshape(shape) / math.sqrt(block)).to(x.dtype)


def hadamard_matrix(width: int, block: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense (block-diagonal) normalized Hadamard matrix that `fwht` applies."""
    block = block or hadamard_block(width)
    return fwht(torch.eye(width, dtype=dtype), block)


def random_orthogonal(width: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)  # sign fix: a unique Haar sample


@dataclass(frozen=True)
class Rotation:
    """x -> x·R for one width; `matrix` is R (width × width), orthogonal."""

    kind: str
    width: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown rotation {self.kind!r} (known: {', '.join(KINDS)})")
        if type(self.seed) is not int or not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"rotation seed must be an integer from 0 to 2^63-1 (got {self.seed!r})")

    @property
    def block(self) -> int:
        return hadamard_block(self.width)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if self.kind == "hadamard":
            return hadamard_matrix(self.width, self.block, dtype)
        return random_orthogonal(self.width, self.seed, dtype)

    def apply(self, x: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """x·R: the fast transform for Hadamard, a matmul with `matrix` otherwise."""
        if x.shape[-1] != self.width:
            raise InputError(f"rotation of width {self.width} cannot apply to width {x.shape[-1]}",
                             hint="the rotation does not match this model: convert the bundle again")
        if self.kind == "hadamard":
            return fwht(x, self.block)
        return x @ (matrix if matrix is not None else self.matrix(x.dtype))
