"""Kernel alignment metrics: CKA (linear or RBF), unbiased CKA, and CKNNA — all without N³ work.

Notation: K = kernel of A, L = kernel of B (linear: K = A Aᵀ), n = N samples, K̃ = K with a zeroed diagonal.

- Biased HSIC (Kornblith et al. 2019): tr(KHLH) = tr(KL) − (2/n)(K1)·(L1) + (1ᵀK1)(1ᵀL1)/n², so CKA needs
  only tr(KL), tr(KK), tr(LL) and row sums. For the linear kernel with column-centred features this is
  ‖AᵀB‖²_F / (‖AᵀA‖_F ‖BᵀB‖_F): O(N·D²), no N × N matrix (``method="features"``).
- Unbiased HSIC (Song et al. 2012):
  HSIC_u = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2)·(K̃ᵀ1)·(L̃1)] / (n(n−3)), defined for n ≥ 4.
  With the linear kernel it is invariant to shifting the features, so after column centring K1 = 0 and every
  term follows from ‖AᵀB‖²_F and the squared row norms: O(N·D²) again. Otherwise (RBF, or D > N) the terms are
  accumulated over row blocks of the kernels: O(N²·D) time, O(block·N) memory (``method="samples"``).
- CKNNA (Huh et al. 2024): HSIC_u of the kernels masked to the k-nearest-neighbour pairs; after the neighbour
  search each masked kernel has at most k entries per row, so the HSIC terms cost O(N·k). The masks are not
  symmetric (row i keeps i's neighbours), so tr(K̃L̃) = Σ_ij K̃_ij L̃_ji and (K̃ᵀ1)·(L̃1) are evaluated exactly as
  written, transposes included.

Intentional differences from the paper's code (platonic-rep ``metrics.py``):
- No ``+ 1e-6`` in the CKA/CKNNA denominators; a non-positive denominator raises ``ValueError`` instead.
- CKNNA requires k (the paper's code crashes on its own default ``topk=None``); ties in the neighbour search
  are broken by lower index. Like the paper's, its value is not clipped: with different masks in numerator and
  denominators it can exceed 1 (CKA and unbiased CKA cannot, up to rounding, which is clipped).
- The RBF bandwidth defaults to ``bandwidth ×`` the median pairwise distance (pass ``sigma`` for a fixed
  bandwidth, which is what the paper's ``rbf_sigma`` is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ._checks import check_block_size, check_k, to_float32
from ._spec import attach, run
from .knn import KnnSide, _permute as _permute_knn, _prepare as _prepare_knn
from .neighbors import auto_block_size

_KERNELS = ("linear", "rbf")
_METHODS = ("auto", "features", "samples")
_MEDIAN_BINS = 8192


# ----------------------------------------------------------------------------------------------- helpers


def _frob2_gram(x: Tensor) -> float:
    """‖xᵀx‖²_F. (Computing only the upper block triangle saves flops but, with thinner matmuls, no time on CPU.)"""
    return float(torch.linalg.vector_norm(x.T @ x)) ** 2


def hsic_u_terms(n: int, tr_kl: float, sum_k: float, sum_l: float, cross: float) -> float:
    """Unbiased HSIC from its four terms: tr(K̃L̃), 1ᵀK̃1, 1ᵀL̃1 and (K̃ᵀ1)·(L̃1)."""
    return (tr_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def hsic_b_terms(n: int, tr_kl: float, sum_k: float, sum_l: float, cross: float) -> float:
    """Biased HSIC tr(KHLH)/(n−1)² from tr(KL), 1ᵀK1, 1ᵀL1 and (K1)·(L1) (K, L symmetric)."""
    return (tr_kl - 2.0 / n * cross + sum_k * sum_l / n**2) / (n - 1) ** 2


def _ratio(num: float, den_a: float, den_b: float, what: str, bounded: bool = True) -> float:
    """num / sqrt(den_a · den_b); ``bounded``: the three terms are one inner product, so |ratio| ≤ 1 holds
    (Cauchy–Schwarz) and only float rounding past ±1 is clipped."""
    den = den_a * den_b
    if not den > 0 or not math.isfinite(den):
        raise ValueError(f"{what} is undefined here: a self-similarity term is not positive "
                         f"({den_a:.3g}, {den_b:.3g}); the features have (almost) no variance at this N/k")
    ratio = num / math.sqrt(den)
    return max(-1.0, min(1.0, ratio)) if bounded else ratio


def _upper_distances(x: Tensor, sq: Tensor, i0: int, i1: int) -> Tensor:
    """Distances from rows i0:i1 to the rows after each of them (the upper triangle), flattened."""
    d2 = (sq[i0:i1, None] + sq[None, i0:] - 2.0 * (x[i0:i1] @ x[i0:].T)).clamp_min_(0)
    keep = torch.ones_like(d2, dtype=torch.bool).triu_(1)
    return d2[keep].sqrt_()


def median_pairwise_distance(x: Tensor, block_size: Optional[int] = None) -> float:
    """Exact median of ‖x_i − x_j‖ over pairs i < j (mean of the two middle values for an even count).

    Two blocked passes and no N × N matrix: a histogram locates the bins holding the middle order statistics,
    then only the distances inside those bins are kept and sorted.
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError("the median pairwise distance needs N >= 2")
    bs = block_size or auto_block_size(n)
    sq = x.square().sum(1)
    top = 2.0 * float(sq.max().sqrt()) * (1 + 1e-5) + 1e-12
    inner = torch.linspace(0.0, top, _MEDIAN_BINS + 1, device=x.device)[1:-1]
    counts = torch.zeros(_MEDIAN_BINS, dtype=torch.int64, device=x.device)
    for i0 in range(0, n, bs):
        d = _upper_distances(x, sq, i0, min(n, i0 + bs))
        counts += torch.bincount(torch.bucketize(d, inner), minlength=_MEDIAN_BINS)
    m = n * (n - 1) // 2
    ranks = ((m - 1) // 2, m // 2)
    cum = counts.cumsum(0)
    bins = [int(torch.searchsorted(cum, r, right=True)) for r in ranks]
    before = int(cum[bins[0] - 1]) if bins[0] > 0 else 0
    kept = []
    for i0 in range(0, n, bs):
        d = _upper_distances(x, sq, i0, min(n, i0 + bs))
        b = torch.bucketize(d, inner)
        kept.append(d[(b >= bins[0]) & (b <= bins[1])])
    vals = torch.cat(kept).sort().values
    return 0.5 * (float(vals[ranks[0] - before]) + float(vals[ranks[1] - before]))


# ----------------------------------------------------------------------------------------------- CKA sides


@dataclass
class KernelSide:
    x: Tensor  # float32 features (column-centred for the linear kernel)
    sigma: Optional[float]  # RBF bandwidth, None for linear
    gram2: Optional[float]  # ‖xᵀx‖²_F for the feature-space path, None if not computed
    diag: Optional[Tensor]  # float64 squared row norms (linear kernel diagonal)


def _use_features(opts: Dict[str, Any], x: Tensor) -> bool:
    if opts["kernel"] != "linear":
        return False
    return opts["method"] == "features" or (opts["method"] == "auto" and x.shape[1] <= x.shape[0])


def _prepare_kernel(x: Tensor, name: str, opts: Dict[str, Any], origin: Optional[Tensor] = None) -> KernelSide:
    x = to_float32(x, opts["normalize"], name)
    if opts["kernel"] == "rbf":
        sigma = opts["sigma"]
        if sigma is None:
            sigma = opts["bandwidth"] * median_pairwise_distance(x, opts["block_size"])
            if not sigma > 0:
                raise ValueError(f"RBF bandwidth of {name} is zero: all rows of {name} are identical")
        return KernelSide(x, float(sigma), None, None)
    x = x - x.mean(0, keepdim=True)  # linear HSIC (biased and unbiased) is shift invariant
    gram2 = _frob2_gram(x) if _use_features(opts, x) else None
    return KernelSide(x, None, gram2, x.square().sum(1).double())


def _kernel_rows(side: KernelSide, i0: int, i1: int, sq: Optional[Tensor]) -> Tensor:
    g = side.x[i0:i1] @ side.x.T
    if side.sigma is None:
        return g
    d2 = (sq[i0:i1, None] + sq[None, :] - 2.0 * g).clamp_min_(0)
    k = torch.exp(d2 / (-2.0 * side.sigma**2))
    k[:, i0:i1].fill_diagonal_(1.0)
    return k


def _sample_terms(sa: KernelSide, sb: KernelSide, block_size: Optional[int]) -> Dict[str, Any]:
    """One blocked pass over the kernel rows of both sides: tr(KL), tr(KK), tr(LL), row sums, diagonals."""
    n = sa.x.shape[0]
    bs = block_size or auto_block_size(n)
    sqa = sa.x.square().sum(1) if sa.sigma is not None else None
    sqb = sb.x.square().sum(1) if sb.sigma is not None else None
    t = dict(kl=0.0, kk=0.0, ll=0.0)
    rk = torch.zeros(n, dtype=torch.float64, device=sa.x.device)
    rl = torch.zeros_like(rk)
    dk = torch.empty_like(rk)
    dl = torch.empty_like(rk)
    for i0 in range(0, n, bs):
        i1 = min(n, i0 + bs)
        kb = _kernel_rows(sa, i0, i1, sqa)
        lb = _kernel_rows(sb, i0, i1, sqb)
        t["kl"] += float((kb * lb).sum(dtype=torch.float64))
        t["kk"] += float(kb.square().sum(dtype=torch.float64))
        t["ll"] += float(lb.square().sum(dtype=torch.float64))
        rk[i0:i1] = kb.sum(1, dtype=torch.float64)
        rl[i0:i1] = lb.sum(1, dtype=torch.float64)
        dk[i0:i1] = kb[:, i0:i1].diagonal().double()
        dl[i0:i1] = lb[:, i0:i1].diagonal().double()
    return dict(n=n, rk=rk, rl=rl, dk=dk, dl=dl, **t)


def _three_hsic(sa: KernelSide, sb: KernelSide, opts: Dict[str, Any], unbiased: bool) -> Tuple[float, float, float]:
    """(HSIC(K, L), HSIC(K, K), HSIC(L, L)), biased or unbiased, by the cheaper exact route."""
    n = sa.x.shape[0]
    if sa.gram2 is not None and sb.gram2 is not None:
        cross = float(torch.linalg.vector_norm(sa.x.T @ sb.x)) ** 2
        if not unbiased:  # centred features: row sums of K and L vanish
            return cross, sa.gram2, sb.gram2
        out = []
        for tr, d1, d2 in ((cross, sa.diag, sb.diag), (sa.gram2, sa.diag, sa.diag), (sb.gram2, sb.diag, sb.diag)):
            dd = float((d1 * d2).sum())
            out.append(hsic_u_terms(n, tr - dd, -float(d1.sum()), -float(d2.sum()), dd))
        return tuple(out)  # type: ignore[return-value]
    t = _sample_terms(sa, sb, opts["block_size"])
    rk, rl, dk, dl = t["rk"], t["rl"], t["dk"], t["dl"]
    if not unbiased:
        f = hsic_b_terms
        return (f(n, t["kl"], float(rk.sum()), float(rl.sum()), float(rk @ rl)),
                f(n, t["kk"], float(rk.sum()), float(rk.sum()), float(rk @ rk)),
                f(n, t["ll"], float(rl.sum()), float(rl.sum()), float(rl @ rl)))
    rk, rl = rk - dk, rl - dl  # row sums of K̃, L̃ (symmetric kernels: also the column sums)
    f = hsic_u_terms
    return (f(n, t["kl"] - float(dk @ dl), float(rk.sum()), float(rl.sum()), float(rk @ rl)),
            f(n, t["kk"] - float(dk @ dk), float(rk.sum()), float(rk.sum()), float(rk @ rk)),
            f(n, t["ll"] - float(dl @ dl), float(rl.sum()), float(rl.sum()), float(rl @ rl)))


def _check_kernel_opts(n: int, opts: Dict[str, Any], need: int) -> None:
    if opts["kernel"] not in _KERNELS:
        raise ValueError(f"unknown kernel {opts['kernel']!r}; choose one of {_KERNELS}")
    if opts["method"] not in _METHODS:
        raise ValueError(f"unknown method {opts['method']!r}; choose one of {_METHODS}")
    if opts["method"] == "features" and opts["kernel"] != "linear":
        raise ValueError("method='features' needs kernel='linear' (the RBF kernel has no feature-space form)")
    if opts["sigma"] is not None and not opts["sigma"] > 0:
        raise ValueError(f"sigma must be positive, got {opts['sigma']!r}")
    if not opts["bandwidth"] > 0:
        raise ValueError(f"bandwidth must be positive, got {opts['bandwidth']!r}")
    check_block_size(opts["block_size"])
    if n < need:
        raise ValueError(f"{'unbiased HSIC' if need == 4 else 'CKA'} needs N >= {need} samples, got N={n}")


def _permute_kernel(side: KernelSide, perm: Tensor, opts: Dict[str, Any]) -> KernelSide:
    return KernelSide(side.x[perm], side.sigma, side.gram2, None if side.diag is None else side.diag[perm])


def cka(a: Tensor, b: Tensor, kernel: str = "linear", sigma: Optional[float] = None, bandwidth: float = 1.0,
        normalize: bool = True, method: str = "auto", block_size: Optional[int] = None) -> float:
    """Centred kernel alignment HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) with the biased HSIC.

    Args:
        kernel: ``"linear"`` (K = A Aᵀ) or ``"rbf"`` (K_ij = exp(−‖a_i − a_j‖² / (2σ²))).
        sigma: fixed RBF bandwidth; default ``bandwidth ×`` the median pairwise distance of each side.
        method: linear kernel only — ``"features"`` (O(N·D²)), ``"samples"`` (blocked kernel rows, O(N²·D)) or
            ``"auto"`` (features when D ≤ N). Both are exact.
    """
    return run(cka.spec, a, b, dict(kernel=kernel, sigma=sigma, bandwidth=bandwidth, normalize=normalize,
                                    method=method, block_size=block_size))


def unbiased_cka(a: Tensor, b: Tensor, kernel: str = "linear", sigma: Optional[float] = None,
                 bandwidth: float = 1.0, normalize: bool = True, method: str = "auto",
                 block_size: Optional[int] = None) -> float:
    """CKA with the unbiased HSIC estimator (Song et al. 2012) in all three places; needs N ≥ 4.

    Its chance level is 0 and it can be slightly negative. Options as in :func:`cka`.
    """
    return run(unbiased_cka.spec, a, b, dict(kernel=kernel, sigma=sigma, bandwidth=bandwidth, normalize=normalize,
                                             method=method, block_size=block_size))


attach(cka, prepare=_prepare_kernel, permute=_permute_kernel, check=lambda n, o: _check_kernel_opts(n, o, 2),
       pair=lambda sa, sb, o: _ratio(*_three_hsic(sa, sb, o, unbiased=False), "CKA"))
attach(unbiased_cka, prepare=_prepare_kernel, permute=_permute_kernel,
       check=lambda n, o: _check_kernel_opts(n, o, 4), chance=lambda n, o: 0.0,
       pair=lambda sa, sb, o: _ratio(*_three_hsic(sa, sb, o, unbiased=True), "unbiased CKA"))


# ----------------------------------------------------------------------------------------------- CKNNA


def hsic_u_coo(n: int, rows: Tensor, cols: Tensor, kv: Tensor, lv: Tensor) -> float:
    """Unbiased HSIC of two sparse n × n matrices K̃, L̃ with the same support (rows, cols), diagonal empty.

    Non-symmetric support is handled literally: tr(K̃L̃) = Σ K̃_ij L̃_ji pairs entry (i, j) of K̃ with entry
    (j, i) of L̃ when that entry exists, and (K̃ᵀ1)·(L̃1) uses the column sums of K̃ and the row sums of L̃.
    """
    kv, lv = kv.double(), lv.double()
    key = rows * n + cols
    order = key.argsort()
    skey = key[order]
    tkey = cols * n + rows
    pos = torch.searchsorted(skey, tkey).clamp_max_(max(len(skey) - 1, 0))
    hit = skey[pos] == tkey if len(skey) else torch.zeros_like(tkey, dtype=torch.bool)
    tr = float((kv[hit] * lv[order[pos[hit]]]).sum())
    colsum_k = torch.zeros(n, dtype=torch.float64, device=kv.device).index_add_(0, cols, kv)
    rowsum_l = torch.zeros(n, dtype=torch.float64, device=kv.device).index_add_(0, rows, lv)
    return hsic_u_terms(n, tr, float(kv.sum()), float(lv.sum()), float(colsum_k @ rowsum_l))


def _cknna_pair(sa: KnnSide, sb: KnnSide, opts: Dict[str, Any]) -> float:
    n, k = sa.indices.shape
    eq = sa.indices[:, :, None] == sb.indices[:, None, :]  # (N, k, k)
    both = eq.any(-1)  # α_ij over A's list of row i
    rows_all = torch.arange(n, device=eq.device)[:, None].expand(n, k)
    r, c = rows_all[both], sa.indices[both]
    kv = sa.values[both]
    lv = (eq.float() * sb.values[:, None, :]).sum(-1)[both]  # L value of the same pair (i, j)
    kl = hsic_u_coo(n, r, c, kv, lv)
    ra, ca, va = rows_all.flatten(), sa.indices.flatten(), sa.values.flatten()
    rb, cb, vb = rows_all.flatten(), sb.indices.flatten(), sb.values.flatten()
    kk = hsic_u_coo(n, ra, ca, va, va)
    ll = hsic_u_coo(n, rb, cb, vb, vb)
    # Not bounded by 1: the numerator's mask (mutual neighbours) differs from each denominator's (one side's
    # neighbours), so Cauchy–Schwarz does not apply and small N can give slightly more than 1; not clipped.
    return _ratio(kl, kk, ll, "CKNNA", bounded=False)


def _check_cknna(n: int, opts: Dict[str, Any]) -> None:
    check_k(opts["k"], n)
    check_block_size(opts["block_size"])
    if n < 4:
        raise ValueError(f"unbiased HSIC needs N >= 4 samples, got N={n}")


def cknna(a: Tensor, b: Tensor, k: int = 10, normalize: bool = True, block_size: Optional[int] = None) -> float:
    """CKNNA (Huh et al. 2024): unbiased CKA restricted to mutual k-nearest-neighbour pairs.

    score = HSIC_u(α∘K, α∘L) / sqrt(HSIC_u(α_K∘K, α_K∘K) · HSIC_u(α_L∘L, α_L∘L)), where α_K (α_L) marks j ≠ i
    among the k nearest neighbours of i under K (L), α = α_K ∘ α_L, and K, L are the linear kernels (cosine
    similarities when normalised). k is required (``None`` raises). O(N·k) after the neighbour search.
    """
    return run(cknna.spec, a, b, dict(k=k, normalize=normalize, block_size=block_size))


attach(cknna, prepare=_prepare_knn, permute=_permute_knn, check=_check_cknna, pair=_cknna_pair)
