"""Evaluating a trained prefix map on held-out image–caption pairs (``evaluate.py prefix``).

Three figures of caption bits per byte on one split (by default the checkpoint's test split), each over the same
captions and the same scored tokens (:mod:`prh_stitch.prefix.captions`):

- ``prefix``: each caption after its own image's prefix;
- ``lm_alone``: the LM with no prefix (equal to ``bits_per_byte(..., definition="pooled")`` of the competence module);
- ``shuffled``: each caption after the prefix of *another* image of the split (a seeded derangement: one random
  cycle through all rows, so no caption keeps its own image), the control that keeps everything but the pairing.

Each comes with a bootstrap interval over captions (percentile, seeded; a draw resamples captions with replacement
and recomputes the pooled ratio total nats / ln 2 / total bytes); the differences use the same draws (paired).
Greedy captions of a sample of images follow, and on the built-in scenes their attribute accuracy (see
:mod:`prh_stitch.prefix.attributes`), next to the same scores against a shuffled image's scene (the empirical chance)
and uniform guessing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from prh_stitch import reports
from prh_stitch.prefix.attributes import UNIFORM_CHANCE, attribute_accuracy, is_scene_meta, score_caption
from prh_stitch.prefix.captions import caption_nats, greedy_captions, tokenize_captions
from prh_stitch.prefix.language_models import load_language_model
from prh_stitch.prefix.prefix_map import load_prefix_map

CONDITIONS = ("prefix", "lm_alone", "shuffled")
PROTOCOL = ("pooled bits per byte: total caption NLL in nats / ln 2 / total UTF-8 bytes; every caption after the "
            "LM's start token (after the prefix when there is one); its text tokens are scored, the end token is not")


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """``perm`` with ``perm[i] != i`` for every i (n >= 2): one random cycle through all rows."""
    if n < 2:
        raise ValueError("the shuffled-image control needs at least 2 captions")
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def bootstrap_bits_per_byte(nats: Dict[str, torch.Tensor], n_bytes: torch.Tensor, draws: int, ci: float,
                            generator: torch.Generator) -> Dict[str, Any]:
    """Point values and paired percentile intervals of each condition's pooled bits per byte and of the contrasts."""
    n = len(n_bytes)
    index = torch.randint(n, (draws, n), generator=generator)
    q = torch.tensor([(1 - ci) / 2, (1 + ci) / 2], dtype=torch.float64)

    def bpb(values, rows=None):
        if rows is None:
            return float(values.sum() / math.log(2) / n_bytes.sum())
        return values[rows].sum(1) / math.log(2) / n_bytes[rows].sum(1)

    point = {c: bpb(v) for c, v in nats.items()}
    drawn = {c: bpb(v, index) for c, v in nats.items()}
    out: Dict[str, Any] = {c: {"bits_per_byte": point[c], "interval": torch.quantile(drawn[c], q).tolist()}
                           for c in nats}
    contrasts = {}
    if "lm_alone" in nats:
        contrasts["reduction_vs_lm_alone"] = (1 - point["prefix"] / point["lm_alone"],
                                              1 - drawn["prefix"] / drawn["lm_alone"])
    if "shuffled" in nats:
        contrasts["shuffled_minus_prefix"] = (point["shuffled"] - point["prefix"], drawn["shuffled"] - drawn["prefix"])
    for name, (value, draws_) in contrasts.items():
        out[name] = {"value": value, "interval": torch.quantile(draws_, q).tolist()}
    return out


@dataclass
class PrefixEvaluation:
    report: Dict[str, Any]
    rows: List[Dict[str, Any]]

    def write(self, out: str | Path) -> Path:
        out = Path(out)
        reports.write_json(out / "prefix.json", self.report)
        reports.write_csv(out / "prefix_captions.csv", self.rows, list(self.rows[0]) if self.rows else ["key"])
        reports.write_text(out / "prefix.md", markdown(self.report))
        return out / "prefix.md"


def _scene_metas(urls: List[str]) -> Dict[str, Any]:
    """Every sample's meta (its ``.json`` member) by key: what the scene attributes are checked against."""
    from prh_stitch.data.stream import PROBLEM, read_shard

    metas = {}
    for url in urls:
        for raw in read_shard(url):
            if PROBLEM not in raw and "json" in raw:
                metas[raw["__key__"]] = json.loads(raw["json"].decode("utf-8"))
    return metas


def evaluate_prefix(ckpt: str, split: str = "test", data: Optional[str] = None, max_captions: Optional[int] = None,
                    generate: int = 32, max_new_tokens: int = 40, bootstrap: int = 1000, ci: float = 0.95,
                    seed: int = 0, batch_size: int = 32, device: str = "cpu", cache_dir: Optional[str] = None,
                    progress: bool = True) -> PrefixEvaluation:
    """Caption bits per byte with the image prefix, with none and with a shuffled image's; greedy captions.

    Args:
        ckpt: a prefix-stitching checkpoint (``.ckpt``) or its stitcher folder.
        split: which of the checkpoint's recorded splits to score (``test``: reported once; ``val``: choices).
        data: shard pattern of other held-out pairs instead of the recorded split.
        max_captions: score a seeded random subset of this many captions (None: all of them).
        generate: images whose greedy caption is generated (the first of the scored subset, itself random).
        max_new_tokens: longest greedy caption, in tokens.
        bootstrap: bootstrap draws over captions for the 95 % intervals (paired across conditions).
        ci: interval coverage.
        seed: seed of the subset, the shuffled-image derangement and the bootstrap.
        batch_size: captions per LM forward pass.
        device: where the image encoder (if features must be extracted), the map and the LM run.
        cache_dir: the feature store's cache (default ``$PRH_STITCH_CACHE`` or ``~/.cache/prh_stitch``).
        progress: progress lines.
    """
    from prh_stitch.checkpoint import check_trained_with
    from prh_stitch.data.features import FeatureStore, default_cache_dir
    from prh_stitch.data.shards import expand_urls
    from prh_stitch.encoders import encoder_from_spec
    from prh_stitch.evaluation.splits import local_scene_pattern

    started = time.perf_counter()
    prefix_map = load_prefix_map(ckpt).to(device)
    root = Path(cache_dir or default_cache_dir())
    pattern = data or local_scene_pattern(prefix_map.data.get(split), root)  # scenes recorded elsewhere: made here
    if not pattern:
        raise ValueError(f"the checkpoint records no {split!r} split; pass --data with a shard pattern of held-out pairs")
    urls = expand_urls(pattern)
    spec = prefix_map.source_spec
    encoder = encoder_from_spec(spec)
    check_trained_with(prefix_map.stitcher, "source", encoder.fingerprint([spec.layer], spec.pooling))
    store = FeatureStore(root / "features")
    features_set = store.get(encoder, urls, [spec.layer], spec.pooling, progress=progress, device=device)
    features = features_set.layer(encoder.layer_names[encoder.resolve_layer(spec.layer)]).float()
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(len(features_set))
    if max_captions is not None and max_captions < len(rows):
        rows = torch.randperm(len(rows), generator=generator)[:max_captions].sort().values
    keys = [features_set.keys[i] for i in rows.tolist()]
    captions = [features_set.captions[i] for i in rows.tolist()]
    features = features[rows]
    shuffled = derangement(len(rows), generator)

    lm = load_language_model(prefix_map.language_model, **prefix_map.stitcher.target_spec.options).to(device)
    check_trained_with(prefix_map.stitcher, "target", lm.fingerprint())
    tokens = tokenize_captions(lm, captions)
    nats = {c: torch.empty(len(rows), dtype=torch.float64) for c in CONDITIONS}
    seconds = {}
    with torch.inference_mode():
        for condition in CONDITIONS:
            t0 = time.perf_counter()
            for start in range(0, len(rows), batch_size):
                batch = torch.arange(start, min(start + batch_size, len(rows)))
                chunk = tokens.rows(batch, device)
                source = {"prefix": batch, "shuffled": shuffled[batch]}.get(condition)
                prefix = None if source is None else prefix_map(features[source].to(device))
                nats[condition][batch] = caption_nats(lm, prefix, chunk).cpu()
                if progress:
                    print(f"prefix evaluation: {condition} {int(batch[-1]) + 1}/{len(rows)} captions", flush=True)
            seconds[condition] = time.perf_counter() - t0
        n_generate = min(generate, len(rows))
        generated: List[str] = []
        for start in range(0, n_generate, batch_size):
            batch = torch.arange(start, min(start + batch_size, n_generate))
            generated += greedy_captions(lm, prefix_map(features[batch].to(device)), max_new_tokens)
    scores = bootstrap_bits_per_byte(nats, tokens.bytes, bootstrap, ci, generator)

    metas = _scene_metas(urls)
    scene = n_generate > 0 and all(is_scene_meta(metas.get(k)) for k in keys[:n_generate])
    attributes = None
    per_row: List[Dict[str, Any]] = []
    if scene:
        own = [score_caption(generated[i], metas[keys[i]], captions[i]) for i in range(n_generate)]
        other = [score_caption(generated[i], metas[keys[int(shuffled[i])]], captions[int(shuffled[i])])
                 for i in range(n_generate)]
        attributes = {"scenes": n_generate, "generated_vs_own_scene": attribute_accuracy(own),
                      "generated_vs_shuffled_scene": attribute_accuracy(other), "uniform_chance": UNIFORM_CHANCE}
    for i, key in enumerate(keys):
        row = {"key": key, "caption": captions[i], "bytes": int(tokens.bytes[i]),
               **{f"nats_{c}": float(nats[c][i]) for c in CONDITIONS}, "shuffled_image": keys[int(shuffled[i])],
               "generated": generated[i] if i < n_generate else None}
        if scene and i < n_generate:
            row.update({f"correct_{a}": v for a, v in own[i].items()})
        per_row.append(row)
    report = {
        "checkpoint": str(ckpt), "language_model": prefix_map.language_model, "n_prefix": prefix_map.n_prefix,
        "source": spec.to_dict(),
        "split": {"name": split if data is None else "data", "pattern": pattern, "captions": len(rows),
                  "of": len(features_set), "subset": None if len(rows) == len(features_set) else
                  f"seeded random subset (seed {seed}) of {len(rows)} of {len(features_set)} captions"},
        "protocol": PROTOCOL,
        "interval": f"percentile bootstrap over captions, {bootstrap} draws, {ci:.0%}, seed {seed}; the same draws "
                    "for every condition (paired contrasts)",
        "control": "shuffled: each caption after the prefix of another image of the same subset (a seeded "
                   "derangement); lm_alone: no prefix at all",
        "bits_per_byte": scores,
        "targets": {
            "reduction_vs_lm_alone_at_least_30pct": scores["reduction_vs_lm_alone"]["value"] >= 0.30,
            "below_shuffled_outside_interval": scores["shuffled_minus_prefix"]["interval"][0] > 0
            and scores["prefix"]["bits_per_byte"] < scores["shuffled"]["interval"][0],
        },
        "generated": [{"key": keys[i], "caption": captions[i], "generated": generated[i]} for i in range(n_generate)],
        "attributes": attributes,
        "seconds": {**seconds, "total": time.perf_counter() - started},
        "device": device,
    }
    return PrefixEvaluation(report, per_row)


def markdown(report: Dict[str, Any]) -> str:
    """The report as markdown: the three figures with intervals, the contrasts, attributes, sample captions."""
    s, b = report["split"], report["bits_per_byte"]
    lines = [f"# Prefix stitching: {report['source']['name']} → {report['language_model']} "
             f"({report['n_prefix']} prefix embeddings)\n",
             f"Split `{s['name']}` (`{s['pattern']}`): {s['captions']} captions"
             + (f" ({s['subset']})" if s["subset"] else "") + ".\n",
             f"Protocol: {report['protocol']}.\n", f"Interval: {report['interval']}.\n",
             f"Controls: {report['control']}.\n", "## Caption bits per byte (lower is better)\n"]
    rows = [[c, b[c]["bits_per_byte"], reports.interval(*b[c]["interval"])] for c in CONDITIONS if c in b]
    lines.append(reports.markdown_table(["condition", "bits per byte", "95 % interval"], rows))
    rows = [[name, b[name]["value"], reports.interval(*b[name]["interval"])]
            for name in ("reduction_vs_lm_alone", "shuffled_minus_prefix") if name in b]
    lines.append("\n" + reports.markdown_table(["contrast", "value", "95 % interval (paired)"], rows))
    lines.append("\nTargets: " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in report["targets"].items())
                 + ".\n")
    attributes = report.get("attributes")
    if attributes:
        lines.append(f"## Attributes of {attributes['scenes']} greedy captions\n")
        own, other = attributes["generated_vs_own_scene"], attributes["generated_vs_shuffled_scene"]
        rows = [[name, own[name]["accuracy"], other[name]["accuracy"], attributes["uniform_chance"].get(name),
                 own[name]["n"]] for name in own]
        lines.append(reports.markdown_table(["attribute", "own scene", "shuffled scene (chance)", "uniform chance",
                                             "scenes"], rows))
    if report["generated"]:
        lines.append("\n## Greedy captions\n")
        lines.append(reports.markdown_table(["true caption", "generated"],
                                            [[g["caption"], _cell(g["generated"])] for g in report["generated"][:16]]))
    seconds = report["seconds"]
    lines.append("\nSeconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + f" on {report['device']}.\n")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """A generated caption inside one markdown table cell: its line breaks and pipes would break the table."""
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ⏎ ")
