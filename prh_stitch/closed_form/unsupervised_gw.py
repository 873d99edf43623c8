"""Gromov-Wasserstein initialisation and the mutual-nearest-neighbour criterion of unsupervised translation.

**Initialisation (``init: gw``).** A random subsample of ``m`` points per side, each side described only by its own
cosine-similarity matrix ``Ca``, ``Cb``. Entropic Gromov-Wasserstein optimal transport (Peyré, Cuturi & Solomon
2016; square loss) finds the soft coupling ``T`` (``m × m``, uniform marginals) whose matched pairs best keep each
other's similarities: ``min_T Σ (Ca[i,k] − Cb[j,l])² T[i,j] T[k,l]``. Unlike the hard quadratic assignment of the
``points`` init, the entropic problem is smooth and is solved with a sequence of Sinkhorn projections; on 256
MiniLM/MPNet scene captions it reached a lower GW loss (0.038) than POT's conditional-gradient solver (Frank-Wolfe, as
FAQ) from ten starts (0.041-0.062). The rotation is the orthogonal
Procrustes fit of each A point to its barycentric image ``m · T B`` (where the coupling sends it).

**Criterion (``select: mutual_nn``).** The fraction of translated A points whose nearest B point has them as its
nearest translated A point. It reads no pairing. On MiniLM → MPNet scene captions (1,024 per side) the paired
rotation scores 0.48 on it, every rotation the search found at most 0.44; among found rotations it is only a rough
guide to retrieval (measured in the README's translation section).

Needs the POT library (``pip install pot``, or the ``unsupervised`` extra); only this init imports it.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

POT_HINT = "init 'gw' needs the POT library (optimal transport): pip install pot  (or pip install 'prh_stitch[unsupervised]')"


def require_pot():
    """The ``ot`` module, or one ImportError naming the fix."""
    try:
        import ot
    except ImportError as error:  # pragma: no branch - the message is the point
        raise ImportError(POT_HINT) from error
    return ot


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, dim=1, eps=1e-12)


def gw_coupling(ua: Tensor, ub: Tensor, epsilon: float, max_iter: int = 200) -> Tuple[Tensor, float]:
    """Entropic GW coupling (``len(ua) × len(ub)``, uniform marginals) of two unit-row sets' cosine matrices, and its
    GW loss (the unregularised square-loss objective of the coupling found)."""
    ot = require_pot()
    ca, cb = (ua @ ua.T).numpy(), (ub @ ub.T).numpy()
    p, q = np.full(len(ca), 1.0 / len(ca)), np.full(len(cb), 1.0 / len(cb))
    import warnings

    with warnings.catch_warnings():
        # Sinkhorn's "did not converge" at small epsilon: the coupling is still a valid (if less sharp) start; an
        # overflow is caught below by the finiteness check.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        coupling = ot.gromov.entropic_gromov_wasserstein(ca, cb, p, q, "square_loss", epsilon=epsilon,
                                                         max_iter=max_iter)
        if not np.isfinite(coupling).all():
            # Small epsilon overflowed the plain Sinkhorn kernel: redo it in the log domain (slower, stable).
            coupling = ot.gromov.entropic_gromov_wasserstein(ca, cb, p, q, "square_loss", epsilon=epsilon,
                                                             max_iter=max_iter, method="sinkhorn_log")
    loss = float(ot.gromov.gwloss(*ot.gromov.init_matrix(ca, cb, p, q, "square_loss"), coupling))
    return torch.as_tensor(coupling, dtype=ua.dtype), loss


def gw_rotation(za: Tensor, zb: Tensor, sample: int, epsilon: float, generator: torch.Generator
                ) -> Tuple[Tensor, float]:
    """A first rotation (frame A → frame B) from the GW coupling of ``sample`` random points per side."""
    from prh_stitch.closed_form.unsupervised import procrustes

    m = min(sample, len(za), len(zb))
    ua = _unit(za[torch.randperm(len(za), generator=generator)[:m]])
    ub = _unit(zb[torch.randperm(len(zb), generator=generator)[:m]])
    coupling, loss = gw_coupling(ua, ub, epsilon)
    # Barycentric projection: where the coupling sends each A point (rows of T sum to 1/m).
    images = coupling @ ub * m
    return procrustes(ua, images), loss


def mutual_nn_consistency(translated: Tensor, target: Tensor) -> float:
    """Fraction of translated rows ``i`` whose nearest target row ``j`` (cosine) has ``i`` as its nearest translated
    row. Invariant to row order; 1.0 when the translated cloud lands on the target cloud point for point."""
    sim = _unit(translated) @ _unit(target).T
    forward = sim.argmax(1)
    backward = sim.argmax(0)
    return float((backward[forward] == torch.arange(len(translated))).double().mean())
