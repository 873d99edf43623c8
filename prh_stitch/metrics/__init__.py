"""Alignment and retrieval metrics for the Platonic Representation Hypothesis, exact and blocked.

Functional metrics take two paired feature tensors ``a`` (N × Da) and ``b`` (N × Db) on any device (float32,
float16 or bfloat16; work is done in float32) and return a Python float. All take ``normalize=True``: rows are
L2-normalised first, as the paper does before every metric. Bad input raises ``ValueError`` naming the problem.

- kNN family (``mutual_knn``, ``cycle_knn``, ``lcs_knn``, ``edit_distance_knn``): blocked neighbour search, no
  N × N matrix; self excluded; ties broken by lower index.
- Kernel family (``cka``, ``unbiased_cka``, ``cknna``) and ``svcca`` (deterministic).
- ``retrieval``: recall@k both ways, ranks, mean cosine; ``groups`` counts same-caption items as correct.
- ``layer_alignment``: every layer pair, best/last pair; ``calibrate``: chance, permutation null, half-sample interval.
- ``METRICS``: registry name → functional metric (each registered where it is defined, with its spec);
  torchmetrics wrappers (``MutualKNN`` … ``Retrieval``).
- ``clamp_outliers``: the paper's outlier clamp (each element to ±the q quantile of |x|), applied per layer before
  scoring when asked for (``outlier_quantile``; off by default).
"""

from ._spec import METRICS
from .calibration import calibrate
from .cca import svcca
from .kernels import cka, cknna, unbiased_cka
from .knn import cycle_knn, edit_distance_knn, lcs_knn, mutual_knn
from .layers import layer_alignment
from .outliers import clamp_outliers, outlier_threshold
from .retrieval import retrieval

from prh_stitch.lazy import lazy_exports

# The torchmetrics wrappers load on first use: importing torchmetrics pulls torchvision and transformers, and
# scoring cached features never needs it.
__getattr__ = lazy_exports(__name__, {name: "wrappers" for name in (
    "CKA", "CKNNA", "LCSKNN", "SVCCA", "CycleKNN", "EditDistanceKNN", "MutualKNN", "Retrieval", "UnbiasedCKA")})

__all__ = [
    "METRICS", "calibrate", "cka", "clamp_outliers", "cknna", "cycle_knn", "edit_distance_knn", "layer_alignment",
    "lcs_knn", "mutual_knn", "outlier_threshold", "retrieval", "svcca", "unbiased_cka",
    "CKA", "CKNNA", "CycleKNN", "EditDistanceKNN", "LCSKNN", "MutualKNN", "Retrieval", "SVCCA", "UnbiasedCKA",
]
