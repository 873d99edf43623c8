"""The solvers on normalised moments: least squares and ridge (a Cholesky solve per strength), Procrustes."""

from __future__ import annotations

import torch
from torch import Tensor

from prh_stitch.closed_form.normal_equations import _Moments

# Relative ridge used when least squares is rank-deficient: small enough to leave well-determined directions
# untouched (relative to the mean variance), large enough to make the system solvable in float64.
RANK_FALLBACK_RIDGE = 1e-6
# Eigenvalues below this fraction of the largest count as zero (float64 round-off on an N x D Gram matrix).
RANK_RTOL = 1e-10


class _RidgePath:
    """``W(λ) = (A + λτI)⁻¹ B`` by one Cholesky factorisation per λ.

    A Cholesky factorisation costs ``D³/3`` and parallelises well; an eigendecomposition reused over the grid costs
    ~9·D³ up front, so the grid sizes used in practice (< 20 values) are cheaper this way.
    """

    def __init__(self, m: _Moments) -> None:
        self.a, self.b = m.xx, m.xy
        self.tau = float(m.xx.diagonal().mean()) or 1.0  # all-zero features: any scale works

    def rank_deficient(self) -> bool:
        """Whether ``A`` is numerically singular: a pivot of its Cholesky factorisation is (close to) zero.

        Without pivoting, a column that depends on earlier ones leaves a zero Schur complement, so its pivot
        vanishes (or goes negative by round-off, which cholesky_ex reports as a failure).
        """
        factor, info = torch.linalg.cholesky_ex(self.a)
        if int(info) != 0:
            return True
        pivots = factor.diagonal().square()
        return bool(pivots.min() <= RANK_RTOL * max(float(self.a.diagonal().max()), 1e-300))

    def solve(self, ridge: float) -> Tensor:
        eye = torch.eye(len(self.a), dtype=self.a.dtype, device=self.a.device)
        return torch.cholesky_solve(self.b, torch.linalg.cholesky(self.a + (ridge * self.tau) * eye))


def _procrustes(m: _Moments, scaling: str) -> Tensor:
    xy = m.xy
    if scaling == "standard":
        sx = m.xx.diagonal().clamp_min(1e-24).sqrt()
        # Root mean squares in the same frame as the moments (about the mean when centred, about 0 otherwise).
        sy = m.yy.clamp_min(1e-24).sqrt()
        xy = xy / torch.outer(sx, sy)
    u, s, vh = torch.linalg.svd(xy, full_matrices=False)
    q = u @ vh
    if scaling == "standard":
        return q / sx[:, None] * sy[None, :]
    if scaling == "isotropic":
        denominator = float(torch.einsum("ij,ik,kj->", q, m.xx, q))
        return q * (float(s.sum()) / denominator if denominator > 0 else 1.0)
    return q
