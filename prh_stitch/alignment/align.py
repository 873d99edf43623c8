"""Layer × layer alignment: every layer pair of every model pair, each model pair's best and last layers calibrated.

The measurement of the paper (max over layer pairs of mutual kNN), under a named protocol (``protocol``:
``prh_stitch``, the default, or ``paper``, the paper's clamp, layers and normalisation; see
:mod:`~prh_stitch.alignment.protocol`).

:func:`align` is the plain-Python entry point (``evaluate.py align`` and the study call it too): it returns an
:class:`AlignResult` holding one record per (model pair, metric) and, as :attr:`AlignResult.table`, the same as
a long-form table (one row per record and layer choice), and writes nothing until asked (:meth:`AlignResult.write`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from prh_stitch import reports
from prh_stitch.alignment import protocol as protocols
from prh_stitch.alignment.features import Extraction, encoder_record, load_features
from prh_stitch.alignment.report import TABLE_FIELDS, alignment_outputs, long_table
from prh_stitch.alignment.score_cache import ScoreCache
from prh_stitch.alignment.scoring import score_pair
from prh_stitch.alignment.settings import DEFAULT_METRICS, Inputs, ScoreSettings
from prh_stitch.atomic import atomic_folder
from prh_stitch.errors import UserError

MODALITIES = ("vision", "text")


@dataclass
class Model:
    label: str
    spec: Any  # EncoderSpec
    modality: str  # "vision" | "text"


def as_models(models: Mapping[str, Sequence[Any]]) -> List[Model]:
    """``{"vision": [...], "text": [...]}`` of encoder names, specs or spec dicts, as labelled models."""
    from prh_stitch.encoders import EncoderSpec

    unknown = sorted(set(models) - set(MODALITIES))
    if unknown:
        raise UserError(f"models: unknown modality {unknown}; give {{'vision': [...], 'text': [...]}}")
    out = []
    for modality in MODALITIES:
        for value in models.get(modality) or []:
            spec = EncoderSpec.coerce(value)
            out.append(Model(spec.name, spec, modality))
    if len({m.label for m in out}) != len(out):
        raise UserError("a model is listed twice in --vision/--text")
    return out


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


def parse_pairs(value: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    text = value if isinstance(value, str) else ",".join(value)
    kinds = {"all": ("vt", "vv", "tt")}.get(text, tuple(p.strip() for p in text.split(",") if p.strip()))
    bad = [k for k in kinds if k not in ("vt", "vv", "tt")]
    if bad or not kinds:
        raise UserError(f"--pairs {text!r}: use vt (vision–text), vv, tt, a comma list of those, or all")
    return kinds


def extract_models(models: Sequence[Model], urls: Sequence[str], ex: Extraction) -> Dict[str, Any]:
    """Feature sets (all layers) per model label; encoders are built one at a time and released."""
    from prh_stitch.encoders import encoder_from_spec

    feature_sets = {}
    for model in models:
        encoder = encoder_from_spec(model.spec)
        expected = "image" if model.modality == "vision" else "text"
        if encoder.modality != expected:
            raise UserError(f"{model.label!r} is a{'n' if encoder.modality == 'image' else ''} {encoder.modality} "
                            f"encoder but was listed as a {model.modality} model")
        feature_sets[model.label] = load_features(ex, encoder, urls, model.spec.pooling)
        del encoder
    return feature_sets


def score_models(models: Sequence[Model], feature_sets: Dict[str, Any], kinds: Sequence[str],
                 settings: ScoreSettings, device: torch.device, cache: ScoreCache, progress: bool) -> List[Dict]:
    """One record per (model pair, metric), scored under ``settings.protocol`` (its feature transform applied
    here); each record names its protocol and its best pair without non-contextual layers."""
    from tqdm.auto import tqdm

    from prh_stitch.alignment.layer_sets import best_without_non_contextual

    feature_sets, settings = protocols.for_scoring(feature_sets, models, settings)
    jobs = [(a, b, m) for a, b in model_pairs(models, kinds) for m in settings.metrics]
    if not jobs:
        raise UserError(f"no model pairs to score for --pairs {','.join(kinds)} (vision–text needs at least one "
                        "of each; vv/tt need two of that modality)")
    from prh_stitch.metrics.layers import PreparedLayers

    records, prepared = [], PreparedLayers()  # each model's layers prepared once, not once per partner
    for a, b, metric in tqdm(jobs, desc="scoring model pairs", disable=not progress):
        record = score_pair(a.label, feature_sets[a.label], b.label, feature_sets[b.label], metric, settings,
                            device, cache, prepared)
        record["kind"] = a.modality + "-" + b.modality
        record["protocol"] = settings.protocol
        record["contextual"] = best_without_non_contextual(record)
        records.append(record)
    return records


@dataclass
class AlignResult:
    """What :func:`align` measured: one record per (model pair, metric), with the report's header."""

    records: List[Dict[str, Any]]
    header: Dict[str, Any]
    models: List[Model] = field(default_factory=list)
    feature_sets: Dict[str, Any] = field(default_factory=dict, repr=False)
    figure_root: Optional[Path] = None  # the figure cache (None: draw every figure)

    @property
    def table(self) -> List[Dict[str, Any]]:
        """Long form: one row per record and layer choice (best, last), the columns of ``alignment.csv``."""
        return long_table(self.records)

    columns = TABLE_FIELDS

    def write(self, out: Union[str, Path], title: str = "Alignment between models") -> Dict[str, Any]:
        """alignment.json/.csv/.md and the figures under ``out``; the JSON (written last) is returned."""
        from prh_stitch.figure_cache import figure_cache

        # The folder is replaced as a whole, so its files always agree; figures of unchanged scores are reused.
        with figure_cache(self.figure_root), atomic_folder(out) as folder:
            return alignment_outputs(folder, self.models, self.records, self.header, title)


def align(models: Mapping[str, Sequence[Any]], data: Union[str, Sequence[str]],
          metrics: Union[str, Sequence[str]] = DEFAULT_METRICS, k: int = 10, *, pairs: str = "vt",
          inputs: Optional[Inputs] = None, command: str = "align", **settings: Any) -> AlignResult:
    """Score every layer pair of every model pair on ``data`` (shard patterns of image–caption pairs).

    ``models`` is ``{"vision": [...], "text": [...]}`` (encoder names or specs); ``settings`` are the other
    :class:`ScoreSettings` fields (``permutations``, ``bootstrap``, ``max_null``, ``seed``, ``outlier_quantile``,
    ``protocol``: ``"prh_stitch"`` (default) or ``"paper"``);
    ``inputs`` says where features come from (:class:`Inputs`: device, cache folder, ...). Features and scores are
    cached, so a second call on the same data reads them back.
    """
    from prh_stitch.data.shards import expand_urls

    metrics = tuple(metrics) if not isinstance(metrics, str) else metrics
    score_settings = ScoreSettings(metrics=metrics, k=k, **settings).checked()
    kinds = parse_pairs(pairs)
    chosen = as_models(models)
    inputs = inputs or Inputs()
    ex = inputs.extraction()
    urls = expand_urls(data)
    if not model_pairs(chosen, kinds):
        raise UserError(f"no model pairs to score for --pairs {','.join(kinds)}: give --vision and --text models "
                        "(or two of one modality with --pairs vv/tt)")
    protocols.check_poolings(chosen, score_settings.protocol)
    started = time.perf_counter()
    feature_sets = extract_models(chosen, urls, ex)
    records = score_models(chosen, feature_sets, kinds, score_settings, ex.device,
                           ScoreCache(inputs.root() / "scores"), inputs.progress)
    config = {"data": data if isinstance(data, str) else list(data),
              **{m: [x.label for x in chosen if x.modality == m] for m in MODALITIES}, "pairs": list(kinds)}
    header = reports.provenance(command, config, str(ex.device), score_settings.seed,
                                {label: encoder_record(fs) for label, fs in feature_sets.items()},
                                settings=asdict(score_settings), protocol=protocols.describe(score_settings),
                                seconds=round(time.perf_counter() - started, 2))
    return AlignResult(records, header, chosen, feature_sets, inputs.root() / "figures")
