"""torchmetrics wrappers: batched == one shot, index de-duplication, and DDP (2 processes, gloo) == one process."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prh_stitch.metrics import (CKA, CKNNA, LCSKNN, SVCCA, CycleKNN, EditDistanceKNN, MutualKNN, Retrieval,
                                UnbiasedCKA, cka, cknna, cycle_knn, edit_distance_knn, lcs_knn, mutual_knn, retrieval,
                                svcca, unbiased_cka)

N = 103  # odd: a 2-rank DistributedSampler pads one repeated sample


def wrappers_and_functions():
    return [
        (MutualKNN(k=5), lambda a, b: mutual_knn(a, b, k=5)),
        (CycleKNN(k=5), lambda a, b: cycle_knn(a, b, k=5)),
        (LCSKNN(k=5), lambda a, b: lcs_knn(a, b, k=5)),
        (EditDistanceKNN(k=5), lambda a, b: edit_distance_knn(a, b, k=5)),
        (CKNNA(k=5), lambda a, b: cknna(a, b, k=5)),
        (CKA(), cka),
        (CKA(kernel="rbf"), lambda a, b: cka(a, b, kernel="rbf")),
        (UnbiasedCKA(), unbiased_cka),
        (SVCCA(dim=6), lambda a, b: svcca(a, b, dim=6)),
        (Retrieval(ks=(1, 5)), lambda a, b: retrieval(a, b, groups=data()[2], ks=(1, 5))),
    ]


def data():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(N, 16, generator=g)
    b = a + 0.7 * torch.randn(N, 16, generator=g)
    groups = torch.arange(N) // 2
    return a, b, groups


def check_equal(out, expected):
    if isinstance(expected, dict):
        assert set(out) == set(expected)
        for key, value in expected.items():
            assert isinstance(out[key], torch.Tensor) and float(out[key]) == pytest.approx(value, abs=1e-6), key
    else:
        assert isinstance(out, torch.Tensor) and float(out) == pytest.approx(expected, abs=1e-6)


def feed(metric, a, b, groups, index, sizes):
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        metric.update(a[sl], b[sl], index=None if index is None else index[sl],
                      groups=groups[sl] if isinstance(metric, Retrieval) else None)
        start += size
    assert start == len(a)


def test_batched_equals_one_shot():
    a, b, groups = data()
    for metric, fn in wrappers_and_functions():
        feed(metric, a, b, groups, None, [40, 1, 62])
        check_equal(metric.compute(), fn(a, b))


def test_index_drops_padded_repeats_and_orders_rows():
    a, b, groups = data()
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    index = torch.cat([order, order[:7]])  # shuffled, and the first 7 samples arrive twice
    for metric, fn in wrappers_and_functions():
        feed(metric, a[index], b[index], groups[index], index, [50, 60])
        check_equal(metric.compute(), fn(a, b))
    # without the index the repeats would count twice: the scores differ
    m = MutualKNN(k=5)
    feed(m, a[index], b[index], groups[index], None, [110])
    assert float(m.compute()) != pytest.approx(mutual_knn(a, b, k=5), abs=1e-6)


def _ddp_worker(rank, world, rendezvous, out_dir):
    torch.set_num_threads(1)  # two processes on a small CPU: avoid oversubscribed OpenMP barriers
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        a, b, groups = data()
        padded = torch.cat([torch.arange(N), torch.arange(N)[: (-N) % world]])  # DistributedSampler padding
        mine = padded[rank::world]
        sizes = [20, 16, len(mine) - 36] if rank == 0 else [len(mine) - 5, 5]  # uneven batches per rank
        failures = []
        for metric, fn in wrappers_and_functions():
            feed(metric, a[mine], b[mine], groups[mine], mine, sizes)
            try:
                check_equal(metric.compute(), fn(a, b))
            except AssertionError as err:
                failures.append(f"{type(metric).__name__}: {err}")
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures) if failures else "ok")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_on_every_rank(tmp_path):
    """2 ranks, 103 rows: the sampler pads one repeated row; every rank's compute() must give the 1-process score."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "ok", f"rank {rank}"
