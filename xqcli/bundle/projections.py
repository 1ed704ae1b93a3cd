"""Per-layer SVD factors for grouped-query XQuant (arXiv 2508.10395 §3.3), computed in float64.

Row-vector convention of the paper: K = X·W_k with W_k = k_proj.weight.T (d × d_kv).
Thin SVD of k_proj.weight (d_kv × d) = U_ S Vh gives
    U_k = Vhᵀ (d × d_kv, orthonormal columns)    M_k = diag(S)·U_ᵀ (d_kv × d_kv)
so X·W_k = (X·U_k)·M_k exactly; the latent X·U_k is cached "without Σ_k" as the paper says.
The same for V, and for XQuant-CL on GQA the shared basis U_kv of W_kv = [W_k | W_v] (Σ_kv B_kvᵀ is
discarded: K/V are rebuilt from the full-width accumulator with W_kv itself).

Sign convention (docs/design.md §3, our choice): singular vectors are defined up to sign, and per-token
groups over X·U_v care. Each column of U is flipped so that its largest-magnitude entry is positive
(the matching row of M flips with it), which makes the factors deterministic across SVD backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SVDFactors:
    u: torch.Tensor  # (d, r) orthonormal columns: the down-projection X -> latent
    m: torch.Tensor  # (r, out) with X·W = (X·u)·m ; empty (0, 0) for a basis-only factor
    s: torch.Tensor  # (r,) singular values, descending


def svd_factors(weight: torch.Tensor, *, keep_m: bool = True) -> SVDFactors:
    """Factor an nn.Linear weight (out × d, out <= d) as described in the module docstring."""
    w = weight.detach().to(torch.float64)
    # Single-threaded, always: the same factors whoever computes them (convert or load), and LAPACK's small
    # SVDs spin under OpenMP on busy cores (63 s instead of <1 s for SmolLM2's 90 on a shared 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        u_, s, vh = torch.linalg.svd(w, full_matrices=False)  # w = u_ diag(s) vh
    finally:
        torch.set_num_threads(threads)
    u = vh.T  # (d, r)
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    u = u * signs
    m = (s[:, None] * u_.T) * signs[:, None] if keep_m else torch.empty(0, 0, dtype=torch.float64)
    return SVDFactors(u=u, m=m, s=s)


@dataclass
class LayerProjections:
    """What the GQA caches need for one layer, in float64 until `to` is called."""

    k: SVDFactors
    v: SVDFactors
    kv: SVDFactors  # basis of [W_k | W_v] for XQuant-CL

    def to(self, dtype: torch.dtype, device: torch.device) -> "LayerProjections":
        conv = lambda f: SVDFactors(*(t.to(device=device, dtype=dtype) for t in (f.u, f.m, f.s)))  # noqa: E731
        return LayerProjections(conv(self.k), conv(self.v), conv(self.kv))


def reproduction_errors(k_weight: torch.Tensor, v_weight: torch.Tensor, lp: LayerProjections) -> dict[str, float]:
    """How far one layer's factors are from rebuilding that layer's weights, for one fixed probe row x.

    Relative errors ‖(x·U)·M − x·Wᵀ‖ / ‖x·Wᵀ‖ for K and V, and ‖(x·U_kv·U_kvᵀ)·W_kvᵀ − x·W_kvᵀ‖ / ‖x·W_kvᵀ‖
    for the shared basis: matrix-vector products only, O(d·d_kv), in float64. x is a seeded Gaussian
    row, so any change of U or M (another layer's, another model's, an edited entry) moves the result
    with probability one, while the factors of these very weights reproduce it to float32 rounding.
    """
    x = torch.randn(k_weight.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def rel(rebuilt: torch.Tensor, want: torch.Tensor) -> float:
        return float((rebuilt - want).norm() / want.norm().clamp_min(1e-300))

    w_k, w_v = k_weight.double(), v_weight.double()
    w_kv = torch.cat([w_k, w_v])
    u_kv = lp.kv.u.double()
    return {"K": rel((x @ lp.k.u.double()) @ lp.k.m.double(), w_k @ x),
            "V": rel((x @ lp.v.u.double()) @ lp.v.m.double(), w_v @ x),
            "K|V basis": rel(w_kv @ (u_kv @ (x @ u_kv)), w_kv @ x)}


def layer_projections(k_weight: torch.Tensor, v_weight: torch.Tensor) -> LayerProjections:
    return LayerProjections(k=svd_factors(k_weight), v=svd_factors(v_weight),
                            kv=svd_factors(torch.cat([k_weight, v_weight], dim=0), keep_m=False))
