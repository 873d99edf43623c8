"""Closed-form stitchers: least squares, ridge and orthogonal Procrustes, from one streaming pass.

A closed-form fit writes the ``core.weight`` (and ``core.bias``) of an ordinary ``linear`` or ``affine``
:class:`~prh_stitch.stitchers.Stitcher`, so checkpoints, ``load_stitcher``, evaluation and TensorBoard do not
know or care how the weights were obtained.

Statistics
    :class:`NormalEquations` accumulates, in float64, the sufficient statistics of paired features
    (row count, ``Σx``, ``Σy``, ``XᵀX``, ``XᵀY``, ``Σy²`` per feature, ``YᵀY``) chunk by chunk, so the feature store is
    read once and memory is ``O(Dx² + Dx·Dy)`` whatever N is. All statistics are plain sums: streaming over
    shards, merging and a DDP ``all_reduce`` (:meth:`NormalEquations.all_reduce`) give the one-shot answer.
    Centring happens after accumulation (``XᵀX − n·x̄x̄ᵀ``), which in float64 is exact enough unless feature
    means exceed their spread by ~10⁶. ``precision="mixed"`` computes each chunk's products in float32 on rows
    centred on the chunk's mean (then corrects them exactly to raw sums in float64): about twice as fast on a
    CPU, with moments accurate to ~1e-6 relative, plenty for ridge; ``float64`` (the default) is exact.

Where the fit happens
    In the stitcher's *normalised* space: with ``x' = input_norm(x)`` and ``y' = (y − shift)/scale`` of the
    output norm, the core is fitted to predict ``y'`` from ``x'``; the statistics above are transformed
    exactly (affine maps of sums), so the normalisations must be fitted first (``Stitcher.fit_normalization``,
    identical on every rank). The intercept is fitted iff the core has a bias (``affine``); a ``linear`` core
    is fitted without one (uncentred moments), its centring then comes from the feature norms.

Methods (``METHODS``)
    ``lstsq``      ``W = argmin ‖X'W − Y'‖²``. Rank-deficient ``X'ᵀX'`` (fewer rows than features, duplicated or
                   dead features) has no unique solution: a warning is issued and the fit falls back to ridge
                   with ``λ = RANK_FALLBACK_RIDGE`` (relative, see below), the minimum-norm-like regularised
                   answer.
    ``ridge``      ``W = (X'ᵀX'/n + λ·τ·I)⁻¹ X'ᵀY'/n`` with ``τ = tr(X'ᵀX'/n)/Dx`` (the mean feature variance),
                   so ``λ`` is *relative*: the same grid means the same thing for any feature scale. With a
                   grid, every ``λ`` is solved (one Cholesky factorisation each) and the best on held-out features is
                   kept (``select_by``: ``recall@1`` of stitched source → target retrieval, the metric
                   stitchers are judged by, ties broken by lower MSE; or ``mse``). The grid must be non-empty,
                   finite and positive (λ = 0 is ``lstsq``). Then, by default, the retrieval tuning below.
    ``procrustes`` ``W = s · U Vᵀ`` from the SVD ``X'ᵀY' = U Σ Vᵀ`` (centred when the intercept is fitted or
                   ``center=True``). ``scaling``: ``none`` (a pure rotation), ``isotropic`` (one optimal global
                   scale ``s = tr Σ / tr(Qᵀ X'ᵀX' Q)``) or ``standard`` (both sides z-scored per feature before the
                   rotation; the map is then ``D_x⁻¹ Q D_y``). Unequal widths: zero-pad the narrower side to the
                   wider width, solve the square orthogonal problem, crop back to ``Dx × Dy``. The cropped block is
                   ``U Vᵀ`` of the thin SVD (the padded zero directions add nothing to ``X'ᵀY'``), a semi-orthogonal
                   map maximising ``tr(Wᵀ X'ᵀY')``. For ``Dx ≤ Dy`` (orthonormal rows, ``‖X'W‖ = ‖X'‖``) it is also
                   the least-squares optimum among such maps; for ``Dx > Dy`` it is the padded problem's optimum,
                   which also asks the dropped source directions to map to zero, so it is *not* the minimum-error
                   semi-orthogonal projection (that one has no closed form). Use ``ridge`` when error matters more
                   than orthogonality.

Retrieval tuning of ridge (``gain``, ``whiten``; default ``"auto"``)
    Ridge predicts the conditional mean: MSE-optimal, not ranking-optimal for cosine retrieval. When target
    features share a mean much larger than their spread, every target cosine is near 1 and a candidate's score
    ``p·ŷ_j`` is decided by small deviations: the plain prediction's deviations are shrunk towards the mean (too
    timid next to the shared-mean term, whose contribution varies with each candidate's norm and carries no
    pairing information) and weighted by target variance, so a few high-variance target directions outvote the
    low-variance ones that carry as much pairing information. Two closed-form corrections of the solved ``W``
    (the stitcher then outputs ``ȳ' + g·(x' − x̄')·W_v``, written into the ordinary core weight and bias):

    * **deviation gain** ``g``: ``W ← g·W``, intercept ``ȳ' − g·x̄'W`` (the mean source still maps to the mean
      target; only deviations scale). What contrastive training does implicitly. A core without bias has no
      separate mean part: there ``g`` scales the whole core output (cosine-invariant when the input norm centres).
    * **target whitening** ``w``: ``W ← κ·W·(C' + w·τ_y·I)⁻¹`` with ``C'`` the target covariance (in the output
      norm's space), ``τ_y`` its mean eigenvalue and ``κ`` restoring the prediction's spread. The score becomes
      ``x'ᵀ Σx⁻¹ Σxy Σy⁻¹ y``, the CCA score (each canonical pair weighted by its correlation, not its variance);
      ``w`` regularises the inverse. It needs the full ``YᵀY``, which the pass accumulates (Dy², cheap for Dy < Dx).

    With ``"auto"``, held-out features and ``select_by="recall@1"``, the pairs ``WHITEN_GRID × GAIN_GRID`` are
    scored at the chosen ridge strength by recall@1 (ties: lower MSE) on ``SELECT_ROWS`` evenly strided held-out
    rows, one similarity matrix per whitening (see ``tuning._tune``). Without held-out features or with
    ``select_by="mse"`` ``"auto"`` means the plain ridge (``g = 1``, no whitening), bit for bit; fixed numbers apply
    without selection.

Modules: ``normal_equations`` (the streaming statistics), ``options`` (option checks and the result record),
``stitcher_core`` (reading and writing the stitcher's linear core), ``solvers`` (ridge path and Procrustes),
``tuning`` (held-out choice of the ridge strength, whitening and gain) and ``fit`` (the entry point).
"""

from prh_stitch.closed_form.fit import fit_closed_form
from prh_stitch.closed_form.normal_equations import PRECISIONS, NormalEquations
from prh_stitch.closed_form.options import (DEFAULT_RIDGE_GRID, METHODS, SCALINGS, SELECT_BY, ClosedFormResult,
                                            check_gain, check_ridge_grid, check_whiten)
from prh_stitch.closed_form.solvers import RANK_FALLBACK_RIDGE
from prh_stitch.closed_form.tuning import GAIN_GRID, SELECT_ROWS, WHITEN_GRID

__all__ = [
    "METHODS", "PRECISIONS", "SELECT_BY", "SCALINGS", "DEFAULT_RIDGE_GRID", "RANK_FALLBACK_RIDGE",
    "NormalEquations", "ClosedFormResult", "fit_closed_form", "check_ridge_grid", "GAIN_GRID", "WHITEN_GRID",
    "SELECT_ROWS", "check_gain", "check_whiten",
]
