"""Unsupervised embedding translation: a linear map between two encoders' spaces learned without any pairs.

Encoder A saw one set of inputs, encoder B another (disjoint) set, and nothing says which item matches which.
If both encoders represent the world alike (the Platonic Representation Hypothesis), the *shape* of the two
point clouds agrees up to a rotation, and the shape alone is enough to find it. The method here is the
CPU-robust "match structure, then refine" recipe (cf. mini-vec2vec; MUSE's Procrustes refinement):

1. **Common frame.** Each side is centred and projected on its top ``dim`` principal directions (PCA), optionally
   whitened (every direction unit variance, so the rotation is found for the correlation structure, not for a few
   dominant directions). Different widths stop mattering here: both sides become ``dim``-wide.
2. **Structure matching (initialisation).** Spherical k-means gives ``clusters`` centroids per side; their cosine
   similarity matrices ``Ca``, ``Cb`` describe each cloud's shape. The centroid correspondence is the permutation
   ``π`` maximising ``tr(Ca Π Cb Πᵀ)`` (a quadratic assignment problem), solved by scipy's FAQ method started from
   a sorted-similarity-signature match (Hungarian on each centroid's sorted row of similarities) and from random
   starts. The matched centroids are *anchors*: every point is described by its cosines to its own side's
   anchors (relative representations, Moschella et al. 2023), which are comparable across sides, and the points
   are matched one to one (Hungarian) on those descriptions. ``init="gw"`` instead couples a point sample of each
   side by entropic Gromov-Wasserstein optimal transport (:mod:`prh_stitch.closed_form.unsupervised_gw`, needs POT).
3. **Procrustes refinement.** From the matched pairs, the orthogonal map ``R = UVᵀ`` (SVD of ``ZaᵀZb``); then
   repeatedly: translate A, match A to B one to one (Hungarian on cosine, in mini-batches), keep the most similar
   ``keep`` fraction of the matches and refit ``R``; stop when the matches no longer change.

Several initialisations (``restarts``: k-means seeds and QAP starts) are each refined briefly and the one whose
matches best keep the two sides' within-side similarity structure (:func:`structure_agreement`), or with
``select="mutual_nn"`` the one with the most mutual nearest neighbours (unsupervised criteria: no pairing is ever
read), is refined to the end. The result is an affine map in the caller's feature space, ``ŷ = μb + (x − μa)·W``, with
``W = Pa·diag(1/sa)·R·diag(sb)·Pbᵀ``, which a ``linear``/``affine`` stitcher holds exactly (see
:func:`fit_unsupervised_stitcher`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from prh_stitch.closed_form.unsupervised_gw import mutual_nn_consistency

# Hungarian matching is O(b³): mini-batches of this many rows per side keep one step under a second on a CPU.
DEFAULT_BATCH = 512
INITS = ("points", "clusters", "gw")
SELECTIONS = ("structure", "mutual_nn")


@dataclass(frozen=True)
class UnsupervisedOptions:
    """Options of :func:`fit_unsupervised` (defaults chosen on planted problems and scene captions).

    Args:
        dim: common PCA width (capped at both widths and at each side's row count − 1).
        whiten: scale every principal direction to unit variance before matching.
        coarse: width of the first stage: the structure is matched in the top ``coarse`` principal directions
            (where the shape is clearest), then the frame doubles up to ``dim``, each stage started from the
            matches of the previous one; ``coarse >= dim`` matches in the full frame at once.
        init: ``points`` (QAP on a random subsample of points), ``clusters`` (QAP on k-means centroids, then points
            matched on their relative representations to the matched centroids) or ``gw`` (entropic
            Gromov-Wasserstein coupling of a random subsample of points; needs POT, see ``unsupervised_gw``).
        sample: points per side in the ``points`` QAP and the ``gw`` coupling.
        epsilon: entropic regularisation of the ``gw`` coupling (cosine similarities, square loss).
        select: the unsupervised criterion that picks the restart: ``structure`` (:func:`structure_agreement`) or
            ``mutual_nn`` (:func:`~prh_stitch.closed_form.unsupervised_gw.mutual_nn_consistency` on all points).
        clusters: k-means centroids per side for the ``clusters`` init.
        restarts: initialisations tried; the best by the unsupervised criterion is kept.
        iterations: Procrustes refinement steps (at most; it stops when the matching is stable).
        keep: fraction of the most similar matched pairs that the Procrustes step fits.
        batch: rows per side in one Hungarian matching block.
        seed: seed of k-means, QAP starts and mini-batch order.
    """

    dim: int = 64
    whiten: bool = True
    coarse: int = 8
    init: str = "points"
    sample: int = 400
    clusters: int = 32
    epsilon: float = 0.005
    select: str = "structure"
    restarts: int = 6
    iterations: int = 25
    keep: float = 0.7
    batch: int = DEFAULT_BATCH
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"unsupervised option init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.select not in SELECTIONS:
            raise ValueError(f"unsupervised option select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not self.epsilon > 0:
            raise ValueError(f"unsupervised option epsilon must be a number > 0, got {self.epsilon!r}")
        for name in ("dim", "coarse", "sample", "clusters", "restarts", "iterations", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"unsupervised option {name} must be an integer >= 1, got {value!r}")
        if min(self.clusters, self.sample) < 3:
            raise ValueError(f"unsupervised options clusters and sample must be >= 3 (a shape needs 3 points), got "
                             f"{self.clusters} and {self.sample}")
        if not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(f"unsupervised option keep must be in (0, 1], got {self.keep!r}")

    @classmethod
    def coerce(cls, options: Optional[Dict[str, Any]]) -> "UnsupervisedOptions":
        """From a plain dict (a config's section); an unknown key is an error listing the valid ones."""
        options = dict(options or {})
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"unknown unsupervised option(s) {unknown}; valid: {sorted(valid)}")
        return cls(**options)


@dataclass
class Frame:
    """One side's common frame: ``z = (x − mean) @ basis / scale`` (float64)."""

    mean: Tensor
    basis: Tensor  # (D, dim), orthonormal columns
    scale: Tensor  # (dim,)

    def __call__(self, x: Tensor) -> Tensor:
        return (x.double() - self.mean) @ self.basis / self.scale


@dataclass
class UnsupervisedMap:
    """The fitted translation: ``ŷ = target.mean + ((x − source.mean) @ weight)``, and how it was found."""

    source: Frame
    target: Frame
    rotation: Tensor  # (dim, dim) orthogonal, frame A -> frame B
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def weight(self) -> Tensor:
        """``W`` (Da × Db) with ``ŷ = μb + (x − μa) W``."""
        s, t = self.source, self.target
        return (s.basis / s.scale) @ self.rotation @ (t.basis * t.scale).T

    @property
    def bias(self) -> Tensor:
        return self.target.mean - self.source.mean @ self.weight

    def __call__(self, x: Tensor) -> Tensor:
        return x.double() @ self.weight + self.bias


def _check(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D floating-point (N × D) tensor, got {shape}")
    if x.shape[0] < 4:
        raise ValueError(f"{name} has {x.shape[0]} rows; unsupervised translation needs at least a few dozen")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf; remove those rows first")
    return x.detach().cpu().double()


def principal_frame(x: Tensor, dim: int, whiten: bool) -> Frame:
    """Centre, top-``dim`` principal directions (signs fixed: largest |loading| positive), optional whitening."""
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    basis = vh[:dim].T
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True))).squeeze(0)
    basis = basis * torch.where(signs == 0, 1.0, signs)
    std = s[:dim] / max(len(x) - 1, 1) ** 0.5
    scale = std.clamp_min(float(std[0]) * 1e-6) if whiten else torch.ones_like(std)
    return Frame(mean, basis, scale)


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, dim=1, eps=1e-12)


def spherical_kmeans(z: Tensor, k: int, generator: torch.Generator, steps: int = 40) -> Tensor:
    """``k`` unit centroids of the unit rows of ``z`` (k-means++ seeding, cosine Lloyd steps)."""
    u = _unit(z)
    n = len(u)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [u[first]]
    closest = 1.0 - u @ u[first]
    for _ in range(1, k):
        weights = closest.clamp_min(0) ** 2
        pick = int(torch.multinomial(weights / weights.sum() if weights.sum() > 0 else torch.ones(n) / n, 1,
                                     generator=generator))
        centres.append(u[pick])
        closest = torch.minimum(closest, 1.0 - u @ u[pick])
    c = torch.stack(centres)
    for _ in range(steps):
        assign = (u @ c.T).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, u)
        empty = sums.norm(dim=1) == 0
        sums[empty] = c[empty]  # an empty cluster keeps its centre
        new = _unit(sums)
        if torch.allclose(new, c, atol=1e-10):
            break
        c = new
    return c


def _signature_match(ca: Tensor, cb: Tensor) -> np.ndarray:
    """Hungarian match of centroids by their sorted similarity profiles (invariant to the unknown order)."""
    from scipy.optimize import linear_sum_assignment

    sa = ca.sort(dim=1, descending=True).values[:, 1:]
    sb = cb.sort(dim=1, descending=True).values[:, 1:]
    cost = torch.cdist(sa, sb).numpy()
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def match_structure(ca: Tensor, cb: Tensor, starts: int, seed: int) -> Tuple[np.ndarray, float]:
    """Permutation ``π`` (A's centroid i ↔ B's centroid π[i]) maximising ``tr(Ca Π Cb Πᵀ)``, and that objective.

    scipy's FAQ (Vogelstein et al. 2015) from the signature match and from ``starts`` random doubly stochastic
    starts; the best local optimum wins.
    """
    from scipy.optimize import quadratic_assignment

    a, b = ca.numpy(), cb.numpy()
    k = len(a)
    first = _signature_match(ca, cb)
    inits: List[Any] = [np.eye(k)[first]]
    inits += ["randomized"] * starts
    best, best_score = first, float(np.sum(a * b[np.ix_(first, first)]))
    rng = np.random.default_rng(seed)
    for p0 in inits:
        res = quadratic_assignment(a, b, method="faq", options={"maximize": True, "P0": p0, "rng": rng})
        perm = np.asarray(res.col_ind)
        score = float(np.sum(a * b[np.ix_(perm, perm)]))
        if score > best_score + 1e-12:
            best, best_score = perm, score
    return best, best_score


def hungarian_pairs(a: Tensor, b: Tensor, batch: int, generator: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
    """One-to-one matches maximising cosine, in random mini-batches of ≤ ``batch`` rows per side.

    Returns ``(rows of a, rows of b, cosine)``; with unequal counts the larger side is subsampled per block.
    """
    from scipy.optimize import linear_sum_assignment

    ua, ub = _unit(a), _unit(b)
    pa, pb = torch.randperm(len(a), generator=generator), torch.randperm(len(b), generator=generator)
    blocks = max(1, -(-min(len(a), len(b)) // batch))
    out_a, out_b, out_s = [], [], []
    for ia, ib in zip(pa.tensor_split(blocks), pb.tensor_split(blocks)):
        sim = ua[ia] @ ub[ib].T
        rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
        rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
        out_a.append(ia[rows])
        out_b.append(ib[cols])
        out_s.append(sim[rows, cols])
    return torch.cat(out_a), torch.cat(out_b), torch.cat(out_s)


def procrustes(za: Tensor, zb: Tensor) -> Tensor:
    """Orthogonal ``R`` minimising ``‖za R − zb‖`` (``R = UVᵀ`` from the SVD of ``zaᵀ zb``)."""
    u, _, vh = torch.linalg.svd(za.T @ zb)
    return u @ vh


def structure_agreement(za: Tensor, zb: Tensor, ia: Tensor, ib: Tensor) -> float:
    """How well matched pairs keep each other's company: the correlation, over all pairs of matches, between the
    cosine of two A points and the cosine of their two B matches. Each side's cosines are its own (no map enters),
    so a matching that merely puts each point next to *some* near point under a wrong rotation scores low."""
    ua, ub = _unit(za[ia]), _unit(zb[ib])
    off = ~torch.eye(len(ia), dtype=torch.bool)
    ka, kb = (ua @ ua.T)[off], (ub @ ub.T)[off]
    ka, kb = ka - ka.mean(), kb - kb.mean()
    return float((ka @ kb) / (ka.norm() * kb.norm()).clamp_min(1e-12))


def _refine(za: Tensor, zb: Tensor, rotation: Tensor, opts: UnsupervisedOptions, iterations: int,
            generator: torch.Generator) -> Tuple[Tensor, float, int]:
    """Alternate one-to-one matching in the translated space and Procrustes on the most similar matches."""
    previous: Optional[Tensor] = None
    score, steps = float("nan"), 0
    for steps in range(1, iterations + 1):
        ia, ib, sim = hungarian_pairs(za @ rotation, zb, opts.batch, generator)
        score = float(sim.mean())
        order = torch.argsort(ia)
        matched = ib[order]
        if previous is not None and torch.equal(matched, previous):
            break
        previous = matched
        top = sim.argsort(descending=True)[: max(za.shape[1], int(round(opts.keep * len(sim))))]
        rotation = procrustes(_unit(za[ia[top]]), _unit(zb[ib[top]]))
    return rotation, score, steps


def _initial_rotation(za: Tensor, zb: Tensor, opts: UnsupervisedOptions, restart: int,
                      generator: torch.Generator) -> Tuple[Tensor, float]:
    """A first rotation from shape alone: ``init="points"`` matches a random subsample of points by their
    similarity structure (a Gromov-Wasserstein-like QAP); ``init="clusters"`` matches k-means centroids that way and
    then every point by its relative representation to the matched centroids."""
    if opts.init == "gw":
        from prh_stitch.closed_form.unsupervised_gw import gw_rotation

        return gw_rotation(za, zb, opts.sample, float(opts.epsilon), generator)
    if opts.init == "points":
        m = min(opts.sample, len(za), len(zb))
        ua = _unit(za[torch.randperm(len(za), generator=generator)[:m]])
        ub = _unit(zb[torch.randperm(len(zb), generator=generator)[:m]])
        perm, qap = match_structure(ua @ ua.T, ub @ ub.T, starts=1, seed=opts.seed * 1000 + restart)
        return procrustes(ua, ub[torch.as_tensor(perm)]), qap / m ** 2
    k = min(opts.clusters, len(za) // 2, len(zb) // 2)
    ca = spherical_kmeans(za, k, generator)
    cb = spherical_kmeans(zb, k, generator)
    perm, qap = match_structure(ca @ ca.T, cb @ cb.T, starts=2, seed=opts.seed * 1000 + restart)
    ra = _unit(za) @ ca.T
    rb = _unit(zb) @ cb[torch.as_tensor(perm)].T
    # Centred relative representations: the similarity every point has to every anchor carries no match information.
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    ia, ib, _ = hungarian_pairs(ra, rb, opts.batch, generator)
    return procrustes(_unit(za[ia]), _unit(zb[ib])), qap / k ** 2


def fit_unsupervised(source: Tensor, target: Tensor, options: Optional[UnsupervisedOptions] = None
                     ) -> UnsupervisedMap:
    """Learn the map from ``source`` features (Na × Da) to ``target`` features (Nb × Db); rows are *not* paired.

    Row order carries no information: permuting either side's rows gives the same map (the matching steps start
    from random mini-batch orders drawn from ``seed``, and the result is a function of the two point sets).
    """
    opts = options or UnsupervisedOptions()
    x, y = _check(source, "source features"), _check(target, "target features")
    dim = min(opts.dim, x.shape[1], y.shape[1], len(x) - 1, len(y) - 1)
    # Canonical row order, so that a shuffled input is literally the same problem (same mini-batches, same result).
    x, y = _canonical_order(x), _canonical_order(y)
    fa, fb = principal_frame(x, dim, opts.whiten), principal_frame(y, dim, opts.whiten)
    za, zb = fa(x), fb(y)
    generator = torch.Generator().manual_seed(opts.seed)
    widths = coarse_to_fine(dim, opts.coarse)
    first = widths[0]
    trials = []
    for restart in range(opts.restarts):
        rotation, qap = _initial_rotation(za[:, :first], zb[:, :first], opts, restart, generator)
        rotation, score, _ = _refine(za[:, :first], zb[:, :first], rotation, opts, min(5, opts.iterations), generator)
        ia, ib, _ = hungarian_pairs(za[:, :first] @ rotation, zb[:, :first], opts.batch, generator)
        trials.append({"restart": restart, "init_objective": qap, "matched_cosine": score, "rotation": rotation,
                       "structure_agreement": structure_agreement(za, zb, ia, ib),
                       "mutual_nn": mutual_nn_consistency(za[:, :first] @ rotation, zb[:, :first])})
    # Chosen by an unsupervised criterion, not matched cosine: on real encoders a wrong rotation can match every point
    # to a near neighbour as well as the right one does, but not keep the neighbourhoods.
    key = "structure_agreement" if opts.select == "structure" else "mutual_nn"
    best = max(trials, key=lambda t: t[key])
    rotation = best["rotation"]
    for narrow, wide in zip(widths, widths[1:]):
        # Settle the rotation of the leading principal directions, then lift it: the pairs it matches give the
        # first Procrustes fit of the wider frame.
        rotation, _, _ = _refine(za[:, :narrow], zb[:, :narrow], rotation, opts, opts.iterations, generator)
        ia, ib, _ = hungarian_pairs(za[:, :narrow] @ rotation, zb[:, :narrow], opts.batch, generator)
        rotation = procrustes(_unit(za[ia, :wide]), _unit(zb[ib, :wide]))
    rotation, score, steps = _refine(za, zb, rotation, opts, opts.iterations, generator)
    info = {"options": asdict(opts), "dim": dim, "widths": widths, "n_source": len(x), "n_target": len(y),
            "chosen_restart": best["restart"], "matched_cosine": score, "refinement_steps": steps,
            "restarts": [{k: v for k, v in t.items() if k != "rotation"} for t in trials]}
    return UnsupervisedMap(fa, fb, rotation, info)


def coarse_to_fine(dim: int, coarse: int) -> List[int]:
    """Frame widths of the stages: ``coarse``, doubling, up to ``dim`` (just ``[dim]`` when ``coarse >= dim``)."""
    widths = [dim]
    while widths[0] // 2 >= coarse:
        widths.insert(0, widths[0] // 2)
    return widths


def _canonical_order(x: Tensor) -> Tensor:
    """Rows sorted lexicographically by value (a content-defined order: any permutation of x maps to it)."""
    order = np.lexsort(x.numpy().T[::-1])
    return x[torch.as_tensor(order)]


# -- the stitcher side: ``fit: unsupervised`` ---------------------------------------------------------------------


def unpaired_halves(n: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Two disjoint halves of ``range(n)`` (seeded): source rows from the first, target rows from the second."""
    if n < 8:
        raise ValueError(f"fit 'unsupervised' needs at least 8 training rows to split into two halves, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2].sort().values, order[n // 2:].sort().values


@torch.no_grad()
def fit_unsupervised_stitcher(stitcher, source: Tensor, target: Tensor,
                              options: Optional[UnsupervisedOptions] = None) -> UnsupervisedMap:
    """Fit the unpaired map in the stitcher's normalised space and write it into its linear core.

    ``source`` and ``target`` are unrelated row sets (any counts). As the closed forms do, the map is fitted from
    ``x' = input_norm(x)`` to ``y' = (y − shift)/scale`` of the output norm (which must be fitted, on each side's own
    rows: that reads no pairing). A ``linear`` core has no intercept: its centring must come from the norms
    (``center``/``standard``), and the fitted intercept, then ~0, is dropped.
    """
    from prh_stitch.closed_form.stitcher_core import _check_norms, _linear_core, _write

    core = _linear_core(stitcher)
    _check_norms(stitcher)
    for x, side, dim in ((source, "source", stitcher.in_dim), (target, "target", stitcher.out_dim)):
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"{side} features have shape {tuple(x.shape)} but the stitcher's {side} side is {dim}-d")
    onorm = stitcher.output_norm
    x = stitcher.input_norm(source.to(stitcher.input_norm.mean.dtype)).double()
    y = ((target.double() - onorm.mean.double()) / onorm.scale.double())
    fitted = fit_unsupervised(x, y, options)
    _write(stitcher, fitted.weight, fitted.bias if core.bias is not None else None)
    return fitted


def fit_unsupervised_pairs_blind(stitcher, train, distributed: bool = False,
                                 options: Optional[Dict[str, Any]] = None):
    """``fit_closed_form(method="unsupervised")``: the training pairs' rows are split into two disjoint halves, the
    source side keeps the first and the target side the second, so the pairing is never read."""
    from prh_stitch.closed_form.options import ClosedFormResult

    if distributed:
        raise ValueError("fit 'unsupervised' matches whole point clouds and cannot be split over processes: run it "
                         "on one process (devices: 1), it takes seconds")
    if not (isinstance(train, (tuple, list)) and len(train) == 2 and all(isinstance(t, Tensor) for t in train)):
        raise ValueError("fit 'unsupervised' needs the training features as one (source, target) pair of tensors")
    source, target = train
    opts = UnsupervisedOptions.coerce(options)
    rows_a, rows_b = unpaired_halves(len(source), opts.seed)
    fitted = fit_unsupervised_stitcher(stitcher, source[rows_a], target[rows_b], opts)
    return ClosedFormResult(method="unsupervised", n_train=len(rows_a) + len(rows_b), unsupervised=fitted.info)
