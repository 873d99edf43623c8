"""Zero-shot classification through a stitcher: class prompts embedded by the target text encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ZeroShotInputs:
    """Class prompts embedded into the comparison space, and each sample's class (−1: none)."""

    class_embeddings: Tensor  # (C, D) in the same space as the stitched features
    class_names: List[str]
    class_ids: List[int]  # label id of each row of class_embeddings
    labels: Tensor  # (N,) label id per sample, −1 when absent
    prompt: str
    reference: Optional[Tensor] = None  # (N, D) target features of the captions, for a text-side reference


def zero_shot(features: Tensor, zs: ZeroShotInputs) -> Dict[str, Any]:
    """Accuracy of the nearest class prompt (cosine), against uniform chance and the majority class."""
    known = zs.labels >= 0
    ids = torch.tensor(zs.class_ids)
    truth = zs.labels[known]
    protos = F.normalize(zs.class_embeddings.float(), dim=1)

    def accuracy(x: Tensor) -> float:
        pred = ids.to(x.device)[(F.normalize(x[known.to(x.device)].float(), dim=1) @ protos.to(x.device).T).argmax(1)]
        return float((pred.cpu() == truth).double().mean())

    counts = torch.stack([(truth == c).sum() for c in ids])
    out = {"prompt": zs.prompt, "classes": zs.class_names, "n": int(known.sum()), "accuracy": accuracy(features),
           "chance_uniform": 1.0 / len(ids), "chance_majority": float(counts.max()) / int(known.sum())}
    if zs.reference is not None:
        out["caption_accuracy"] = accuracy(zs.reference)
    return out


def label_names_from_shards(urls: Sequence[str]) -> Dict[int, str]:
    """``label`` → ``label_name`` from the samples' JSON, read by the data package's one shard reader."""
    from prh_stitch.data.stream import PairedShards

    names: Dict[int, str] = {}
    for sample in PairedShards(list(urls), split_by_node=False, split_by_worker=False, image_mode=None):
        sample["image"].close()
        meta = sample.get("meta")
        if isinstance(meta, dict) and isinstance(meta.get("label"), int) and meta.get("label_name") is not None:
            names.setdefault(int(meta["label"]), str(meta["label_name"]))
    return names


def embed_texts(encoder, texts: Sequence[str], layer, pooling: Optional[str], device: torch.device) -> Tensor:
    encoder.to(device)
    try:
        batch = encoder.collate([encoder.transform(t) for t in texts])
        return encoder.encode(batch, [layer], pooling)[0].float()
    finally:
        encoder.to("cpu")


def zero_shot_inputs(urls: Sequence[str], labels: Tensor, target_encoder, target_spec,
                     to_space: Callable[[Tensor], Tensor], prompt: str, device: torch.device,
                     reference: Optional[Tensor]) -> Tuple[Optional[ZeroShotInputs], Optional[str]]:
    """The class prompts in the comparison space, or why zero-shot does not apply to this data and target."""
    if target_encoder.modality != "text":
        return None, "target encoder is not a text encoder: no class prompts to embed"
    if not bool((labels >= 0).any()):
        return None, "the data's JSON has no class labels"
    names = label_names_from_shards(urls)
    present = sorted(int(c) for c in labels[labels >= 0].unique())
    missing = [c for c in present if c not in names]
    if missing:
        return None, f"labels {missing[:5]} have no label_name in the data's JSON"
    if len(present) < 2:
        return None, "fewer than two classes in the data"
    prompts = [prompt.format(names[c]) for c in present]
    emb = embed_texts(target_encoder, prompts, target_spec.layer, target_spec.pooling, device)
    return ZeroShotInputs(to_space(emb.to(device)), [names[c] for c in present], present, labels, prompt,
                          reference), None
