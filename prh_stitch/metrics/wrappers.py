"""torchmetrics wrappers: ``update(a, b)`` per batch, ``compute()`` over everything seen, DDP-safe.

States are lists of feature rows declared with ``dist_reduce_fx="cat"``, so under DDP ``compute()`` sees the rows
of every rank. Pass ``index`` (global sample indices, e.g. from the dataset) to make the result exactly the
one-process score: ``compute()`` then keeps one row per index (DistributedSampler pads the last batches with
repeated samples) and orders rows by index. Without ``index`` rows are used in the order gathered, which only
matters for exact ties (neighbour tie rule: lower index first).

These metrics need all rows at once (neighbourhoods are global), so memory grows with the dataset: N × D per side.

The alignment wrappers take ``outlier_quantile`` (default None: off): in ``compute()`` each side's rows, all of them
(after the DDP gather and de-duplication), are clamped by :func:`prh_stitch.metrics.clamp_outliers` before scoring,
so the threshold is the whole set's, never one batch's, and the result equals the function on pre-clamped features.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ._checks import check_pair
from .cca import svcca
from .kernels import cka, cknna, unbiased_cka
from .knn import cycle_knn, edit_distance_knn, lcs_knn, mutual_knn
from .outliers import check_quantile, clamp_outliers
from .retrieval import _check_groups, retrieval


class _PairedFeatures(Metric):
    """Collects paired rows (and optional indices / group ids); subclasses score them in ``compute``."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("a", default=[], dist_reduce_fx="cat")
        self.add_state("b", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, a: Tensor, b: Tensor, index: Optional[Tensor] = None, groups: Optional[Tensor] = None) -> None:
        n = check_pair(a, b)
        if index is not None:
            if not isinstance(index, Tensor) or index.ndim != 1 or len(index) != n:
                raise ValueError(f"index must be a 1-D tensor with one global sample index per row (N={n})")
            if index.is_floating_point() or index.dtype == torch.bool:
                raise ValueError(f"index must be an integer tensor, got dtype {index.dtype}")
        if (index is None) != (len(self.a) > 0 and len(self.index) == 0) and len(self.a) > 0:
            raise ValueError("pass index with every update or with none")
        self._check_groups(groups, n)
        self.a.append(a.detach())
        self.b.append(b.detach())
        if index is not None:
            self.index.append(index.detach().to(torch.int64))
        if groups is not None:
            self.groups.append(groups.detach().to(torch.int64))

    def _check_groups(self, groups: Optional[Tensor], n: int) -> None:
        if groups is not None:
            _check_groups(groups, n)  # accepted and ignored by the alignment metrics

    def rows(self) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """All rows seen (across ranks after sync), de-duplicated and ordered by ``index`` when given."""
        if not _nonempty(self.a):
            raise ValueError(f"{type(self).__name__}.compute() called before any update()")
        a, b = dim_zero_cat(self.a), dim_zero_cat(self.b)
        groups = dim_zero_cat(self.groups) if _nonempty(self.groups) else None
        if _nonempty(self.index):
            index = dim_zero_cat(self.index)
            if len(index) != len(a):
                raise ValueError("index was passed with some updates but not others")
            sorted_idx, order = index.sort(stable=True)
            first = torch.ones_like(sorted_idx, dtype=torch.bool)
            first[1:] = sorted_idx[1:] != sorted_idx[:-1]
            keep = order[first]
            a, b = a[keep], b[keep]
            groups = groups[keep] if groups is not None else None
        return a, b, groups


def _nonempty(state: Any) -> bool:
    return (isinstance(state, Tensor) and state.numel() > 0) or (isinstance(state, list) and len(state) > 0)


class _Alignment(_PairedFeatures):
    _fn: Callable[..., float]

    def __init__(self, metric_kwargs: Dict[str, Any], outlier_quantile: Optional[float] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metric_kwargs = metric_kwargs
        self.outlier_quantile = check_quantile(outlier_quantile, "outlier_quantile")

    def compute(self) -> Tensor:
        a, b, _ = self.rows()
        a, b = clamp_outliers(a, self.outlier_quantile, "a"), clamp_outliers(b, self.outlier_quantile, "b")
        return torch.tensor(type(self)._fn(a, b, **self.metric_kwargs), dtype=torch.float32)


def _knn_wrapper(fn: Callable[..., float], doc: str) -> type:
    def __init__(self, k: int = 10, normalize: bool = True, block_size: Optional[int] = None,
                 outlier_quantile: Optional[float] = None, **kwargs: Any) -> None:
        _Alignment.__init__(self, dict(k=k, normalize=normalize, block_size=block_size), outlier_quantile, **kwargs)

    return type(doc.split(":")[0], (_Alignment,), {"_fn": staticmethod(fn), "__init__": __init__, "__doc__": doc})


MutualKNN = _knn_wrapper(mutual_knn, "MutualKNN: :func:`prh_stitch.metrics.mutual_knn` over all updates.")
CycleKNN = _knn_wrapper(cycle_knn, "CycleKNN: :func:`prh_stitch.metrics.cycle_knn` over all updates.")
LCSKNN = _knn_wrapper(lcs_knn, "LCSKNN: :func:`prh_stitch.metrics.lcs_knn` over all updates.")
EditDistanceKNN = _knn_wrapper(edit_distance_knn,
                               "EditDistanceKNN: :func:`prh_stitch.metrics.edit_distance_knn` over all updates.")
CKNNA = _knn_wrapper(cknna, "CKNNA: :func:`prh_stitch.metrics.cknna` over all updates.")


class CKA(_Alignment):
    """:func:`prh_stitch.metrics.cka` over all updates."""

    _fn = staticmethod(cka)

    def __init__(self, kernel: str = "linear", sigma: Optional[float] = None, bandwidth: float = 1.0,
                 normalize: bool = True, outlier_quantile: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(dict(kernel=kernel, sigma=sigma, bandwidth=bandwidth, normalize=normalize), outlier_quantile,
                         **kwargs)


class UnbiasedCKA(CKA):
    """:func:`prh_stitch.metrics.unbiased_cka` over all updates."""

    _fn = staticmethod(unbiased_cka)


class SVCCA(_Alignment):
    """:func:`prh_stitch.metrics.svcca` over all updates."""

    _fn = staticmethod(svcca)

    def __init__(self, dim: int = 10, normalize: bool = True, outlier_quantile: Optional[float] = None,
                 **kwargs: Any) -> None:
        super().__init__(dict(dim=dim, normalize=normalize), outlier_quantile, **kwargs)


class Retrieval(_PairedFeatures):
    """:func:`prh_stitch.metrics.retrieval` over all updates; ``compute()`` returns a dict of float tensors."""

    def __init__(self, ks: Sequence[int] = (1, 5, 10), normalize: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        self.normalize = normalize

    def _check_groups(self, groups: Optional[Tensor], n: int) -> None:
        _check_groups(groups, n)
        if (groups is None) != (len(self.groups) == 0) and len(self.a) > 0:
            raise ValueError("pass groups with every update or with none")

    def compute(self) -> Dict[str, Tensor]:
        a, b, groups = self.rows()
        out = retrieval(a, b, groups=groups, normalize=self.normalize, ks=self.ks)
        return {key: torch.tensor(value, dtype=torch.float32) for key, value in out.items()}
