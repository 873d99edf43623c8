"""SVCCA (Raghu et al. 2017), deterministic.

Each side: (optionally) L2-normalise rows, z-score columns (constant columns become 0), keep the top-``dim``
left singular vectors (from an exact symmetric eigendecomposition of the smaller Gram matrix, in float64). The
canonical correlations between two orthonormal, centred bases U_a and U_b are the singular values of U_aᵀ U_b;
the score is their mean.

Intentional differences from the paper's code: it uses ``torch.svd_lowrank`` (randomised, so its numbers change
from run to run), scikit-learn's iterative CCA and adds 1e-10 random noise; ours is exact and deterministic.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ._checks import to_float32
from ._spec import attach, run

_RANK_TOL = 1e-10  # relative eigenvalue below which a direction counts as absent


def top_directions(x: Tensor, dim: int, name: str) -> Tensor:
    """Orthonormal N × dim basis of the top-``dim`` left singular directions of the z-scored ``x``."""
    x = x - x.mean(0, keepdim=True)
    std = x.std(0, keepdim=True)
    x = torch.where(std > 0, x / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(x))
    n, d = x.shape
    # The product itself in float64: a float32 Gram matrix leaves ~1e-7 relative round-off in the directions a
    # rank-deficient side lacks, which would then pass the rank check and enter the basis as noise.
    xd = x.double()
    gram = xd.T @ xd if d <= n else xd @ xd.T
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0)[:dim], evecs.flip(1)[:, :dim]
    if not evals[-1] > _RANK_TOL * max(float(evals[0]), 1e-300):
        raise ValueError(f"{name} has fewer than dim={dim} independent directions after z-scoring; lower dim")
    u = xd @ evecs if d <= n else evecs
    return torch.linalg.qr(u).Q


def _prepare(x: Tensor, name: str, opts: Dict[str, Any], origin: Optional[Tensor] = None) -> Tensor:
    if x.shape[1] < opts["dim"]:
        raise ValueError(f"dim={opts['dim']} exceeds the width of {name} ({x.shape[1]})")
    return top_directions(to_float32(x, opts["normalize"], name), opts["dim"], name)


def _pair(ua: Tensor, ub: Tensor, opts: Dict[str, Any]) -> float:
    return float(torch.linalg.svdvals(ua.T @ ub).clamp(0.0, 1.0).mean())


def _check(n: int, opts: Dict[str, Any]) -> None:
    dim = opts["dim"]
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if dim > n - 1:
        raise ValueError(f"dim={dim} needs N > dim samples, got N={n}")


def svcca(a: Tensor, b: Tensor, dim: int = 10, normalize: bool = True) -> float:
    """Mean canonical correlation between the top-``dim`` SVD subspaces of the z-scored features (deterministic).

    ``dim`` must not exceed either width nor N − 1 (``ValueError`` if a side has fewer directions).
    """
    return run(svcca.spec, a, b, dict(dim=dim, normalize=normalize))


attach(svcca, prepare=_prepare, pair=_pair, check=_check, permute=lambda u, perm, opts: u[perm])
