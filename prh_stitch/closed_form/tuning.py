"""Choices made on held-out features: the ridge strength from a grid, then target whitening and deviation gain.

See the package docstring (Retrieval tuning of ridge) for why ranking, not MSE, drives the whitening and gain.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from prh_stitch.closed_form.normal_equations import _Moments
from prh_stitch.closed_form.options import ClosedFormResult
from prh_stitch.closed_form.solvers import _RidgePath
from prh_stitch.closed_form.stitcher_core import _intercept, _write
from prh_stitch.stitchers import Stitcher

# Retrieval tuning of a ridge fit (gain="auto" / whiten="auto"): gains from slightly below the MSE fit's own
# spread (1) to the deviations exaggerated 8x; whitening strengths strong (1e-2 of the mean target variance added
# to every eigenvalue) and mild (1.0: directions below the mean variance are boosted, not equalised); None = none.
# Each whitening costs one SELECT_ROWS² similarity matrix, each gain only a pass over it.
GAIN_GRID = (0.5, 1.0, 2.0, 4.0, 8.0)
WHITEN_GRID = (None, 1e-2, 1.0)
# Held-out rows the tuning scores on (evenly strided): "a few thousand" keeps each candidate's similarity matrix
# cheap (4096² scores) while recall@1 among 4096 candidates still separates the variants.
SELECT_ROWS = 4096


class _RetrievalTransform:
    """A ridge map's centred part under target whitening and a gain: ``W_v = g · κ · W · (C' + w·τ_y·I)⁻¹``.

    ``C'`` is the target covariance in the output norm's space, ``τ_y = tr(C')/Dy`` makes ``w`` relative, and
    ``κ`` restores the ridge prediction's spread (``tr(W_vᵀ A W_v) = tr(Wᵀ A W)`` at g = 1), so gains mean the
    same with or without whitening. One eigendecomposition of the Dy × Dy ``C'`` serves every ``w``.
    """

    def __init__(self, m: _Moments, weight: Tensor) -> None:
        self.m, self.weight = m, weight
        evals, self.evecs = torch.linalg.eigh(m.cov_yy)
        self.evals = evals.clamp_min(0)  # round-off can leave tiny negative eigenvalues of a PSD matrix
        self.tau_y = float(self.evals.mean()) or 1.0
        self.spread = float(torch.einsum("ij,ik,kj->", weight, m.xx, weight))

    def target_map(self, whiten: Optional[float]) -> Optional[Tensor]:
        """The Dy × Dy map ``κ (C' + wτ_y I)⁻¹`` applied after ``W`` (None: no whitening)."""
        if whiten is None:
            return None
        q = self.evecs
        t = (q / (self.evals + whiten * self.tau_y)) @ q.T
        whitened = self.weight @ t
        spread = float(torch.einsum("ij,ik,kj->", whitened, self.m.xx, whitened))
        return t * math.sqrt(self.spread / spread) if spread > 0 and self.spread > 0 else t

    def weight_for(self, whiten: Optional[float], gain: float) -> Tensor:
        if whiten is None and gain == 1.0:
            return self.weight  # the plain ridge, bit for bit
        t = self.target_map(whiten)
        return gain * (self.weight if t is None else self.weight @ t)


def _tune(stitcher: Stitcher, transform: _RetrievalTransform, fit_bias: bool, val: Tuple[Tensor, Tensor],
          groups: Optional[Tensor], whitens: Sequence[Optional[float]], gains: Sequence[float]
          ) -> Tuple[Tuple[Optional[float], float], Dict[str, float]]:
    """Held-out recall@1 (ties: lower MSE) of every (whiten, gain) on ``SELECT_ROWS`` strided rows of ``val``.

    The stitched output is ``μ + g·e_i`` (``μ`` the output for the mean source, ``e_i`` row i's deviation), so the
    cosine score of candidate j is ``(μ·ŷ_j + g·e_i·ŷ_j) / ‖μ + g·e_i‖``; the denominator is the same for every
    candidate of a query, so one similarity matrix ``E Ŷᵀ`` per whitening ranks all gains. A query's recall@1 is
    1 iff its first best-scoring candidate (argmax, lowest index on ties) is correct: the metric's tie rule.
    """
    with torch.no_grad():  # a context, not a decorator: mutmut skips decorated functions
        x, y = val
        rows = torch.linspace(0, len(x) - 1, min(len(x), SELECT_ROWS)).round().long()
        x, y = x[rows], y[rows]
        groups = None if groups is None else groups[rows]
        device = transform.weight.device
        f64 = {"dtype": torch.float64, "device": device}
        onorm = stitcher.output_norm
        # The input norm runs where its buffers are.
        xs = stitcher.input_norm(x.to(stitcher.input_norm.mean.device, torch.float32)).to(**f64)
        shift, scale = onorm.mean.to(**f64), onorm.scale.to(**f64)
        m = transform.m
        if fit_bias:  # core output = ȳ' + g·(x' − x̄')W_v; a core without bias has no separate mean part
            centred, mean_out = xs - m.mean_x, m.mean_y * scale + shift
        else:
            centred, mean_out = xs, shift
        base = centred @ transform.weight
        y64 = y.to(**f64)
        unit_y = torch.nn.functional.normalize(y64, dim=1).float()
        mean_score = unit_y @ mean_out.float()
        residual = mean_out - y64
        cells = len(y) * y.shape[1]
        cols = torch.arange(len(y), device=device)
        correct = (lambda top: top == cols) if groups is None else (lambda top: groups[top] == groups.to(device))
        scores, best_key, best = {}, None, None
        for whiten in whitens:
            t = transform.target_map(whiten)
            dev = (base if t is None else base @ t) * scale
            sim = dev.float() @ unit_y.T
            sq, cross, dd = float(residual.square().sum()), float((dev * residual).sum()), float(dev.square().sum())
            # No mean part (a core without bias, output norm without shift): a gain rescales whole outputs, which
            # cosine ignores, so one ranking serves every gain and only the MSE tells them apart.
            shared = None if bool(mean_score.any()) else float(correct(sim.argmax(1)).double().mean())
            for gain in gains:
                r1 = shared if shared is not None else float(correct((sim * gain + mean_score).argmax(1)).double().mean())
                mse = (sq + 2 * gain * cross + gain * gain * dd) / cells
                scores[f"whiten={whiten!r},gain={gain!r}"] = r1
                key = (-r1, mse)
                if best_key is None or key < best_key:
                    best_key, best = key, (whiten, gain)
        return best, scores


def _score(stitcher: Stitcher, val: Tuple[Tensor, Tensor], groups: Optional[Tensor]) -> Tuple[float, float]:
    with torch.no_grad():  # a context, not a decorator: mutmut skips decorated functions
        from prh_stitch.metrics.retrieval import ranks

        device = stitcher.core.weight.device
        x, y = (t.to(device, torch.float32) for t in val)
        was_training = stitcher.training
        pred = stitcher.eval()(x)
        stitcher.train(was_training)
        mse = float((pred.double() - y.double()).square().mean())
        # Source -> target only, as val/recall@1 is: the same ranks the retrieval metric computes, half the work.
        unit = lambda t: torch.nn.functional.normalize(t, dim=1)  # noqa: E731
        rank = ranks(unit(pred), unit(y), None if groups is None else groups.to(device))
        return float((rank <= 1).double().mean()), mse


def _select_ridge(stitcher: Stitcher, path: _RidgePath, m: _Moments, grid: Sequence[float], fit_bias: bool,
                  val: Optional[Tuple[Tensor, Tensor]], val_groups: Optional[Tensor], select_by: str,
                  result: ClosedFormResult) -> Tensor:
    """The plain ridge weight of the grid value scoring best on ``val`` (recorded in ``result``)."""
    if val is None:
        raise ValueError(f"choosing the ridge strength from a grid of {len(grid)} values needs held-out features "
                         "(val=(source, target)); or give one value with ridge=...")
    result.select_by = select_by
    best_key, best_weight = None, None
    for lam in grid:
        weight = path.solve(lam)
        _write(stitcher, weight, _intercept(m, weight, fit_bias))
        r1, mse = _score(stitcher, val, val_groups)
        result.scores[repr(lam)] = r1 if select_by == "recall@1" else mse
        key = (-r1, mse) if select_by == "recall@1" else (mse,)
        if best_key is None or key < best_key:
            best_key, best_weight, result.ridge = key, weight, lam
    return best_weight


def _retrieval_tuned(stitcher: Stitcher, m: _Moments, weight: Tensor, fit_bias: bool,
                     val: Optional[Tuple[Tensor, Tensor]], val_groups: Optional[Tensor], select_by: str,
                     gain: Union[str, float], whiten: Union[str, float, None], result: ClosedFormResult) -> Tensor:
    """The chosen ridge weight under the whitening and gain that ``gain``/``whiten`` ask for (recorded in ``result``)."""
    # Retrieval tuning of the chosen ridge: only with held-out features and a retrieval criterion to judge by.
    tune = val is not None and select_by == "recall@1"
    gains = GAIN_GRID if gain == "auto" and tune else ((1.0,) if gain == "auto" else (gain,))
    whitens = WHITEN_GRID if whiten == "auto" and tune else ((None,) if whiten == "auto" else (whiten,))
    transform = _RetrievalTransform(m, weight)
    if len(gains) * len(whitens) > 1:
        (result.whiten, result.gain), result.tuning_scores = _tune(
            stitcher, transform, fit_bias, val, val_groups, whitens, gains)
        result.select_by = select_by
    else:
        result.whiten, result.gain = whitens[0], gains[0]
    return transform.weight_for(result.whiten, result.gain)
