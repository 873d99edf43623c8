"""Benchmark: prh_stitch.metrics against naive full-matrix versions, on the same data in the same run.

The naive versions are what a direct transcription of the definitions does (and roughly what the paper's code
does): the full N × N similarity matrix, a full argsort for the neighbours, dense N × N masks, and HSIC through
N × N × N matrix products. The machine's fp32 matmul rate is measured first, to show the time the unavoidable
N²·D similarity work implies.

    python benchmarks/bench_metrics.py            # N=8192, D=1024, k=10, plus the N=65,536 memory check
    python benchmarks/bench_metrics.py --quick    # N=2048, no large run (a smoke test)

The naive kernel metrics (CKA, unbiased CKA, CKNNA) cost O(N³): at N=8192 they take minutes each on 2 cores, so by
default they run on the first ``--cubic-n`` rows (4096) of the same data and their N=8192 time is extrapolated by
(N/n)³ (their N × N × N products dominate); such entries are marked ``~`` and the measured time is shown too.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import torch

from prh_stitch.metrics import cka, cknna, cycle_knn, edit_distance_knn, lcs_knn, mutual_knn, unbiased_cka

TARGETS = {  # seconds at N=8192, D=1024, k=10 on the 2-core CPU (issue 3)
    "mutual_knn": 2.5, "cycle_knn": 3.0, "lcs_knn": 3.0, "edit_distance_knn": 3.0,
    "cka": 0.5, "unbiased_cka": 3.0, "cknna": 4.0,
}
PEAK_GB_TARGET = 4.0


# ----------------------------------------------------------------------------------------------- naive versions


def naive_knn(x, k):
    s = x @ x.T
    s.fill_diagonal_(-torch.inf)
    return s.argsort(dim=1, descending=True)[:, :k]


def naive_mask(idx, n):
    return torch.zeros(n, n).scatter_(1, idx, 1.0)


def naive_mutual(a, b, k):
    n = len(a)
    return float((naive_mask(naive_knn(a, k), n) * naive_mask(naive_knn(b, k), n)).sum(1).mean() / k)


def naive_cycle(a, b, k):
    ka, kb = naive_knn(a, k), naive_knn(b, k)
    return float((ka[kb] == torch.arange(len(a))[:, None, None]).flatten(1).any(1).float().mean())


def naive_lcs(a, b, k):
    ka, kb = naive_knn(a, k), naive_knn(b, k)
    t = torch.zeros(len(a), k + 1, k + 1)
    for i in range(k):
        for j in range(k):
            t[:, i + 1, j + 1] = torch.where(ka[:, i] == kb[:, j], t[:, i, j] + 1,
                                             torch.maximum(t[:, i, j + 1], t[:, i + 1, j]))
    return float(t[:, k, k].mean() / k)


def naive_edit(a, b, k):
    ka, kb = naive_knn(a, k), naive_knn(b, k)
    t = torch.zeros(len(a), k + 1, k + 1)
    t[:, :, 0] = torch.arange(k + 1)
    t[:, 0, :] = torch.arange(k + 1)
    for i in range(k):
        for j in range(k):
            t[:, i + 1, j + 1] = torch.minimum(torch.minimum(t[:, i, j + 1], t[:, i + 1, j]) + 1,
                                               t[:, i, j] + (ka[:, i] != kb[:, j]).float())
    return float(1 - t[:, k, k].mean() / k)


def hsic_biased(K, L):
    n = len(K)
    H = torch.eye(n) - 1.0 / n
    return torch.trace(K @ H @ L @ H)


def hsic_unbiased(K, L):
    m = len(K)
    Kt, Lt = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    v = (Kt * Lt.T).sum() + Kt.sum() * Lt.sum() / ((m - 1) * (m - 2)) - 2 * (Kt @ Lt).sum() / (m - 2)
    return v / (m * (m - 3))


def naive_cka(a, b, unbiased=False):
    K, L = a @ a.T, b @ b.T
    h = hsic_unbiased if unbiased else hsic_biased
    return float(h(K, L) / torch.sqrt(h(K, K) * h(L, L)))


def naive_cknna(a, b, k):
    n = len(a)
    K, L = a @ a.T, b @ b.T

    def similarity(M1, M2):
        alpha = naive_mask(naive_knn_from(M1, k), n) * naive_mask(naive_knn_from(M2, k), n)
        return hsic_unbiased(alpha * M1, alpha * M2)

    return float(similarity(K, L) / torch.sqrt(similarity(K, K) * similarity(L, L)))


def naive_knn_from(M, k):
    s = M.clone().fill_diagonal_(-torch.inf)
    return s.argsort(dim=1, descending=True)[:, :k]


# ----------------------------------------------------------------------------------------------- harness


def ours_at(name, a, b, k):
    return {"cka": lambda: cka(a, b), "unbiased_cka": lambda: unbiased_cka(a, b),
            "cknna": lambda: cknna(a, b, k=k)}[name]()


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def matmul_rate(d):
    x = torch.randn(8192, d)
    blk = x[:1024]
    blk @ x.T
    t, _ = timed(lambda: blk @ x.T, repeat=5)
    return 2 * 1024 * 8192 * d / t


def make_data(n, da, db, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 64, generator=g)  # shared latent: the two "models" see the same items
    a = z @ torch.randn(64, da, generator=g) + 0.5 * torch.randn(n, da, generator=g)
    b = torch.tanh(z @ torch.randn(64, db, generator=g)) + 0.5 * torch.randn(n, db, generator=g)
    return a, b


def _vm_hwm_gb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def large_run(n, d, k):
    """Child process: mutual_knn at large N; peak RSS of the whole process, and of the metric call alone."""
    a, b = make_data(n, d, d)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark: measure the metric call itself
        f.write("5")
    t, s = timed(lambda: mutual_knn(a, b, k=k))
    print(f"{t:.2f} {s:.6f} {_vm_hwm_gb():.3f} {base:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--large-n", type=int, default=65536)
    p.add_argument("--large-d", type=int, default=768)
    p.add_argument("--cubic-n", type=int, default=4096, help="rows for the O(N³) naive kernel metrics")
    p.add_argument("--quick", action="store_true", help="N=2048 and no large run")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--_large", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._large:
        return large_run(args.large_n, args.large_d, args.k)
    if args.quick:
        args.n, args.large_n = 2048, 0
    n, d, k = args.n, args.d, args.k
    rate = matmul_rate(d)
    full_bound = 2 * (2 * n * n * d) / rate  # both sides' N × N × D similarity products
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f} (other processes share this CPU)")
    print(f"fp32 matmul: {rate / 1e9:.1f} GFLOP/s measured; N={n} D={d} k={k}")
    print(f"matmul-bound time of the kNN search for both sides: {full_bound:.3f} s for the full N²·D products, "
          f"{full_bound / 2:.3f} s for the symmetric half we compute")
    a, b = make_data(n, d, d)
    an, bn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    m = min(n, args.cubic_n)
    am, bm = an[:m], bn[:m]
    cubic = (n / m) ** 3
    cases = [
        ("mutual_knn", lambda: mutual_knn(a, b, k=k), lambda: naive_mutual(an, bn, k)),
        ("cycle_knn", lambda: cycle_knn(a, b, k=k), lambda: naive_cycle(an, bn, k)),
        ("lcs_knn", lambda: lcs_knn(a, b, k=k), lambda: naive_lcs(an, bn, k)),
        ("edit_distance_knn", lambda: edit_distance_knn(a, b, k=k), lambda: naive_edit(an, bn, k)),
        ("cka", lambda: cka(a, b), lambda: naive_cka(am, bm)),
        ("unbiased_cka", lambda: unbiased_cka(a, b), lambda: naive_cka(am, bm, unbiased=True)),
        ("cknna", lambda: cknna(a, b, k=k), lambda: naive_cknna(am, bm, k)),
    ]
    subsampled = {"cka", "unbiased_cka", "cknna"} if m < n else set()
    print(f"\n{'metric':<18} {'ours s':>8} {'naive s':>9} {'speedup':>8} {'ours':>10} {'naive':>10} {'target':>12}"
          f"  notes")
    results = {}
    for name, ours, naive in cases:
        t_ours, s_ours = timed(ours, repeat=2)
        t_naive, s_naive = (float("nan"), float("nan")) if args.no_naive else timed(naive)
        note, mark = "", " "
        if name in subsampled:
            note = f"naive measured {t_naive:.2f} s at N={m} (score {s_naive:.6f}, ours there {ours_at(name, am, bm, k):.6f})"
            t_naive, s_naive, mark = t_naive * cubic, float("nan"), "~"
        target = TARGETS[name] if n == 8192 and d == 1024 and k == 10 else None
        verdict = "" if target is None else f"≤{target:g} {'ok' if t_ours <= target else 'MISS'}"
        results[name] = t_ours
        print(f"{name:<18} {t_ours:8.3f} {mark}{t_naive:8.2f} {t_naive / t_ours:7.1f}x {s_ours:10.6f} {s_naive:10.6f} "
              f"{verdict:>12}  {note}")
    ratio = results["mutual_knn"] / full_bound
    print(f"\nmutual_knn / matmul-bound (full N²·D): {ratio:.2f}x (target ≤ 1.5x: {'ok' if ratio <= 1.5 else 'MISS'}); "
          f"/ symmetric-half bound: {results['mutual_knn'] / (full_bound / 2):.2f}x")
    if args.large_n:
        cmd = [sys.executable, __file__, "--_large", "--large-n", str(args.large_n), "--large-d", str(args.large_d),
               "--k", str(k)]
        t, s, peak, base = map(float, subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split())
        bound = 2 * (2 * args.large_n**2 * args.large_d) / rate
        print(f"\nmutual_knn N={args.large_n} D={args.large_d}: {t:.1f} s (score {s:.4f}; matmul-bound {bound:.1f} s "
              f"full, {bound / 2:.1f} s half); peak RSS during the call {peak:.2f} GB (inputs and runtime included; "
              f"creating the data peaked at {base:.2f} GB) "
              f"(target ≤ {PEAK_GB_TARGET:g} GB: {'ok' if peak <= PEAK_GB_TARGET else 'MISS'})")


if __name__ == "__main__":
    main()
