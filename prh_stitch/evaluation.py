"""``python evaluate.py``: how well two models stitch, how aligned their representations are, and whether
alignment grows with competence.

Subcommands (``python evaluate.py SUBCOMMAND --help`` lists every option):

- ``stitch``: a trained stitcher (``--ckpt``) or a training-free baseline (``--baseline``) on held-out pairs:
  retrieval, the objective's loss, alignment of stitched and of raw features, zero-shot classification.
- ``align``: the paper's measurement: every layer pair of every model pair, the best pair (max over layer
  pairs, as the paper reports it) and the last-layer pair, each against chance, a permutation null and a
  bootstrap interval; figures and tables.
- ``study``: the convergence study from a YAML config (see :mod:`prh_stitch.study`).

Features always come from the feature store, every layer of an encoder in one pass, so a second run (or
another subcommand on the same data) never runs an encoder again. Scores of a model pair are cached too.
User errors print one line ``evaluate.py: error: ...`` and exit with status 2; reports are written only
after everything is computed, each file atomically, so a failed run leaves no half-written report.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from prh_stitch import reports


# Errors that carry a message meant for the user; anything else keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, ImportError)
DEFAULT_METRICS = ("mutual_knn", "cka", "cknna")
SCORE_CACHE_FORMAT = 1


class EvalError(ValueError):
    """Bad input to ``evaluate.py``: printed as one line, exit status 2."""


# ---- settings shared by every subcommand ------------------------------------------------------------

@dataclass
class ScoreSettings:
    """How alignment scores are computed and calibrated (recorded in every report)."""

    metrics: Tuple[str, ...] = DEFAULT_METRICS
    k: int = 10  # neighbours for the kNN metrics and CKNNA (the paper's k)
    permutations: int = 20  # permutation-null draws per headline score
    bootstrap: int = 200  # bootstrap resamples per headline score (95% percentile interval)
    max_null: int = 5  # permutation draws of the *max over layer pairs* (the selection's own null); 0 = off
    half_samples: int = 0  # study only: half-sample rescoring draws for intervals of correlations
    seed: int = 0
    # Clamp each layer's features (each side, all N rows) to ±(this quantile of |x|) before scoring alignment, as
    # the paper's code does with 0.95 (prh_stitch.metrics.clamp_outliers). None (the default) = off, so scores
    # made before the option existed stay what they were. Retrieval and zero-shot never use it.
    outlier_quantile: Optional[float] = None


def clamp_note(quantile: Optional[float]) -> str:
    """How the reports' headers say whether features were clamped."""
    if quantile is None or quantile == 1.0:
        return "no outlier clamp"
    return f"features clamped at the {quantile:g} quantile of |x| per layer before scoring (outlier removal)"


def clamp_layers(feats: Sequence[Tensor], names: Sequence[str], label: str, quantile: Optional[float]) -> List[Tensor]:
    """Each layer of one model clamped on its own (its own threshold), or the layers themselves when off."""
    from prh_stitch.metrics import clamp_outliers

    return [clamp_outliers(x, quantile, f"{label} layer {name}") for x, name in zip(feats, names)]


def check_metrics(names: Sequence[str]) -> Tuple[str, ...]:
    """Validate metric names against the registry before any expensive work (its error lists the choices)."""
    from prh_stitch.metrics import METRICS

    names = tuple(n.strip() for n in names if n.strip())
    if not names:
        raise EvalError("no metric given; choose from: " + ", ".join(METRICS.names()))
    for name in names:
        METRICS.get(name)
    return names


def metric_options(metric: str, k: int) -> Dict[str, Any]:
    """The options a metric takes from the report's settings: ``k`` for those that have neighbours."""
    from prh_stitch.metrics import METRICS

    return {"k": k} if "k" in inspect.signature(METRICS.get(metric)).parameters else {}


def check_n(n: int, settings: ScoreSettings, what: str) -> None:
    uses_k = any("k" in metric_options(m, settings.k) for m in settings.metrics)
    if uses_k and n <= settings.k + 1:
        raise EvalError(f"{what}: N = {n} paired samples is too small for k = {settings.k} neighbours; "
                        f"give more data or a smaller --k (at most {max(1, n - 2)})")
    if n < 4:
        raise EvalError(f"{what}: N = {n} paired samples is too few to score alignment (need at least 4)")


def pick_device(name: Optional[str]) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: CUDA is not available here; use --device cpu")
    return torch.device(name)


def cache_root(cache_dir: Optional[str]) -> Path:
    from prh_stitch.data.features import default_cache_dir

    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


# ---- features -----------------------------------------------------------------------------------------

@dataclass
class Extraction:
    """How to run encoders over shards (batching, workers, device, progress)."""

    store: Any
    device: torch.device
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True


def extraction_layers(encoder, pooling: Optional[str], layer: Optional[int] = None) -> List[int]:
    """Every layer in one pass where one pooling fits them all; else just the requested layer.

    A timm model's ``pre_logits`` is pooled by its own head, so an explicit block pooling (``cls``/``mean``)
    cannot apply to all of an image model's layers; text poolings apply to every hidden state.
    """
    if pooling is None or encoder.modality == "text" or layer is None:
        return list(range(encoder.num_layers))
    return [encoder.resolve_layer(layer)]


def load_features(ex: Extraction, encoder, urls: Sequence[str], pooling: Optional[str] = None,
                  layers: Optional[List[int]] = None):
    """Features of ``encoder`` on ``urls`` from the store (extracted on ``ex.device`` when absent)."""
    from prh_stitch.data.features import data_fingerprint

    layers = list(range(encoder.num_layers)) if layers is None else layers
    encoder.to(ex.device)
    try:
        feature_set = ex.store.get(encoder, list(urls), layers=layers, pooling=pooling, batch_size=ex.batch_size,
                                   num_workers=ex.num_workers, progress=ex.progress)
        # Recorded here, from the encoder itself, so reports and the score cache do not depend on which
        # identity fields a given version of the store keeps in ``info``.
        feature_set.info = dict(feature_set.info or {}, encoder_fingerprint=encoder.fingerprint(layers, pooling),
                                data_fingerprint=data_fingerprint(list(urls)))
        return feature_set
    except ValueError as exc:
        if "no usable samples" in str(exc):
            raise EvalError(_no_samples_message(urls)) from None
        raise
    finally:
        encoder.to("cpu")


def _no_samples_message(urls: Sequence[str]) -> str:
    from prh_stitch.data.stream import scan

    report = scan(list(urls))
    skipped = report.get("skipped") or {}
    reasons = skipped if isinstance(skipped, dict) else {}
    text = json.dumps(report.get("skipped_by_reason", reasons))
    if "missing_caption" in text or "empty_caption" in text:
        return (f"the data has no captions: no sample of {len(urls)} shard(s) ({urls[0]} ...) has a non-empty .txt "
                f"caption (skips: {text}). evaluate.py needs image–caption pairs; write shards with "
                "python -m prh_stitch.data write")
    return f"no usable samples in {len(urls)} shard(s) ({urls[0]} ...); skips: {text}"


def layer_names(feature_set) -> List[str]:
    """Layer names shallow to deep (the stored dict's order is not guaranteed to be the model's)."""
    names = feature_set.info.get("layers") if isinstance(feature_set.info, dict) else None
    return list(names) if names else list(feature_set.features)


def paired(fa, fb, device: torch.device) -> Tuple[List[Tensor], List[Tensor], Tensor, Tensor]:
    """Every layer of both sides, rows joined by sample key, as float32 on ``device``."""
    from prh_stitch.data.features import align_by_key

    ia, ib = align_by_key(fa, fb)
    a = [fa.features[n][ia].float().to(device) for n in layer_names(fa)]
    b = [fb.features[n][ib].float().to(device) for n in layer_names(fb)]
    return a, b, ia, ib


def encoder_record(feature_set) -> Dict[str, Any]:
    info = feature_set.info or {}
    return {k: info.get(k) for k in ("encoder", "encoder_fingerprint", "data_fingerprint", "pooling", "layers",
                                     "num_samples", "dtype")}


# ---- scoring one model pair ---------------------------------------------------------------------------

class ScoreCache:
    """Per-pair scores on disk, keyed by both feature fingerprints and every setting that changes them."""

    def __init__(self, root: Optional[Path]) -> None:
        self.root = root

    def key(self, payload: Dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        if self.root is None:
            return None
        path = self.root / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, record: Dict[str, Any]) -> None:
        if self.root is not None:
            reports.write_json(self.root / f"{key}.json", record)


def _calibration_fields(result: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("score", "chance", "null_mean", "null_std", "z", "p_value", "calibrated", "ci_low", "ci_high")
    return {k: result.get(k) for k in keys}


def half_sample_subsets(n: int, draws: int, seed: int) -> List[Tensor]:
    """Random halves of the rows, without replacement; the same for every model pair with the same N.

    A half-sample's spread matches the full-sample bootstrap's for mean-type scores, and unlike a bootstrap
    with replacement it never makes a duplicated row its own nearest neighbour.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randperm(n, generator=gen)[: n // 2].sort().values for _ in range(draws)]


def score_pair(label_a: str, fa, label_b: str, fb, metric: str, settings: ScoreSettings, device: torch.device,
               cache: ScoreCache = ScoreCache(None)) -> Dict[str, Any]:
    """Layer × layer scores of one model pair for one metric, with calibrated best and last pairs."""
    from prh_stitch.metrics import METRICS, calibrate, layer_alignment

    opts = metric_options(metric, settings.k)
    key_settings = asdict(settings) | {"metrics": None}
    if settings.outlier_quantile in (None, 1.0):
        # No clamp (1 clamps nothing): the key is the one written before the option existed, so those scores stay
        # valid; with a clamp the quantile is part of the key and an unclamped score is never returned for it.
        del key_settings["outlier_quantile"]
    key = cache.key({"format": SCORE_CACHE_FORMAT, "a": encoder_record(fa), "b": encoder_record(fb),
                     "metric": metric, "opts": opts, "settings": key_settings})
    cached = cache.get(key)
    if cached is not None:
        cached.update(model_a=label_a, model_b=label_b)
        return cached
    a, b, _, _ = paired(fa, fb, device)
    n = a[0].shape[0]
    check_n(n, settings, f"{label_a} × {label_b}")
    a = clamp_layers(a, layer_names(fa), label_a, settings.outlier_quantile)
    b = clamp_layers(b, layer_names(fb), label_b, settings.outlier_quantile)
    table = layer_alignment(a, b, metric, **opts)
    bi, bj = table["best_index"]
    cal = dict(permutations=settings.permutations, bootstrap=settings.bootstrap, seed=settings.seed, **opts)
    best = calibrate(metric, a[bi], b[bj], **cal)
    last = calibrate(metric, a[-1], b[-1], **cal)
    names_a, names_b = layer_names(fa), layer_names(fb)
    record: Dict[str, Any] = {
        "model_a": label_a, "model_b": label_b, "metric": metric, "n": n, "options": opts,
        "selection": "best = max over all layer pairs (the paper's headline; the max inflates it, see "
                     "max_null_mean); last = last layer of each model",
        **_calibration_fields(best),
        "layer_a": bi, "layer_b": bj, "layer_a_name": names_a[bi], "layer_b_name": names_b[bj],
        "last": {**_calibration_fields(last), "layer_a": len(a) - 1, "layer_b": len(b) - 1,
                 "layer_a_name": names_a[-1], "layer_b_name": names_b[-1]},
        "layers_a": names_a, "layers_b": names_b, "matrix": table["scores"].tolist(),
        "fingerprint_a": encoder_record(fa), "fingerprint_b": encoder_record(fb),
    }
    # The max over La·Lb pairs exceeds a single pair's null even for unrelated models: its own null is the
    # same max with b's rows shuffled (all layers of b by one permutation, as a real mismatch would be).
    maxes = []
    gen = torch.Generator().manual_seed(settings.seed + 7919)
    for _ in range(settings.max_null):
        perm = torch.randperm(n, generator=gen).to(device)
        maxes.append(layer_alignment(a, [x[perm] for x in b], metric, **opts)["best"])
    if maxes:
        mean = sum(maxes) / len(maxes)
        std = float(torch.tensor(maxes, dtype=torch.float64).std()) if len(maxes) > 1 else 0.0
        record.update(max_null_mean=mean, max_null_std=std,
                      max_calibrated=(record["score"] - mean) / (1 - mean) if mean < 1 else None)
    else:
        record.update(max_null_mean=None, max_null_std=None, max_calibrated=None)
    if settings.half_samples and n // 2 > settings.k + 1:
        fn = METRICS.get(metric)
        subsets = half_sample_subsets(n, settings.half_samples, settings.seed)
        record["half_samples"] = {
            "best": [fn(a[bi][s.to(device)], b[bj][s.to(device)], **opts) for s in subsets],
            "last": [fn(a[-1][s.to(device)], b[-1][s.to(device)], **opts) for s in subsets],
        }
    cache.put(key, record)
    return record


CSV_FIELDS = ("model_a", "model_b", "metric", "pair", "score", "layer_a", "layer_b", "layer_a_name", "layer_b_name",
              "chance", "null_mean", "null_std", "calibrated", "ci_low", "ci_high", "max_null_mean", "n")


def csv_rows(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for r in records:
        rows.append({**r, "pair": "best (max over layer pairs)"})
        rows.append({**r, **r["last"], "pair": "last layers", "max_null_mean": None})
    return rows


# ---- align --------------------------------------------------------------------------------------------

@dataclass
class Model:
    label: str
    spec: Any  # EncoderSpec
    modality: str  # "vision" | "text"


def model_pairs(models: Sequence[Model], kinds: Sequence[str]) -> List[Tuple[Model, Model]]:
    """(vision, text) pairs for ``vt``; unordered same-modality pairs for ``vv`` and ``tt``."""
    vision = [m for m in models if m.modality == "vision"]
    text = [m for m in models if m.modality == "text"]
    pairs: List[Tuple[Model, Model]] = []
    if "vt" in kinds:
        pairs += [(v, t) for v in vision for t in text]
    for kind, group in (("vv", vision), ("tt", text)):
        if kind in kinds:
            pairs += [(group[i], group[j]) for i in range(len(group)) for j in range(i + 1, len(group))]
    return pairs


def parse_pairs(value: str) -> Tuple[str, ...]:
    kinds = {"all": ("vt", "vv", "tt")}.get(value, tuple(p.strip() for p in value.split(",") if p.strip()))
    bad = [k for k in kinds if k not in ("vt", "vv", "tt")]
    if bad or not kinds:
        raise EvalError(f"--pairs {value!r}: use vt (vision–text), vv, tt, a comma list of those, or all")
    return kinds


def extract_models(models: Sequence[Model], urls: Sequence[str], ex: Extraction) -> Dict[str, Any]:
    """Feature sets (all layers) per model label; encoders are built one at a time and released."""
    from prh_stitch.encoders import encoder_from_spec

    feature_sets = {}
    for model in models:
        encoder = encoder_from_spec(model.spec)
        expected = "image" if model.modality == "vision" else "text"
        if encoder.modality != expected:
            raise EvalError(f"{model.label!r} is a{'n' if encoder.modality == 'image' else ''} {encoder.modality} "
                            f"encoder but was listed as a {model.modality} model")
        feature_sets[model.label] = load_features(ex, encoder, urls, model.spec.pooling)
        del encoder
    return feature_sets


def score_models(models: Sequence[Model], feature_sets: Dict[str, Any], kinds: Sequence[str],
                 settings: ScoreSettings, device: torch.device, cache: ScoreCache, progress: bool) -> List[Dict]:
    from tqdm.auto import tqdm

    jobs = [(a, b, m) for a, b in model_pairs(models, kinds) for m in settings.metrics]
    if not jobs:
        raise EvalError(f"no model pairs to score for --pairs {','.join(kinds)} (vision–text needs at least one "
                        "of each; vv/tt need two of that modality)")
    records = []
    for a, b, metric in tqdm(jobs, desc="scoring model pairs", disable=not progress):
        record = score_pair(a.label, feature_sets[a.label], b.label, feature_sets[b.label], metric, settings,
                            device, cache)
        record["kind"] = a.modality + "-" + b.modality
        records.append(record)
    return records


def alignment_outputs(out: Path, models: Sequence[Model], records: Sequence[Dict], header: Dict[str, Any],
                      title: str) -> Dict[str, Any]:
    """Render alignment.json/.csv/.md and the figures into memory-safe atomic files under ``out``.

    Figures are drawn to temporary files and renamed, like everything else; the JSON (the report's index)
    is written last, so its presence means the report is complete.
    """
    figures = []
    labels = [m.label for m in models]
    by_metric: Dict[str, List[Dict]] = {}
    for r in records:
        by_metric.setdefault(r["metric"], []).append(r)
    for metric, recs in by_metric.items():
        matrix: List[List[Optional[float]]] = [[None] * len(labels) for _ in labels]
        for r in recs:
            i, j = labels.index(r["model_a"]), labels.index(r["model_b"])
            matrix[i][j] = matrix[j][i] = r["score"]
        chance = recs[0].get("chance")
        figures.append(reports.model_heatmap(labels, matrix, metric, "best layer pair", chance,
                                             out / f"models_{metric}.png").name)
        for r in recs:
            name = f"layers_{metric}_{_slug(r['model_a'])}__{_slug(r['model_b'])}.png"
            figures.append(reports.layer_heatmap(torch.tensor(r["matrix"]), r["layers_a"], r["layers_b"],
                                                 r["model_a"], r["model_b"], metric, (r["layer_a"], r["layer_b"]),
                                                 r.get("chance"), out / name).name)
    reports.write_csv(out / "alignment.csv", csv_rows(records), CSV_FIELDS)
    reports.write_text(out / "alignment.md", alignment_markdown(records, header, title))
    payload = {**header, "records": list(records), "figures": figures}
    reports.write_json(out / "alignment.json", payload)
    return payload


def alignment_markdown(records: Sequence[Dict], header: Dict[str, Any], title: str) -> str:
    rows = []
    for r in records:
        last = r["last"]
        rows.append([r["model_a"], r["model_b"], r["metric"],
                     f"{r['score']:.3f} ({r['layer_a_name']}, {r['layer_b_name']})",
                     reports.fmt(r.get("max_null_mean"), 3), reports.fmt(r.get("max_calibrated"), 3),
                     f"{last['score']:.3f}", reports.fmt(last.get("chance"), 3), reports.fmt(last.get("null_mean"), 3),
                     reports.fmt(last.get("calibrated"), 3), reports.interval(last.get("ci_low"), last.get("ci_high"))])
    settings = header.get("settings", {})
    return (f"# {title}\n\nN = {records[0]['n'] if records else '–'} paired samples, k = {settings.get('k')}, "
            f"{settings.get('permutations')} permutations, {settings.get('bootstrap')} bootstrap resamples, "
            f"seed {settings.get('seed')}, {clamp_note(settings.get('outlier_quantile'))}, "
            f"device {header.get('device')}.\n\n"
            "**best** is the maximum over all layer pairs (the paper's headline number); because it is a maximum "
            "it sits above chance even for unrelated models, so compare it with *null of max* (the same maximum "
            "with the pairing shuffled). **last** is the last-layer pair, with its chance level, permutation null, "
            "calibrated score (s − null)/(1 − null) and 95% bootstrap interval.\n\n"
            + reports.markdown_table(["model A", "model B", "metric", "best (layers)", "null of max",
                                      "calibrated max", "last", "chance", "null", "calibrated", "95% CI"], rows))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _split_list(value: Optional[str]) -> List[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def cmd_align(args: argparse.Namespace) -> int:
    from prh_stitch.encoders import EncoderSpec

    settings = _settings_from_args(args)
    kinds = parse_pairs(args.pairs)
    models = [Model(n, EncoderSpec(name=n), "vision") for n in _split_list(args.vision)]
    models += [Model(n, EncoderSpec(name=n), "text") for n in _split_list(args.text)]
    if len({m.label for m in models}) != len(models):
        raise EvalError("a model is listed twice in --vision/--text")
    device, urls, root, ex = _inputs_from_args(args)
    if not model_pairs(models, kinds):
        raise EvalError(f"no model pairs to score for --pairs {','.join(kinds)}: give --vision and --text models "
                        "(or two of one modality with --pairs vv/tt)")
    started = time.perf_counter()
    feature_sets = extract_models(models, urls, ex)
    records = score_models(models, feature_sets, kinds, settings, device, ScoreCache(root / "scores"),
                           not args.no_progress)
    header = reports.provenance(
        "align", {"data": args.data, "vision": _split_list(args.vision), "text": _split_list(args.text),
                  "pairs": list(kinds)}, str(device), settings.seed,
        {label: encoder_record(fs) for label, fs in feature_sets.items()},
        settings=asdict(settings), seconds=round(time.perf_counter() - started, 2))
    out = Path(args.out)
    alignment_outputs(out, models, records, header, "Alignment between models")
    print(f"evaluate.py align: {len(records)} record(s) written to {out / 'alignment.json'}")
    return 0


# ---- stitch -------------------------------------------------------------------------------------------

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


def stitch_report(mapped: Tensor, target: Tensor, raw_source: Tensor, raw_target: Tensor, captions: Sequence[str],
                  settings: ScoreSettings, loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                  loss_batch_size: int = 256, zero_shot_inputs: Optional[ZeroShotInputs] = None) -> Dict[str, Any]:
    """Everything ``stitch`` reports, independent of where the mapping came from (checkpoint or baseline).

    ``mapped`` (source features mapped into the comparison space) and ``target`` (target features in that
    space) are compared by retrieval and alignment; ``raw_source``/``raw_target`` are the encoders' own
    features, scored for alignment as the reference the mapping should not lose. Same-caption items count
    as correct retrieval matches.
    """
    from prh_stitch.data.datamodule import caption_groups
    from prh_stitch.metrics import calibrate, clamp_outliers, retrieval

    n = mapped.shape[0]
    check_n(n, settings, "stitch")
    groups = caption_groups(list(captions)).to(mapped.device)
    out: Dict[str, Any] = {"n": n, "unique_captions": int(groups.max()) + 1,
                           "retrieval": retrieval(mapped, target, groups=groups),
                           "retrieval_note": "a2b = stitched source → target, b2a = target → stitched source; "
                                             "items with the identical caption count as correct"}
    if loss is not None:
        total = 0.0
        with torch.no_grad():
            for i0 in range(0, n, loss_batch_size):
                chunk = slice(i0, i0 + loss_batch_size)
                total += float(loss(mapped[chunk], target[chunk])) * len(mapped[chunk])
        out["loss"] = {"value": total / n, "batch_size": loss_batch_size,
                       "note": "mean over consecutive batches in key order (contrastive losses depend on batch size)"}
    out["alignment"] = {}
    q = settings.outlier_quantile  # alignment only: retrieval and zero-shot score the features as they are
    sides = {"stitched": (clamp_outliers(mapped, q, "stitched source"), clamp_outliers(target, q, "target")),
             "raw": (clamp_outliers(raw_source, q, "raw source"), clamp_outliers(raw_target, q, "raw target"))}
    for metric in settings.metrics:
        cal = dict(permutations=settings.permutations, bootstrap=settings.bootstrap, seed=settings.seed,
                   **metric_options(metric, settings.k))
        out["alignment"][metric] = {which: _calibration_fields(calibrate(metric, a, b, **cal))
                                    for which, (a, b) in sides.items()}
    if zero_shot_inputs is not None:
        out["zero_shot"] = zero_shot(mapped, zero_shot_inputs)
    return out


def label_names_from_shards(urls: Sequence[str]) -> Dict[int, str]:
    """``label`` → ``label_name`` from the samples' JSON (local tars read without decoding any image)."""
    names: Dict[int, str] = {}

    def take(meta: Any) -> None:
        if isinstance(meta, dict) and isinstance(meta.get("label"), int) and meta.get("label_name") is not None:
            names.setdefault(int(meta["label"]), str(meta["label_name"]))

    for url in urls:
        if url.startswith("pipe:"):
            from prh_stitch.data.stream import PairedShards

            for sample in PairedShards([url], split_by_node=False, split_by_worker=False):
                take(sample.get("meta"))
            continue
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".json"):
                        handle = tar.extractfile(member)
                        try:
                            take(json.loads(handle.read().decode("utf-8")) if handle else None)
                        except ValueError:
                            continue  # the stream already skips and counts undecodable meta
        except (OSError, tarfile.TarError):
            continue  # a truncated shard: its good samples were read by the stream, names come from others
    return names


def embed_texts(encoder, texts: Sequence[str], layer, pooling: Optional[str], device: torch.device) -> Tensor:
    encoder.to(device)
    try:
        batch = encoder.collate([encoder.transform(t) for t in texts])
        return encoder.encode(batch, [layer], pooling)[0].float()
    finally:
        encoder.to("cpu")


def _zero_shot_inputs(urls, labels: Tensor, target_encoder, target_spec, to_space, prompt: str, device,
                      reference: Optional[Tensor]) -> Tuple[Optional[ZeroShotInputs], Optional[str]]:
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


def _check_requested(flag: str, requested: Optional[str], spec, other_flag: str, other_requested: Optional[str],
                     other_spec) -> None:
    for f, req, sp in ((flag, requested, spec), (other_flag, other_requested, other_spec)):
        if req is not None and req != sp.name:
            raise EvalError(f"the checkpoint stitches {spec.name!r} → {other_spec.name!r}, but {f} {req!r} was "
                            f"requested ({f} must be {sp.name!r}); evaluate the checkpoint trained for that pair, "
                            "or drop --source/--target to use the checkpoint's encoders")


def _load_objective(ckpt_meta: Dict[str, Any], state: Dict[str, Tensor], device: torch.device):
    from prh_stitch.losses import build_loss

    spec = ckpt_meta.get("objective") or {}
    if not spec.get("name"):
        return None, None
    loss = build_loss(spec["name"], **(spec.get("options") or {}))
    prefix = "objective."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if own:
        # The trained temperature of a contrastive objective lives here (objective.log_logit_scale).
        loss.load_state_dict(own, strict=True)
    return loss.to(device).eval(), spec


def cmd_stitch(args: argparse.Namespace) -> int:
    from prh_stitch.checkpoint import CHECKPOINT_KEY, load_stitcher, read_checkpoint
    from prh_stitch.data.features import align_by_key
    from prh_stitch.data.shards import expand_urls
    from prh_stitch.encoders import EncoderSpec, encoder_from_spec

    settings = _settings_from_args(args)
    if (args.ckpt is None) == (args.baseline is None):
        raise EvalError("give exactly one of --ckpt PATH (a trained stitcher) or --baseline NAME (training-free)")
    device, urls, root, ex = _inputs_from_args(args)
    loss = objective = stitcher = baseline = None
    method: Dict[str, Any]
    if args.ckpt is not None:
        checkpoint = read_checkpoint(args.ckpt)
        stitcher = load_stitcher(args.ckpt, device)
        source_spec, target_spec = stitcher.source_spec, stitcher.target_spec
        _check_requested("--source", args.source, source_spec, "--target", args.target, target_spec)
        loss, objective = _load_objective(checkpoint[CHECKPOINT_KEY], checkpoint["state_dict"], device)
        method = {"kind": "checkpoint", "path": os.path.abspath(args.ckpt), "stitcher": stitcher.config(),
                  "objective": objective, "global_step": checkpoint.get("global_step"),
                  "epoch": checkpoint.get("epoch")}
    else:
        from prh_stitch.baselines import BASELINES

        if not (args.source and args.target and args.anchors):
            raise EvalError("--baseline needs --source, --target and --anchors (a shard pattern of anchor pairs, "
                            "normally the training split, never the evaluated data)")
        options = _json_option("--baseline-options", args.baseline_options)
        baseline = BASELINES.get(args.baseline)(**options)
        source_spec = EncoderSpec(args.source, layer=args.source_layer, pooling=args.source_pooling)
        target_spec = EncoderSpec(args.target, layer=args.target_layer, pooling=args.target_pooling)
        method = {"kind": "baseline", "name": args.baseline, "options": baseline.config(), "anchors": args.anchors}
    source_encoder, target_encoder = encoder_from_spec(source_spec), encoder_from_spec(target_spec)
    s_layers = extraction_layers(source_encoder, source_spec.pooling, source_spec.layer)
    t_layers = extraction_layers(target_encoder, target_spec.pooling, target_spec.layer)
    fs_source = load_features(ex, source_encoder, urls, source_spec.pooling, s_layers)
    fs_target = load_features(ex, target_encoder, urls, target_spec.pooling, t_layers)
    s_name = source_encoder.layer_names[source_encoder.resolve_layer(source_spec.layer)]
    t_name = target_encoder.layer_names[target_encoder.resolve_layer(target_spec.layer)]
    ia, ib = align_by_key(fs_source, fs_target)
    raw_source = fs_source.layer(s_name)[ia].float().to(device)
    raw_target = fs_target.layer(t_name)[ib].float().to(device)
    captions = [fs_source.captions[i] for i in ia.tolist()]
    labels = torch.tensor([fs_source.labels[i] for i in ia.tolist()], dtype=torch.long)
    if stitcher is not None:
        if raw_source.shape[1] != stitcher.in_dim or raw_target.shape[1] != stitcher.out_dim:
            raise EvalError(f"the checkpoint's stitcher maps {stitcher.in_dim}-d to {stitcher.out_dim}-d features, "
                            f"but {source_spec.name}/{s_name} and {target_spec.name}/{t_name} give "
                            f"{raw_source.shape[1]}-d and {raw_target.shape[1]}-d; were the encoders changed?")
        with torch.no_grad():
            mapped, target = stitcher(raw_source), raw_target
        to_space: Callable[[Tensor], Tensor] = lambda x: x  # noqa: E731 - the target space is the comparison space
    else:
        anchor_urls = expand_urls(args.anchors)
        if set(anchor_urls) & set(urls):
            raise EvalError("--anchors and --data name the same shards; anchors must not be the evaluated items")
        fa = load_features(ex, source_encoder, anchor_urls, source_spec.pooling, s_layers)
        fb = load_features(ex, target_encoder, anchor_urls, target_spec.pooling, t_layers)
        ja, jb = align_by_key(fa, fb)
        baseline.fit(fa.layer(s_name)[ja].float().to(device), fb.layer(t_name)[jb].float().to(device))
        mapped, target = baseline.transform_source(raw_source), baseline.transform_target(raw_target)
        to_space = baseline.transform_target
    zs, zs_note = _zero_shot_inputs(urls, labels, target_encoder, target_spec, to_space, args.prompt, device,
                                    reference=target if target_encoder.modality == "text" else None)
    result = stitch_report(mapped, target, raw_source, raw_target, captions, settings, loss, args.loss_batch_size, zs)
    if zs_note:
        result["zero_shot"] = {"skipped": zs_note}
    report = {
        **reports.provenance("stitch", {"data": args.data, "method": method}, str(device), settings.seed,
                             {"source": encoder_record(fs_source), "target": encoder_record(fs_target)},
                             settings=asdict(settings)),
        "source": {**source_spec.to_dict(), "layer_name": s_name}, "target": {**target_spec.to_dict(),
                                                                               "layer_name": t_name},
        **result,
    }
    out = Path(args.out)
    markdown = stitch_markdown(report)
    tb_dir = _tensorboard_dir(args)
    if tb_dir is not None:
        _log_tensorboard(tb_dir, report, markdown, method.get("global_step") or 0)
        report["tensorboard"] = str(tb_dir)
    reports.write_text(out / "stitch.md", markdown)
    reports.write_json(out / "stitch.json", report)
    r = report["retrieval"]
    print(f"evaluate.py stitch: recall@1 {r['a2b/recall@1']:.4f} (stitched → target), N = {report['n']}; "
          f"report in {out / 'stitch.json'}")
    return 0


def _json_option(flag: str, value: Optional[str]) -> Dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise EvalError(f"{flag} must be a JSON object, e.g. '{{\"num_anchors\": 512}}' ({exc})") from None
    if not isinstance(parsed, dict):
        raise EvalError(f"{flag} must be a JSON object, got {type(parsed).__name__}")
    return parsed


def stitch_markdown(report: Dict[str, Any]) -> str:
    r = report["retrieval"]
    rows = [[d, r[f"{d}/recall@1"], r[f"{d}/recall@5"], r[f"{d}/recall@10"], r[f"{d}/mean_rank"],
             r[f"{d}/median_rank"]] for d in ("a2b", "b2a")]
    text = (f"# Stitching: {report['source']['name']} ({report['source']['layer_name']}) → "
            f"{report['target']['name']} ({report['target']['layer_name']})\n\n"
            f"N = {report['n']} held-out pairs ({report['unique_captions']} distinct captions), method: "
            f"{report['config']['method']['kind']}, device {report['device']}, seed {report['seed']}.\n\n"
            "## Retrieval (a2b = stitched source → target; same-caption items count as correct)\n\n"
            + reports.markdown_table(["direction", "R@1", "R@5", "R@10", "mean rank", "median rank"], rows)
            + f"\nMean cosine of true pairs: {r['mean_cosine']:.4f}\n")
    if "loss" in report:
        text += f"\nObjective ({report['config']['method'].get('objective', {}).get('name')}): " \
                f"{report['loss']['value']:.4f} (batches of {report['loss']['batch_size']})\n"
    rows = []
    for metric, both in report["alignment"].items():
        for which in ("stitched", "raw"):
            c = both[which]
            rows.append([metric, "stitched source vs target" if which == "stitched" else "raw source vs target",
                         c["score"], c["chance"], c["null_mean"], c["calibrated"],
                         reports.interval(c["ci_low"], c["ci_high"])])
    settings = report.get("settings", {})
    text += (f"\n## Alignment\n\nk = {settings.get('k')}, {clamp_note(settings.get('outlier_quantile'))}.\n\n"
             + reports.markdown_table(["metric", "features", "score", "chance", "null mean", "calibrated", "95% CI"],
                                      rows))
    zs = report.get("zero_shot")
    if zs:
        if "skipped" in zs:
            text += f"\n## Zero-shot classification\n\nSkipped: {zs['skipped']}.\n"
        else:
            text += (f"\n## Zero-shot classification\n\nPrompt {zs['prompt']!r}, {len(zs['classes'])} classes, "
                     f"N = {zs['n']}: accuracy **{zs['accuracy']:.4f}** (stitched image features) vs chance "
                     f"{zs['chance_uniform']:.4f} (uniform) / {zs['chance_majority']:.4f} (majority class)"
                     + (f"; the captions themselves reach {zs['caption_accuracy']:.4f}" if "caption_accuracy" in zs
                        else "") + ".\n")
    return text


def _tensorboard_dir(args: argparse.Namespace) -> Optional[Path]:
    if args.tensorboard == "none":
        return None
    if args.tensorboard != "auto":
        return Path(args.tensorboard)
    if args.ckpt is not None:
        ckpt = Path(args.ckpt).resolve()
        # runs/<name>/lightning_logs/version_N/checkpoints/x.ckpt -> runs/<name>/lightning_logs/version_N/evaluate
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        return run_dir / "evaluate"
    return Path(args.out) / "tensorboard"


def _log_tensorboard(log_dir: Path, report: Dict[str, Any], markdown: str, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        for key, value in report["retrieval"].items():
            writer.add_scalar(f"eval/{key}", value, step)
        if "loss" in report:
            writer.add_scalar("eval/loss", report["loss"]["value"], step)
        for metric, both in report["alignment"].items():
            for which, c in both.items():
                writer.add_scalar(f"eval/{metric}/{which}", c["score"], step)
                if c.get("calibrated") is not None:
                    writer.add_scalar(f"eval/{metric}/{which}_calibrated", c["calibrated"], step)
        zs = report.get("zero_shot") or {}
        if "accuracy" in zs:
            writer.add_scalar("eval/zero_shot_accuracy", zs["accuracy"], step)
        writer.add_text("eval/report", markdown, step)
    finally:
        writer.close()


# ---- command line -------------------------------------------------------------------------------------

def _settings_from_args(args: argparse.Namespace) -> ScoreSettings:
    from prh_stitch.metrics.outliers import check_quantile

    for flag, value, low in (("--k", args.k, 1), ("--permutations", args.permutations, 0),
                             ("--bootstrap", args.bootstrap, 0), ("--max-null", args.max_null, 0)):
        if value < low:
            raise EvalError(f"{flag} must be >= {low}, got {value}")
    try:
        quantile = check_quantile(args.outlier_quantile, "--outlier-quantile")
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    return ScoreSettings(metrics=check_metrics(_split_list(args.metrics)), k=args.k, permutations=args.permutations,
                         bootstrap=args.bootstrap, max_null=args.max_null, seed=args.seed, outlier_quantile=quantile)


def _inputs_from_args(args: argparse.Namespace) -> Tuple[torch.device, List[str], Path, Extraction]:
    """Device, shard URLs, cache root and extraction settings shared by ``stitch`` and ``align``."""
    from prh_stitch.data.features import FeatureStore
    from prh_stitch.data.shards import expand_urls

    device = pick_device(args.device)
    urls = expand_urls(args.data)
    root = cache_root(args.cache_dir)
    return device, urls, root, Extraction(FeatureStore(root / "features", args.feature_dtype), device,
                                          args.batch_size, args.num_workers, not args.no_progress)


def _common(parser: argparse.ArgumentParser, data: bool = True) -> None:
    if data:
        parser.add_argument("--data", required=True, help="shard pattern of held-out image–caption pairs "
                            "(brace ranges, globs, folders, pipe: URLs; several joined by ',')")
        parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help="comma list of alignment metrics (prh_stitch.metrics.METRICS)")
    parser.add_argument("--k", type=int, default=10, help="neighbours for kNN metrics and CKNNA (the paper: 10)")
    parser.add_argument("--permutations", type=int, default=20, help="permutation-null draws per headline score")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per headline score")
    parser.add_argument("--max-null", type=int, default=5,
                        help="permutation draws of the max over layer pairs (align; 0 = skip)")
    parser.add_argument("--outlier-quantile", type=float, default=None, metavar="Q",
                        help="clamp each layer's features to ±(the Q quantile of |x|) before scoring alignment, as "
                             "the paper's code does with 0.95 (not retrieval); default: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--cache-dir", default=None, help="feature store and score cache (default $PRH_STITCH_CACHE)")
    parser.add_argument("--feature-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size for feature extraction")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for extraction")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    stitch = commands.add_parser("stitch", help="evaluate a trained stitcher or a baseline on held-out pairs")
    stitch.add_argument("--ckpt", default=None, help="checkpoint of a trained stitcher (train.py)")
    stitch.add_argument("--baseline", default=None, help="a training-free baseline (prh_stitch.baselines.BASELINES)")
    stitch.add_argument("--baseline-options", default=None, help="JSON object of baseline options")
    stitch.add_argument("--anchors", default=None, help="--baseline: shard pattern of anchor pairs")
    stitch.add_argument("--source", default=None, help="source encoder (checked against the checkpoint's)")
    stitch.add_argument("--target", default=None, help="target encoder (checked against the checkpoint's)")
    stitch.add_argument("--source-layer", type=int, default=-1, help="--baseline: source layer")
    stitch.add_argument("--target-layer", type=int, default=-1, help="--baseline: target layer")
    stitch.add_argument("--source-pooling", default=None, help="--baseline: source pooling")
    stitch.add_argument("--target-pooling", default=None, help="--baseline: target pooling")
    stitch.add_argument("--prompt", default="a photo of a {}", help="zero-shot class prompt; {} is the class name")
    stitch.add_argument("--loss-batch-size", type=int, default=256, help="batch size for the objective's loss")
    stitch.add_argument("--tensorboard", default="auto",
                        help="TensorBoard folder; auto = next to the training run (…/version_N/evaluate); none")
    _common(stitch)
    stitch.set_defaults(func=cmd_stitch)

    align = commands.add_parser("align", help="layer × layer alignment between models (the paper's measurement)")
    align.add_argument("--vision", default="", help="comma list of image encoders (built-ins or timm:NAME)")
    align.add_argument("--text", default="", help="comma list of text encoders (built-ins or hf:ID)")
    align.add_argument("--pairs", default="vt", help="vt (vision–text, default), vv, tt, a comma list, or all")
    _common(align)
    align.set_defaults(func=cmd_align)

    study = commands.add_parser("study", help="the convergence study: alignment against competence")
    study.add_argument("--config", required=True, help="study YAML (configs/study_offline.yaml)")
    study.add_argument("--out", default=None, help="report folder (default: the config's out)")
    study.add_argument("--device", default=None, help="override the config's device")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    study.set_defaults(func=_cmd_study)

    # Listed here for --help; its options belong to prh_stitch.layer_stitch's own parser (see main()).
    commands.add_parser("layer-sweep", add_help=False,
                        help="stitching penalty of every cut (A's layer i into B's layer j), with a heatmap")
    return parser


def _cmd_study(args: argparse.Namespace) -> int:
    from prh_stitch.study import run_study

    return run_study(args.config, out=args.out, device=args.device, progress=not args.no_progress)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``evaluate.py``; returns the exit status (2 for bad input, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["layer-sweep"]:
        from prh_stitch.layer_stitch import main_sweep

        return main_sweep(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its own "evaluate.py: error: ..." line
        return int(exc.code or 0)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if os.environ.get("PRH_STITCH_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"evaluate.py: error: {message}", file=sys.stderr)
        return 2
