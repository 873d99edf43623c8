"""Retrieval on a held-out split: overall, and on captions seen and unseen in training, with exact grouped chance.

A val/test caption is *seen* when the identical string occurs in the training split; its target (the caption's
features) was then a training target, so retrieving it can be recall of a memorised pair rather than
generalisation. *Unseen* captions (in the built-in scenes, at least the held-out combinations of
``data.scenes``) measure generalisation. Items with the identical caption count as correct matches, so chance
recall@k is not k/N but the mean over queries of 1 - C(N-g, k)/C(N, k) (g: the query's caption group size;
Σ|g|²/N² for k = 1), reported per subset next to the recall.

One function, :func:`caption_retrieval`, used by the LightningModule's validation and test (through
:class:`SplitRetrieval`, which gathers rows across DDP ranks) and by ``evaluate.py stitch``.
"""

from __future__ import annotations

from typing import Any, Collection, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from prh_stitch.metrics import Retrieval, retrieval
from prh_stitch.metrics.retrieval import retrieval_subsets

SUBSETS = ("all", "seen", "unseen")


def seen_mask(captions: Sequence[str], train_captions: Collection[str]) -> Tensor:
    """Boolean mask: True where the exact caption string occurs in the training split."""
    train = train_captions if isinstance(train_captions, (set, frozenset)) else set(train_captions)
    return torch.tensor([c in train for c in captions], dtype=torch.bool)


def caption_retrieval(a: Tensor, b: Tensor, captions: Sequence[str], train_captions: Optional[Collection[str]],
                      ks: Sequence[int] = (1, 5, 10), normalize: bool = True) -> Dict[str, Any]:
    """:func:`prh_stitch.metrics.retrieval` (same-caption items correct) plus ``"subsets"``: ``all`` / ``seen`` /
    ``unseen`` queries, each with ``n``, ``distinct`` captions, recall@k both ways and exact chance@k.
    ``train_captions=None`` (training split unknown): ``all`` only."""
    from prh_stitch.data.datamodule import caption_groups

    if len(captions) != len(a):
        raise ValueError(f"one caption per row is needed: {len(captions)} captions for {len(a)} rows")
    groups = caption_groups(list(captions)).to(a.device)
    everything = torch.ones(len(captions), dtype=torch.bool, device=a.device)
    subsets = {"all": everything}
    if train_captions is not None:
        seen = seen_mask(captions, train_captions).to(a.device)
        subsets.update(seen=seen, unseen=~seen)
    out: Dict[str, Any] = retrieval(a, b, groups=groups, normalize=normalize, ks=ks)
    out["subsets"] = retrieval_subsets(a, b, groups, subsets, normalize=normalize, ks=ks)
    return out


def logged_scores(stage: str, scores: Dict[str, Any], ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Flat ``{stage}/...`` scalars of :func:`caption_retrieval` for a logger (NaN-free: empty subsets left out)."""
    flat = {
        **{f"{stage}/recall@{k}": scores[f"a2b/recall@{k}"] for k in ks},
        f"{stage}/recall@1_target_to_source": scores["b2a/recall@1"],
        f"{stage}/mean_rank": scores["a2b/mean_rank"],
        f"{stage}/mean_cosine": scores["mean_cosine"],
    }
    for name, subset in scores["subsets"].items():
        prefix = stage if name == "all" else f"{stage}/{name}"
        flat[f"{prefix}/n"] = float(subset["n"])
        flat[f"{prefix}/distinct_captions"] = float(subset["distinct"])
        if subset["n"] == 0:
            continue
        flat[f"{prefix}/chance@1"] = subset["chance@1"]
        if name != "all":
            flat.update({f"{prefix}/recall@{k}": subset[f"a2b/recall@{k}"] for k in ks})
    return flat


def summary_line(stage: str, scores: Dict[str, Any]) -> str:
    """One line: recall@1 overall / seen / unseen, each with its chance and counts."""
    parts = []
    for name in SUBSETS:
        if name not in scores["subsets"]:
            continue
        s = scores["subsets"][name]
        if s["n"] == 0:
            parts.append(f"{name}: none")
            continue
        parts.append(f"{name} {s['a2b/recall@1']:.4f} (chance {s['chance@1']:.4f}; {s['n']} pairs, "
                     f"{s['distinct']} distinct captions)")
    return f"{stage} recall@1 " + ", ".join(parts)


class SplitRetrieval(Retrieval):
    """:class:`prh_stitch.metrics.Retrieval` over a whole split whose rows are sample indices 0..N-1, scored by
    :func:`caption_retrieval`: every rank's rows are gathered and the sampler's padded repeats dropped by index
    (exact whole-set scores under DDP), then each row gets its caption by index."""

    def __init__(self, ks: Sequence[int] = (1, 5, 10), **kwargs: Any) -> None:
        super().__init__(ks=ks, **kwargs)
        self.captions: Optional[List[str]] = None
        self.train_captions: Collection[str] = frozenset()

    def set_split(self, captions: Sequence[str], train_captions: Collection[str]) -> None:
        """The split's caption of every sample index, and the training split's captions."""
        self.captions, self.train_captions = list(captions), train_captions

    def compute(self) -> Dict[str, Any]:  # type: ignore[override]
        if self.captions is None:
            raise RuntimeError("SplitRetrieval needs set_split(captions, train_captions) before compute()")
        a, b, _ = self.rows()
        index = torch.unique(dim_zero_cat(self.index)) if len(self.index) else torch.arange(len(a))
        if len(index) != len(a) or int(index.max()) >= len(self.captions):
            raise ValueError(f"the gathered rows ({len(a)}) do not match the split's {len(self.captions)} captions")
        captions = [self.captions[i] for i in index.tolist()]
        return caption_retrieval(a, b, captions, self.train_captions, ks=self.ks, normalize=self.normalize)
