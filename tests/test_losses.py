import math
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prh_stitch.losses import LOSSES, ContrastiveLoss, build_loss


def _pair(b=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)


def _reference_infonce(pred, target, temperature):
    """Brute force: for every row, -log softmax of its own pair, in both directions, averaged."""
    p = [row / row.norm() for row in pred]
    t = [row / row.norm() for row in target]
    n = len(p)

    def direction(a, b):
        total = 0.0
        for i in range(n):
            logits = [float(a[i] @ b[j]) / temperature for j in range(n)]
            log_norm = math.log(sum(math.exp(v) for v in logits))
            total += log_norm - logits[i]
        return total / n

    return 0.5 * (direction(p, t) + direction(t, p))


def test_mse_matches_formula():
    pred, target = _pair()
    expected = sum(float((p - t) @ (p - t)) for p, t in zip(pred, target)) / pred.numel()
    assert build_loss("mse")(pred, target).item() == pytest.approx(expected, rel=1e-12)


def test_cosine_matches_formula():
    pred, target = _pair()
    expected = sum(1 - float(p @ t) / (float(p.norm()) * float(t.norm())) for p, t in zip(pred, target)) / len(pred)
    assert build_loss("cosine")(pred, target).item() == pytest.approx(expected, rel=1e-12)
    # scale invariance per row: cosine ignores feature norms
    assert build_loss("cosine")(pred * 7.0, target).item() == pytest.approx(expected, rel=1e-12)


def test_regression_losses_take_the_last_axis_as_features():
    """[B, T, D] inputs (e.g. token features): cosine compares the D-vectors, mse averages every element."""
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, generator=g,
                                                                                         dtype=torch.float64)
    cosines = [float(p @ t) / (float(p.norm()) * float(t.norm()))
               for p, t in zip(pred.reshape(-1, 5), target.reshape(-1, 5))]
    assert build_loss("cosine")(pred, target).item() == pytest.approx(sum(1 - c for c in cosines) / 12, rel=1e-12)
    assert build_loss("mse")(pred, target).item() == pytest.approx(float(((pred - target) ** 2).mean()), rel=1e-12)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_contrastive_matches_per_row_log_softmax(temperature):
    pred, target = _pair(b=7, d=4, seed=1)
    loss = ContrastiveLoss(init_temperature=temperature).double()
    assert loss.temperature.item() == pytest.approx(temperature)
    # the parameter was created in float32, so compare at the temperature it actually holds
    exact = loss.temperature.item()
    assert loss(pred, target).item() == pytest.approx(_reference_infonce(pred, target, exact), rel=1e-10)


def test_contrastive_is_small_for_matched_pairs_and_large_for_shuffled():
    pred, _ = _pair(b=16, d=32, seed=2)
    loss = build_loss("contrastive")
    assert loss(pred, pred).item() < 0.01
    assert loss(pred, pred.roll(1, 0)).item() > 5.0


def test_temperature_gradient_flows_and_scale_is_clamped():
    pred, target = _pair(seed=3)
    loss = ContrastiveLoss().double()
    loss(pred, target).backward()
    grad = loss.log_logit_scale.grad
    assert grad is not None and torch.isfinite(grad) and grad != 0

    with torch.no_grad():
        loss.log_logit_scale.fill_(math.log(1000.0))  # as if an optimiser step overshot
    loss(pred, target)
    assert loss.logit_scale.item() == pytest.approx(100.0)
    assert loss.temperature.item() == pytest.approx(0.01)

    frozen = ContrastiveLoss(learn_temperature=False).double()
    frozen(pred.requires_grad_(), target).backward()
    assert frozen.log_logit_scale.grad is None and pred.grad is not None


def test_input_validation():
    pred, target = _pair()
    for name in LOSSES.names():
        loss = build_loss(name)
        with pytest.raises(ValueError, match=r"pred \(6, 5\) vs target \(6, 4\)"):
            loss(pred, target[:, :4])
        bad = target.clone()
        bad[2, 1] = float("nan")
        with pytest.raises(ValueError, match="NaN or Inf found in target"):
            loss(pred, bad)
        bad_pred = pred.clone()
        bad_pred[0, 0] = float("inf")
        with pytest.raises(ValueError, match="NaN or Inf found in pred"):
            loss(bad_pred, target)
    # opting out of the (syncing) check lets the NaN through
    assert torch.isnan(build_loss("mse", check_finite=False)(pred, bad))
    with pytest.raises(ValueError, match=r"expects \[B, D\] inputs, got \(2, 3, 5\)"):
        build_loss("contrastive")(torch.randn(2, 3, 5), torch.randn(2, 3, 5))


def test_build_loss_registry():
    assert {"mse", "cosine", "contrastive"} <= set(LOSSES.names())
    with pytest.raises(ValueError, match="unknown loss 'contrastiv'.*Did you mean 'contrastive'"):
        build_loss("contrastiv")
    assert build_loss("contrastive", init_temperature=0.2, gather_across_ranks=None).temperature.item() == pytest.approx(0.2)


# ---------------------------------------------------------------- gather_across_ranks (2 gloo processes)

# Per-rank batch sizes to check: equal, then unequal (which the loss reweights).
GATHER_CASES = [(4, 4), (3, 5)]


def _global_problem(sizes, seed):
    """The full batch and a shared linear 'stitcher' weight, identical in every process."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(sum(sizes), 6, generator=g, dtype=torch.float64)
    target = torch.randn(sum(sizes), 4, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return source, target, weight


def _loss_and_grads(source, target, weight, gather):
    w = weight.clone().requires_grad_()
    loss = ContrastiveLoss(gather_across_ranks=gather).double()
    value = loss(source @ w.T, target)
    value.backward()
    return value.detach(), w.grad, loss.log_logit_scale.grad


def _gather_worker(rank, out_dir):
    # File-based rendezvous: no port is picked, so nothing can take it between picking and binding.
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        results = []
        for case, sizes in enumerate(GATHER_CASES):
            source, target, weight = _global_problem(sizes, seed=case)
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            gathered = _loss_and_grads(source[rows], target[rows], weight, gather=True)
            local_only = _loss_and_grads(source[rows], target[rows], weight, gather=False)
            results.append({"gathered": gathered, "local_only": local_only[0]})
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_across_ranks_equals_full_batch_loss_and_grads(tmp_path):
    mp.spawn(_gather_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    for case, sizes in enumerate(GATHER_CASES):
        source, target, weight = _global_problem(sizes, seed=case)
        full_loss, full_w_grad, full_scale_grad = _loss_and_grads(source, target, weight, gather=False)
        per_rank = [r[case]["gathered"] for r in ranks]
        # DDP averages over ranks: the averaged losses and gradients must be the full-batch ones.
        mean = [torch.stack(parts).mean(0) for parts in zip(*per_rank)]
        torch.testing.assert_close(mean[0], full_loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(mean[1], full_w_grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(mean[2], full_scale_grad, rtol=1e-10, atol=1e-14)

        # Without gathering each rank only sees its own rows as negatives.
        start = 0
        for r, n in enumerate(sizes):
            local, *_ = _loss_and_grads(source[start : start + n], target[start : start + n], weight, gather=False)
            torch.testing.assert_close(ranks[r][case]["local_only"], local, rtol=1e-12, atol=0)
            start += n


class _TwoRanksInOneProcess:
    """Stands in for torch.distributed so that one process can play both ranks of a 2-process group.

    The real test above runs 2 gloo processes; this one runs in-process, so the mutation tool (which records which
    tests reach which function) sees the gathering code covered. Rank r's all_gather returns its own tensor in slot r
    and, in the other slot, the tensor the other rank sent in a first pass (still attached to the shared weight),
    so summing both ranks' losses routes gradients exactly as the real autograd all_gather does under DDP.
    """

    def __init__(self, sizes):
        self.sizes, self.rank, self.sent = list(sizes), 0, {}

    def install(self, monkeypatch):
        import torch.distributed.nn.functional as dist_functional

        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: len(self.sizes))
        monkeypatch.setattr(dist, "get_rank", lambda *a, **k: self.rank)
        monkeypatch.setattr(dist, "all_gather", self.all_gather_sizes)
        monkeypatch.setattr(dist_functional, "all_gather", self.all_gather_rows)

    def all_gather_sizes(self, out, local):
        assert local.tolist() == [self.sizes[self.rank]]
        for slot, n in zip(out, self.sizes):
            slot.copy_(torch.tensor([n]))

    def all_gather_rows(self, padded):
        # The real function warns that it is deprecated; the loss must keep that warning quiet.
        warnings.warn("torch.distributed.nn.functional.all_gather is deprecated, use "
                      "torch.distributed._functional_collectives.all_gather_single instead.", FutureWarning)
        parts = [self.sent.get(r, torch.full_like(padded, float("nan"))) for r in range(len(self.sizes))]
        # Like the real collective, every rank must send the same shape (hence the padding to the longest batch).
        assert all(part.shape == padded.shape for part in parts), [tuple(p.shape) for p in parts] + [padded.shape]
        self.sent[self.rank] = padded
        parts[self.rank] = padded
        return tuple(parts)


@pytest.mark.parametrize("sizes", [(4, 4), (3, 5), (5, 2)])
def test_gather_across_ranks_emulated_in_one_process_equals_full_batch_loss_and_grads(monkeypatch, sizes):
    source, target, weight = _global_problem(sizes, seed=sum(sizes))
    full_loss, full_w_grad, full_scale_grad = _loss_and_grads(source, target, weight, gather=False)
    ranks = _TwoRanksInOneProcess(sizes)
    ranks.install(monkeypatch)
    w = weight.clone().requires_grad_()
    loss = ContrastiveLoss(gather_across_ranks=True).double()
    starts = [0, sizes[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak, the deprecation warning included
        for _ in range(2):  # first pass: each rank sends its rows; second pass: each sees the other's
            per_rank = []
            for rank, (start, n) in enumerate(zip(starts, sizes)):
                ranks.rank = rank
                per_rank.append(loss(source[start:start + n] @ w.T, target[start:start + n]))
    # The first pass's NaN placeholders and the padding rows must not reach the second pass's losses.
    assert all(torch.isfinite(value) for value in per_rank)
    mean = torch.stack(per_rank).mean()
    mean.backward()  # what DDP's gradient averaging computes
    torch.testing.assert_close(mean.detach(), full_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(w.grad, full_w_grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(loss.log_logit_scale.grad, full_scale_grad, rtol=1e-10, atol=1e-14)
    for rank, value in enumerate(per_rank):  # each rank: world / N times the sum of its own rows' losses
        start, n = starts[rank], sizes[rank]
        rows = _row_losses(source @ weight.T, target, loss.log_logit_scale.detach().exp())[start:start + n]
        torch.testing.assert_close(value.detach(), 2 / sum(sizes) * rows.sum(), rtol=1e-12, atol=0)


def _row_losses(pred, target, scale):
    """Brute force per global row: both directions' cross-entropies over the whole batch, averaged."""
    p, t = pred / pred.norm(dim=1, keepdim=True), target / target.norm(dim=1, keepdim=True)
    out = []
    for i in range(len(p)):
        forward = -torch.log_softmax(scale * (p[i] @ t.T), 0)[i]
        backward = -torch.log_softmax(scale * (t[i] @ p.T), 0)[i]
        out.append(0.5 * (forward + backward))
    return torch.stack(out)


def test_single_vector_pairs_and_empty_or_mismatched_inputs():
    """1-D inputs are one pair of feature vectors; empty or mismatched inputs are one clear error naming the loss."""
    g = torch.Generator().manual_seed(6)
    p, t = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    assert build_loss("mse")(p, t).item() == pytest.approx(float(((p - t) ** 2).mean()), rel=1e-12)
    expected_cosine = 1 - float(p @ t) / (float(p.norm()) * float(t.norm()))
    assert build_loss("cosine")(p, t).item() == pytest.approx(expected_cosine, rel=1e-12)
    for name, cls in (("mse", "MSELoss"), ("cosine", "CosineLoss"), ("contrastive", "ContrastiveLoss")):
        with pytest.raises(ValueError, match=rf"^{cls}: expected non-empty \[B, D\] inputs, got \(0, 5\)$"):
            build_loss(name)(torch.zeros(0, 5), torch.zeros(0, 5))
        with pytest.raises(ValueError, match=rf"^{cls}: expected non-empty \[B, D\] inputs, got \(\)$"):
            build_loss(name)(torch.tensor(1.0), torch.tensor(1.0))
        with pytest.raises(ValueError, match=rf"^{cls}: pred and target shapes differ: pred \(2, 5\) vs target \(2, 4\)$"):
            build_loss(name)(torch.zeros(2, 5), torch.zeros(2, 4))
        both_bad = torch.full((2, 5), float("nan"))
        with pytest.raises(ValueError, match=rf"^{cls}: NaN or Inf found in pred and target$"):
            build_loss(name)(both_bad, both_bad)
    # A single row is a valid batch of one.
    assert build_loss("contrastive")(p[None], t[None]).item() == pytest.approx(0.0, abs=1e-12)


def test_contrastive_options_are_checked_and_the_scale_cap_applies_below_one():
    for option in ("init_temperature", "max_logit_scale"):
        for bad in (0.0, -1.0):
            with pytest.raises(ValueError, match=rf"^{option} must be > 0, got {bad!r}$"):
                ContrastiveLoss(**{option: bad})
    capped = ContrastiveLoss(init_temperature=0.07, max_logit_scale=0.5)  # a cap below 1 is allowed
    assert capped.logit_scale.item() == pytest.approx(0.5)
    assert ContrastiveLoss().gather_across_ranks is False


def test_only_an_opted_in_loss_gathers_and_only_under_an_initialised_group(monkeypatch):
    sizes = (3, 5)
    source, target, weight = _global_problem(sizes, seed=9)
    local = [_loss_and_grads(source[:3], target[:3], weight, gather=False)[0],
             _loss_and_grads(source[3:], target[3:], weight, gather=False)[0]]
    # No process group: an opted-in loss is the plain local loss.
    assert _loss_and_grads(source[:3], target[:3], weight, gather=True)[0].item() == pytest.approx(local[0].item(),
                                                                                                   rel=1e-12)
    ranks = _TwoRanksInOneProcess(sizes)
    ranks.install(monkeypatch)
    for rank, rows in enumerate((slice(0, 3), slice(3, 8))):  # a group exists, but the default loss stays local
        ranks.rank = rank
        value = ContrastiveLoss().double()(source[rows] @ weight.T, target[rows])
        assert value.item() == pytest.approx(local[rank].item(), rel=1e-12)
    assert ranks.sent == {}  # and it never called the collective
    monkeypatch.setattr(dist, "is_available", lambda: False)  # a build without torch.distributed
    ranks.rank = 0
    value = ContrastiveLoss(gather_across_ranks=True).double()(source[:3] @ weight.T, target[:3])
    assert value.item() == pytest.approx(local[0].item(), rel=1e-12) and ranks.sent == {}


def test_contrastive_loss_builds_everything_on_the_inputs_device():
    """The meta device stands in for an accelerator: labels made on the CPU would not meet meta logits."""
    loss = ContrastiveLoss(check_finite=False)  # the finiteness check needs real values
    value = loss(torch.randn(4, 3, device="meta"), torch.randn(4, 3, device="meta"))
    assert value.device.type == "meta" and value.shape == ()
