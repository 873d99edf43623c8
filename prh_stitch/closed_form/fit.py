"""The entry point :func:`fit_closed_form`: check the options, accumulate the statistics, solve, write the core."""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from prh_stitch.closed_form.normal_equations import NormalEquations, Pairs, _Moments
from prh_stitch.closed_form.options import (DEFAULT_RIDGE_GRID, METHODS, SCALINGS, SELECT_BY, ClosedFormResult,
                                            check_gain, check_ridge_grid, check_whiten)
from prh_stitch.closed_form.solvers import RANK_FALLBACK_RIDGE, _procrustes, _RidgePath
from prh_stitch.closed_form.stitcher_core import _check_norms, _intercept, _linear_core, _write
from prh_stitch.closed_form.tuning import _retrieval_tuned, _select_ridge
from prh_stitch.stitchers import Stitcher


def fit_closed_form(
    stitcher: Stitcher,
    train: Pairs,
    method: str = "ridge",
    *,
    val: Optional[Tuple[Tensor, Tensor]] = None,
    val_groups: Optional[Tensor] = None,
    ridge: Optional[float] = None,
    ridge_grid: Sequence[float] = DEFAULT_RIDGE_GRID,
    select_by: str = "recall@1",
    scaling: str = "none",
    center: Optional[bool] = None,
    chunk_rows: int = 16384,
    precision: str = "float64",
    distributed: bool = False,
    gain: Union[str, float, None] = "auto",
    whiten: Union[str, float, None] = "auto",
    unsupervised: Optional[dict] = None,
) -> ClosedFormResult:
    """Fit ``stitcher``'s linear core in closed form and write its weight (and bias) in place.

    Args:
        stitcher: a ``linear`` or ``affine`` :class:`Stitcher` whose normalisations are fitted.
        train: ``(source, target)`` tensors, an iterable of such chunks, or a :class:`NormalEquations`.
        method: ``lstsq``, ``ridge`` or ``procrustes`` (see the module docstring).
        val: held-out ``(source, target)`` features to choose the ridge strength from ``ridge_grid``
            (needed when the grid has more than one value and ``ridge`` is not given).
        val_groups: caption-group ids of ``val`` rows (same-caption items count as correct in recall@1).
        ridge: a fixed relative ridge strength (skips the grid).
        ridge_grid: candidate relative ridge strengths.
        select_by: ``recall@1`` (higher is better, ties -> lower MSE) or ``mse``.
        scaling: Procrustes scaling: ``none``, ``isotropic`` or ``standard``.
        center: Procrustes centring; None = centre iff the core has a bias. ``True`` without a bias requires
            an input normalisation that centres (``center``/``standard``), since the offset has nowhere to go.
        chunk_rows: rows per chunk when ``train`` is a pair of tensors.
        precision: ``float64`` (every product in float64) or ``mixed`` (products of chunk-centred rows in float32,
            sums in float64: ~2x faster on CPUs, relative error ~1e-6 on the moments; see NormalEquations).
        distributed: all-reduce the statistics over the default process group (each rank passed its shard).
        gain: ridge only: deviation gain ``g`` (the stitcher outputs ``ȳ + g·(x − x̄)W``); ``"auto"`` chooses it from
            ``GAIN_GRID`` by held-out recall@1 when ``val`` is given and ``select_by="recall@1"`` (else 1.0);
            a number fixes it; None or 1.0 is the plain ridge.
        whiten: ridge only: relative target-whitening strength (``W ← κ·W(C' + w·τ_y·I)⁻¹``); ``"auto"`` chooses it
            from ``WHITEN_GRID`` (None included) jointly with the gain, under the same conditions; None: none.
        unsupervised: method ``unsupervised`` only: its options (:class:`~prh_stitch.closed_form.unsupervised.UnsupervisedOptions`).
            The training rows are split into two disjoint halves (source side / target side), so no pair is read;
            ``val`` is not used either.
    """
    gain, whiten = _check_options(method, select_by, scaling, gain, whiten)
    if method == "unsupervised":
        from prh_stitch.closed_form.unsupervised import fit_unsupervised_pairs_blind

        return fit_unsupervised_pairs_blind(stitcher, train, distributed, unsupervised)
    fit_bias = _linear_core(stitcher).bias is not None
    _check_norms(stitcher)
    center = _resolve_center(stitcher, method, center, fit_bias)
    stats = _statistics(stitcher, train, chunk_rows, precision, distributed)
    inorm, onorm = stitcher.input_norm, stitcher.output_norm
    m = stats.moments(inorm.mean, inorm.scale, onorm.mean, onorm.scale, center=bool(center))
    result = ClosedFormResult(method=method, n_train=stats.n)
    if method == "procrustes":
        result.scaling = scaling
        weight = _procrustes(m, scaling)
    elif method == "lstsq":
        weight = _solve_lstsq(m, stats, result)
    else:
        grid = check_ridge_grid([ridge] if ridge is not None else ridge_grid)
        weight = _solve_ridge(stitcher, m, grid, fit_bias, val, val_groups, select_by, result)
        weight = _retrieval_tuned(stitcher, m, weight, fit_bias, val, val_groups, select_by, gain, whiten, result)
    _write(stitcher, weight, _intercept(m, weight, fit_bias))
    return result


def _check_options(method: str, select_by: str, scaling: str, gain: Union[str, float, None],
                   whiten: Union[str, float, None]) -> Tuple[Union[str, float], Union[str, float, None]]:
    """Refuse unknown names and retrieval tuning of a non-ridge fit; return the checked ``gain`` and ``whiten``."""
    if method not in METHODS:
        raise ValueError(f"unknown closed-form method {method!r}; choose one of {', '.join(METHODS)}")
    if select_by not in SELECT_BY:
        raise ValueError(f"unknown select_by {select_by!r}; choose one of {', '.join(SELECT_BY)}")
    if scaling not in SCALINGS:
        raise ValueError(f"unknown Procrustes scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")
    gain, whiten = check_gain(gain), check_whiten(whiten)
    if method != "ridge" and (gain not in ("auto", 1.0) or whiten not in ("auto", None)):
        raise ValueError(f"gain and whiten tune a ridge fit for retrieval; method {method!r} takes neither "
                         "(use method 'ridge', or leave them at 'auto')")
    return gain, whiten


def _resolve_center(stitcher: Stitcher, method: str, center: Optional[bool], fit_bias: bool) -> bool:
    """Whether the moments are centred: iff the core has a bias, except where Procrustes is told otherwise."""
    if method != "procrustes" or center is None:
        return fit_bias
    if center and not fit_bias and stitcher.input_norm.kind == "none":
        raise ValueError("Procrustes with center=True needs somewhere to put the offset: use the 'affine' "
                         "stitcher, or input_norm 'center'/'standard' with the 'linear' one")
    return center


def _statistics(stitcher: Stitcher, train: Pairs, chunk_rows: int, precision: str,
                distributed: bool) -> NormalEquations:
    """The training pairs' normal equations (summed over ranks when ``distributed``), checked against the stitcher."""
    stats = NormalEquations.from_pairs(train, chunk_rows, precision)
    if (stats.in_dim, stats.out_dim) != (stitcher.in_dim, stitcher.out_dim):
        raise ValueError(f"features are {stats.in_dim}-d -> {stats.out_dim}-d but the stitcher maps "
                         f"{stitcher.in_dim}-d -> {stitcher.out_dim}-d")
    if distributed:
        stats.all_reduce()
    return stats


def _solve_lstsq(m: _Moments, stats: NormalEquations, result: ClosedFormResult) -> Tensor:
    """Least squares, falling back to a tiny relative ridge (with a warning) when the Gram matrix is singular."""
    path = _RidgePath(m)
    lam = 0.0
    if path.rank_deficient():
        warnings.warn(
            f"least squares: the {stats.in_dim}x{stats.in_dim} source Gram matrix is rank-deficient "
            f"({stats.n} rows; duplicated or constant features?), so the solution is not unique; falling "
            f"back to ridge with relative strength {RANK_FALLBACK_RIDGE:g}",
            RuntimeWarning, stacklevel=3)  # 3: points at fit_closed_form's caller, as the user's line to fix
        lam = RANK_FALLBACK_RIDGE
        result.rank_deficient = True
    result.ridge = lam
    return path.solve(lam)


def _solve_ridge(stitcher: Stitcher, m: _Moments, grid: Sequence[float], fit_bias: bool,
                 val: Optional[Tuple[Tensor, Tensor]], val_groups: Optional[Tensor], select_by: str,
                 result: ClosedFormResult) -> Tensor:
    """The plain ridge weight: the single strength given, or the grid value best on ``val``."""
    path = _RidgePath(m)
    if len(grid) == 1:
        result.ridge = grid[0]
        return path.solve(grid[0])
    return _select_ridge(stitcher, path, m, grid, fit_bias, val, val_groups, select_by, result)
