"""Benchmark: do the 95 % intervals of prh_stitch.metrics cover what they claim to? Coverage by simulation.

A synthetic latent-variable model stands in for two networks looking at the same items: a shared latent
z ~ N(0, I_d) per item; model A's layers are random *nonlinear* maps tanh(g·z W_l) plus Gaussian noise, model B's
layers random *linear* maps z V_l plus noise (the maps are fixed by ``--model-seed``, so the population is fixed;
each data set draws fresh z and noise). Each of ``--datasets`` independent data sets of ``--n`` items gets, from
the library's own parts, the score and its nominal 95 % interval for

- mutual kNN (k = 10) of the last-layer pair, and the **best of all layer pairs**, re-selected in every half
  (:func:`prh_stitch.metrics.intervals.best_pair_interval`);
- CKA, unbiased CKA (linear) and CKNNA (k = 10) of the last-layer pair,

and the table reports how often the interval contains the true value. True values:

- CKA and unbiased CKA estimate the *population* CKA (their common N → ∞ limit). It is computed exactly from the
  population covariances, estimated on ``--population-n`` (default 2,097,152) fresh items in float64 chunks:
  CKA = ‖C_ab‖²_F / (‖C_aa‖_F ‖C_bb‖_F) of the row-normalised features (what the metric computes, N → ∞).
- Metrics with a neighbour count k estimate the expected score of an N-item data set at the same k (see
  :mod:`prh_stitch.metrics.intervals`; they have no useful N → ∞ value). It is estimated, for data set i, by
  the mean score of the *other* data sets (leave-one-out, so it is independent of data set i; its standard
  error is the across-data-set sd / √(datasets − 1), under a tenth of an interval's half-width at 200).

Each data set's half-samples (``--draws``, default 50: the library's default for reports is 200; 50 keeps the
run at 200 data sets affordable on 2 shared cores, and the quantiles of 50 draws are noisier, which if anything
costs coverage) are those :func:`prh_stitch.metrics.calibrate` would draw
(``draw_halves``), and each metric is recomputed on each half by its spec's ``prepare``/``pair``, the code path
``calibrate`` runs (tests/test_intervals.py asserts that ``calibrate`` equals this composition). Neighbour lists
and kernel sides are prepared once per layer and half and shared between the metrics that use them (mutual kNN
and CKNNA share lists; CKA and unbiased CKA share centred features), which keeps the run on 2 CPU cores short.

    python benchmarks/bench_calibration.py                         # 200 data sets, N = 1024, 50 halves each
    python benchmarks/bench_calibration.py --datasets 40 --draws 50  # a quick look (coverage ± 0.035)

Coverage of a correct 95 % interval over 200 data sets is 0.95 ± 0.015 (one binomial sd); the target is
[0.90, 0.98] for every row. Measured with the defaults (2 worker processes on the shared 2-core CPU, under a load
of ~12 from other jobs; 2434 s):

    metric                       estimand      true    mean      sd width/3.92 miss lo miss hi coverage
    mutual_knn (last pair)       N-sample    0.2104  0.2104  0.0061     0.0065       6       5    0.945
    mutual_knn (best of layers)  N-sample    0.2125  0.2125  0.0052     0.0056       2       6    0.960
    cka                          population  0.7086  0.7108  0.0068     0.0061       9       7    0.920
    unbiased_cka                 population  0.7086  0.7082  0.0068     0.0062       9       6    0.925
    cknna                        N-sample    0.1897  0.1897  0.0079     0.0090       1       3    0.980
    best of layers: mean stability 0.466; full-sample winners per pair [10, 55, 31, 104]

(``sd``: across data sets; ``width/3.92``: the sd a normal 95 % interval of that mean width implies.) The kernel
intervals are a little narrow (0.0061 vs 0.0068) and CKNNA's a little wide (0.0090 vs 0.0079): both inside the
target here, neither by a wide margin.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from prh_stitch.metrics import cka, cknna, mutual_knn, unbiased_cka
from prh_stitch.metrics.intervals import (best_pair_interval, draw_halves, estimand_of, half_size,
                                          subsample_interval)

K = 10
CI = 0.95


@dataclass
class Model:
    """Fixed random maps of the latent: A's layers nonlinear, B's linear, each with its own noise level."""

    maps_a: List[torch.Tensor]
    noise_a: List[float]
    maps_b: List[torch.Tensor]
    noise_b: List[float]
    gain: float = 1.5


def build_model(seed: int, latent: int, width_a: int, width_b: int) -> Model:
    g = torch.Generator().manual_seed(seed)

    def layers(width: int) -> List[torch.Tensor]:
        # Two layers per model: a random map and a slightly perturbed copy (as neighbouring layers of a network
        # are), so the four layer pairs score almost alike and the best pair changes between data sets and between
        # halves: the selection matters. Two layers, not more, keep the run short.
        w = torch.randn(latent, width, generator=g)
        return [x / math.sqrt(latent) for x in (w, w + 0.3 * torch.randn(latent, width, generator=g))]

    return Model(layers(width_a), [0.5, 0.5], layers(width_b), [0.6, 0.6])


def sample(model: Model, n: int, g: torch.Generator) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    z = torch.randn(n, model.maps_a[0].shape[0], generator=g)
    a = [torch.tanh(model.gain * z @ w) + s * torch.randn(n, w.shape[1], generator=g)
         for w, s in zip(model.maps_a, model.noise_a)]
    b = [z @ v + s * torch.randn(n, v.shape[1], generator=g) for v, s in zip(model.maps_b, model.noise_b)]
    return a, b


def population_cka(model: Model, total: int, chunk: int, seed: int) -> float:
    """Linear CKA of the last-layer pair as N → ∞, from population covariances of the row-normalised features."""
    g = torch.Generator().manual_seed(seed)
    sums: Dict[str, torch.Tensor] = {}
    for _ in range(total // chunk):
        a, b = sample(model, chunk, g)
        x = torch.nn.functional.normalize(a[-1], dim=1).double()
        y = torch.nn.functional.normalize(b[-1], dim=1).double()
        for key, val in (("x", x.sum(0)), ("y", y.sum(0)), ("xx", x.T @ x), ("yy", y.T @ y), ("xy", x.T @ y)):
            sums[key] = sums[key] + val if key in sums else val
    m = (total // chunk) * chunk
    mx, my = sums["x"] / m, sums["y"] / m
    caa = sums["xx"] / m - torch.outer(mx, mx)
    cbb = sums["yy"] / m - torch.outer(my, my)
    cab = sums["xy"] / m - torch.outer(mx, my)
    return float(cab.square().sum() / (caa.square().sum().sqrt() * cbb.square().sum().sqrt()))


def score_all(a: List[torch.Tensor], b: List[torch.Tensor]) -> Dict[str, object]:
    """Every benchmarked score on one data set (or one half of it), sharing the per-layer preparation."""
    knn_opts = {"k": K, "normalize": True, "block_size": None}
    ker_opts = {"kernel": "linear", "sigma": None, "bandwidth": 1.0, "normalize": True, "method": "auto",
                "block_size": None}
    mk, ck = mutual_knn.spec, cknna.spec
    side_a = [mk.prepare(x, "a", knn_opts) for x in a]
    side_b = [mk.prepare(y, "b", knn_opts) for y in b]
    matrix = torch.tensor([[mk.pair(sa, sb, knn_opts) for sb in side_b] for sa in side_a], dtype=torch.float64)
    ka, kb = cka.spec.prepare(a[-1], "a", ker_opts), cka.spec.prepare(b[-1], "b", ker_opts)
    return {"mutual_knn (last pair)": float(matrix[-1, -1]), "mutual_knn (best of layers)": matrix,
            "cka": float(cka.spec.pair(ka, kb, ker_opts)),
            "unbiased_cka": float(unbiased_cka.spec.pair(ka, kb, ker_opts)),
            "cknna": float(ck.pair(side_a[-1], side_b[-1], knn_opts))}


ESTIMANDS = {"mutual_knn (last pair)": estimand_of(tuple(mutual_knn.spec.defaults)),
             "mutual_knn (best of layers)": estimand_of(tuple(mutual_knn.spec.defaults)),
             "cka": estimand_of(tuple(cka.spec.defaults)),
             "unbiased_cka": estimand_of(tuple(unbiased_cka.spec.defaults)),
             "cknna": estimand_of(tuple(cknna.spec.defaults))}


def one_dataset(model: Model, n: int, draws: int, seed: int) -> Dict[str, Dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    a, b = sample(model, n, g)
    full = score_all(a, b)
    halves = [score_all([x[r] for x in a], [y[r] for y in b]) for r in draw_halves(n, draws, g)]
    out = {}
    for name, estimand in ESTIMANDS.items():
        if name == "mutual_knn (best of layers)":
            sel = best_pair_interval(full[name], [h[name] for h in halves], n, CI, estimand)
            out[name] = {"score": float(full[name].max()), "low": sel["ci_low"], "high": sel["ci_high"],
                         "stability": sel["stability"], "winner": int(full[name].argmax())}
        else:
            low, high = subsample_interval(full[name], [h[name] for h in halves], n, half_size(n), CI, estimand)
            out[name] = {"score": full[name], "low": low, "high": high}
    return out


def coverage_table(results: List[Dict[str, Dict[str, float]]], pop_cka: float) -> bool:
    """Print one row per metric; True when every coverage lies in [0.90, 0.98]."""
    header = (f"{'metric':<28} {'estimand':<10} {'true':>7} {'mean':>7} {'sd':>7} {'width/3.92':>10} "
              f"{'miss lo':>7} {'miss hi':>7} {'coverage':>8}")
    print(header)
    print("-" * len(header))
    ok = True
    for name, estimand in ESTIMANDS.items():
        scores = torch.tensor([r[name]["score"] for r in results], dtype=torch.float64)
        lows = torch.tensor([r[name]["low"] for r in results], dtype=torch.float64)
        highs = torch.tensor([r[name]["high"] for r in results], dtype=torch.float64)
        if estimand == "population":
            truth = torch.full_like(scores, pop_cka)
        else:  # leave-one-out mean of the other data sets' scores
            truth = (scores.sum() - scores) / (len(scores) - 1)
        miss_lo, miss_hi = int((truth < lows).sum()), int((truth > highs).sum())
        coverage = 1 - (miss_lo + miss_hi) / len(scores)
        ok &= 0.90 <= coverage <= 0.98
        print(f"{name:<28} {estimand:<10} {float(truth.mean()):7.4f} {float(scores.mean()):7.4f} "
              f"{float(scores.std()):7.4f} {float((highs - lows).mean()) / 3.92:10.4f} {miss_lo:7d} {miss_hi:7d} "
              f"{coverage:8.3f}")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", type=int, default=200)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--draws", type=int, default=50, help="half-samples per data set")
    p.add_argument("--latent", type=int, default=6)
    p.add_argument("--width-a", type=int, default=32)
    p.add_argument("--width-b", type=int, default=24)
    p.add_argument("--population-n", type=int, default=2**21)
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=1000, help="data set i uses seed + i")
    p.add_argument("--workers", type=int, default=2, help="processes, one data set each at a time (1 thread each)")
    args = p.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    model = build_model(args.model_seed, args.latent, args.width_a, args.width_b)
    pop_cka = population_cka(model, args.population_n, 2**16, seed=args.model_seed + 1)
    results = []
    jobs = [(model, args.n, args.draws, args.seed + i) for i in range(args.datasets)]
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("fork"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for result in pool.map(one_dataset, *zip(*jobs)):
            results.append(result)
            if len(results) % 25 == 0 and len(results) < args.datasets:  # a look at the coverage so far
                print(f"  {len(results)}/{args.datasets} data sets, {time.perf_counter() - started:.0f} s", flush=True)
                coverage_table(results, pop_cka)
    print(f"\nN = {args.n}, {args.datasets} data sets, {args.draws} half-samples each, k = {K}, latent d = "
          f"{args.latent}, widths {args.width_a}/{args.width_b}; population CKA {pop_cka:.4f} from "
          f"{args.population_n:,} items\n")
    ok = coverage_table(results, pop_cka)
    best = [r["mutual_knn (best of layers)"] for r in results]
    winners = torch.bincount(torch.tensor([r["winner"] for r in best]), minlength=4).tolist()
    print(f"\nbest of layers: mean stability (share of halves won by the full-sample winner) "
          f"{sum(r['stability'] for r in best) / len(best):.3f}; full-sample winners (pair index 2·a + b): "
          f"{winners}")
    print(f"all coverages in [0.90, 0.98]: {'yes' if ok else 'NO'}; run time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
