"""Bad input raises ValueError naming the problem, for every metric, the wrappers, layers and calibration."""

import pytest
import torch

from prh_stitch.metrics import METRICS, MutualKNN, Retrieval, calibrate, layer_alignment, retrieval

ALL = METRICS.names()
WITH_K = ["mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cknna"]


def pair(n=20, da=12, db=12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, da, generator=g), torch.randn(n, db, generator=g)


def call(name, a, b, **kw):
    return retrieval(a, b, **kw) if name == "retrieval" else METRICS.get(name)(a, b, **kw)


@pytest.mark.parametrize("name", ALL + ["retrieval"])
def test_common_bad_inputs(name):
    a, b = pair()
    with pytest.raises(ValueError, match="same number of rows"):
        call(name, a, b[:-1])
    with pytest.raises(ValueError, match="2-D"):
        call(name, a[:, 0], b[:, 0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = a.clone()
        x[3, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            call(name, x, b)
    z = b.clone()
    z[5] = 0
    with pytest.raises(ValueError, match=r"b has 1 zero row.*\[5\]"):
        call(name, a, z)
    with pytest.raises(ValueError, match=r"^a has 1 zero row.*\[5\]"):  # each side is named as itself
        call(name, torch.where(torch.arange(20)[:, None] == 5, 0.0, a), b)
    if name != "retrieval":
        with pytest.raises(ValueError, match=r"^a has 1 zero row.*\[5\]"):
            calibrate(name, torch.where(torch.arange(20)[:, None] == 5, 0.0, a), b, permutations=1)
        with pytest.raises(ValueError, match=r"^b has 1 zero row.*\[5\]"):
            calibrate(name, a, z, permutations=1)
    with pytest.raises(ValueError, match="floating-point"):
        call(name, a.long(), b)
    with pytest.raises(ValueError, match="torch.Tensor"):
        call(name, a.numpy(), b)


@pytest.mark.parametrize("name", WITH_K)
def test_bad_k(name):
    a, b = pair(n=10)
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be >= 1"):
            call(name, a, b, k=k)
    for k in (10, 11):
        with pytest.raises(ValueError, match="N must exceed k"):
            call(name, a, b, k=k)
    with pytest.raises(ValueError, match="k must be an integer"):
        call(name, a, b, k=2.5)
    with pytest.raises(ValueError, match="k must be given"):
        call(name, a, b, k=None)
    with pytest.raises(ValueError, match="block_size"):
        call(name, a, b, k=3, block_size=0)


@pytest.mark.parametrize("name", ["unbiased_cka", "cknna"])
def test_unbiased_hsic_needs_four_samples(name):
    a, b = pair(n=3)
    with pytest.raises(ValueError, match="N >= 4"):
        call(name, a, b, **({"k": 1} if name == "cknna" else {}))


def test_kernel_and_cca_options():
    a, b = pair()
    with pytest.raises(ValueError, match="unknown kernel"):
        METRICS.get("cka")(a, b, kernel="poly")
    with pytest.raises(ValueError, match="sigma must be positive"):
        METRICS.get("cka")(a, b, kernel="rbf", sigma=0.0)
    with pytest.raises(ValueError, match="method='features' needs kernel='linear'"):
        METRICS.get("unbiased_cka")(a, b, kernel="rbf", method="features")
    with pytest.raises(ValueError, match="RBF bandwidth of a is zero"):
        METRICS.get("cka")(torch.ones(20, 6), b, kernel="rbf")
    with pytest.raises(ValueError, match="not positive"):  # constant rows: no variance, no silent NaN
        METRICS.get("cka")(torch.ones(20, 6), b)
    with pytest.raises(ValueError, match="exceeds the width of b"):
        METRICS.get("svcca")(a, b[:, :3], dim=4)
    with pytest.raises(ValueError, match="fewer than dim=4 independent directions"):
        METRICS.get("svcca")(a, b[:, :1].repeat(1, 6), dim=4)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        METRICS.get("svcca")(a, b, dim=0)


def test_retrieval_bad_groups_and_ks():
    a, b = pair()
    with pytest.raises(ValueError, match="groups must be a 1-D tensor"):
        retrieval(a, b, groups=torch.zeros(19, dtype=torch.long))
    with pytest.raises(ValueError, match="groups must be an integer tensor"):
        retrieval(a, b, groups=torch.zeros(20))
    for bad, shown in ((list(range(20)), "got list"), (torch.zeros(20, 2, dtype=torch.long), r"got \(20, 2\)")):
        with pytest.raises(ValueError, match=rf"groups must be a 1-D tensor with one id per row \(N=20\), {shown}$"):
            retrieval(a, b, groups=bad)
    for dtype in (torch.float64, torch.bool, torch.complex64):
        with pytest.raises(ValueError, match=f"groups must be an integer tensor, got dtype {dtype}$"):
            retrieval(a, b, groups=torch.zeros(20, dtype=dtype))
    for ks in ((0, 5), (True,), (2.0,), ()):
        with pytest.raises(ValueError, match="ks must be positive integers"):
            retrieval(a, b, ks=ks)
    with pytest.raises(ValueError, match="block_size must be a positive integer or None"):
        retrieval(a, b, block_size=0)
    with pytest.raises(ValueError, match="widths must match"):
        retrieval(a, b[:, :4])


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_layers_calibration_and_wrappers_validate():
    a, b = pair()
    with pytest.raises(ValueError, match="unknown metric 'mutual'"):
        calibrate("mutual", a, b)
    with pytest.raises(ValueError, match="unknown option"):
        calibrate("mutual_knn", a, b, kk=3)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=f"permutations must be a non-negative integer, got {bad!r}$"):
            calibrate("cka", a, b, permutations=bad)
        with pytest.raises(ValueError, match=f"bootstrap must be a non-negative integer, got {bad!r}$"):
            calibrate("cka", a, b, bootstrap=bad)
    for bad in (0, 1, 1.5, -0.5):
        with pytest.raises(ValueError, match=rf"ci must lie in \(0, 1\), got {bad!r}$"):
            calibrate("cka", a, b, ci=bad)
    with pytest.raises(ValueError, match="k must be >= 1"):  # the metric's own checks run before any work
        calibrate("mutual_knn", a, b, k=0)
    with pytest.raises(ValueError, match="at least one layer"):
        layer_alignment([], [b], "cka")
    with pytest.raises(ValueError, match="same number of rows"):
        layer_alignment([a, a[:-1]], [b], "cka")
    m = MutualKNN(k=3)
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    with pytest.raises(ValueError, match="NaN or Inf"):
        m.update(a, torch.full_like(b, float("nan")))
    m.update(a, b, index=torch.arange(20))
    with pytest.raises(ValueError, match="index with every update or with none"):
        m.update(a, b)
    with pytest.raises(ValueError, match="index must be a 1-D tensor"):
        m.update(a, b, index=torch.arange(19))
    r = Retrieval()
    r.update(a, b, groups=torch.arange(20))
    with pytest.raises(ValueError, match="groups with every update or with none"):
        r.update(a, b)
