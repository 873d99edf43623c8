"""``python evaluate.py study --config configs/study_*.yaml``: does alignment rise with competence?

A study config lists vision and text encoders, one or more datasets, the metrics and the competence of the
models (published numbers such as ImageNet top-1, or measured: bits per byte of causal LMs on the captions).
For every dataset it runs the ``align`` measurement (every layer pair of every vision–text pair, calibrated),
then, per metric, relates each model's alignment (its best layer pair, averaged over its partners of the other
modality) to its competence: Pearson and Spearman correlations, Spearman's with an interval from the model
rankings that half-sample rescoring does not rule out (:mod:`~prh_stitch.alignment.ranking_interval`), the exact
permutation p over models, a scatter plot, and one plain sentence.

Resuming: features live in the feature store (per encoder and dataset) and every pair's scores in the score
cache, so an interrupted study picks up where it stopped and a finished one reruns in seconds.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from prh_stitch import reports
from prh_stitch.alignment import competence as comp
from prh_stitch.alignment import protocol as protocols
from prh_stitch.alignment import study_power
from prh_stitch.alignment.align import Model, extract_models, parse_pairs, score_models
from prh_stitch.alignment.features import Extraction, encoder_record
from prh_stitch.alignment.report import alignment_outputs
from prh_stitch.alignment.score_cache import ScoreCache
from prh_stitch.alignment.settings import Inputs, ScoreSettings, pick_device
from prh_stitch.alignment.study_competence import probe_competence, published_table
from prh_stitch.alignment.study_matrix import conclusion, paper_figure
from prh_stitch.alignment.study_report import study_markdown
from prh_stitch.alignment.study_config import CompetenceBlock, DataBlock, StudyConfig, load_config
from prh_stitch.atomic import atomic_folder
from prh_stitch.figure_cache import Drawing, figure_cache
from prh_stitch.errors import UserError


# ---- data ---------------------------------------------------------------------------------------------

class DatasetMissing(UserError):
    """An optional dataset of the study is not installed: the study notes it and goes on."""


def resolve_data(block: DataBlock, root: Path) -> List[str]:
    """Shard URLs of a data block (built-in datasets written into the cache once)."""
    from prh_stitch.data.shards import ensure_scene_shards, expand_urls

    if block.shards is not None:
        return expand_urls(block.shards)
    if block.scenes is not None:
        s = block.scenes
        if s.split == "test":
            from prh_stitch.data.shards import ensure_scene_splits

            counts = {"train": s.n_train, "val": s.n_val, "test": s.n}
            return expand_urls(ensure_scene_splits(root / "scenes", counts, seed=s.seed, size=s.image_size)["test"])
        _, val = ensure_scene_shards(root / "scenes", s.n_train, s.n, seed=s.seed, size=s.image_size)
        return expand_urls(val)
    return _fashion_mnist_shards(block, root)


def _fashion_mnist_shards(block: DataBlock, root: Path) -> List[str]:
    import json
    import os
    import shutil
    import uuid

    from prh_stitch.data.shards import expand_urls, manifest_path, write_shards
    from prh_stitch.data.sources import SOURCES, fashion_mnist_dir

    fm = block.fashion_mnist
    folder = root / "fashion_mnist" / f"{fm.split}-{fm.n}"
    manifest = manifest_path(folder, fm.split)
    if manifest.is_file():
        return expand_urls(str(folder / json.loads(manifest.read_text())["pattern"]))
    try:
        samples = SOURCES.get("fashion_mnist")(split=fm.split, limit=fm.n)
    except ValueError as exc:
        if block.optional:
            raise DatasetMissing(f"{block.name}: skipped (dataset not installed): Fashion-MNIST is not in "
                                 f"{fashion_mnist_dir()} (apt-get install dataset-fashion-mnist)") from None
        raise UserError(str(exc)) from None
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write_shards(samples, tmp, prefix=fm.split, samples_per_shard=1000, source="fashion_mnist",
                     image_format="png")  # lossless: 28 px images would lose their only signal to JPEG
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return expand_urls(str(folder / json.loads(manifest.read_text())["pattern"]))


# ---- competence ---------------------------------------------------------------------------------------

def competence_values(block: CompetenceBlock, models: List[Model], feature_sets: Dict[str, Any], device,
                      cache: ScoreCache, definition: str = "pooled") -> Tuple[Dict[str, float], List[str]]:
    """Competence per model label, and a note for each model left out (no score, or not a causal LM).

    ``definition``: the bits-per-byte definition of the study's protocol (``pooled`` or ``per_caption``).
    """
    values: Dict[str, float] = {}
    excluded: List[str] = []
    if block.measure == "bits_per_byte":
        for m in models:
            captions = feature_sets[m.label].captions
            # "loader": 2 since a checkpoint missing LM-head weights is refused (it once got a random head's score)
            identity = {"bpb": m.spec.to_dict(), "data": encoder_record(feature_sets[m.label]), "loader": 2}
            if definition != "pooled":  # the pooled key is the one written before definitions were named
                identity["definition"] = definition
            key = cache.key(identity)
            hit = cache.get(key)
            if hit is None:
                try:
                    model, tokenizer = comp.load_causal_lm(m.spec.name, device)
                except ValueError as exc:
                    excluded.append(f"{m.label}: {exc}")
                    continue
                hit = comp.bits_per_byte(model, tokenizer, captions, device=device, definition=definition)
                cache.put(key, hit)
            values[m.label] = hit["bits_per_byte"]
        return values, excluded
    table, _ = published_table(block, models[0].modality if models else "vision")
    for m in models:
        if m.label in table:
            values[m.label] = float(table[m.label])
        else:
            excluded.append(f"{m.label}: no {block.label} given")
    return values, excluded


def _average(values: List[List[float]]) -> List[float]:
    return [sum(col) / len(col) for col in zip(*values)]


def competence_analysis(side: str, block: CompetenceBlock, models: List[Model], values: Dict[str, float],
                        records: List[Dict], metric: str, out: Path, dataset: str,
                        key: Optional[str] = None) -> Dict[str, Any]:
    """Points (model, competence, alignment), correlations with intervals, a sentence and a scatter plot."""
    points = []
    reps_best: List[List[float]] = []
    reps_last: List[List[float]] = []
    for m in models:
        if m.label not in values:
            continue
        mine = [r for r in records if r["metric"] == metric and m.label in (r["model_a"], r["model_b"])
                and r["kind"] == "vision-text"]
        if not mine:
            continue
        best = sum(r["score"] for r in mine) / len(mine)
        point = {"model": m.label, "competence": values[m.label], "score": best,
                 "last": sum(r["last"]["score"] for r in mine) / len(mine),
                 "max_calibrated": _mean_or_none([r.get("max_calibrated") for r in mine]),
                 # Over the partners with a contextual layer left (a static word-vector model has none).
                 "contextual": _mean_or_none([(r.get("contextual") or {}).get("score") for r in mine]),
                 "partners": [r["model_b"] if r["model_a"] == m.label else r["model_a"] for r in mine],
                 "layers": [[r["layer_a_name"], r["layer_b_name"]] for r in mine]}
        if len(mine) == 1:  # the interval of the score itself: the selection-aware half-sample one
            point.update(ci_low=mine[0]["ci_low"], ci_high=mine[0]["ci_high"])
        if all("half_samples" in r for r in mine):
            reps_best.append(_average([r["half_samples"]["best"] for r in mine]))
            reps_last.append(_average([r["half_samples"]["last"] for r in mine]))
            if len(mine) > 1:
                import torch

                q = torch.quantile(torch.tensor(reps_best[-1], dtype=torch.float64),
                                   torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
                point.update(ci_low=q[0] + best - sum(reps_best[-1]) / len(reps_best[-1]),
                             ci_high=q[1] + best - sum(reps_best[-1]) / len(reps_best[-1]))
        points.append(point)
    xs = [p["competence"] for p in points]
    transpose = (lambda reps: [list(r) for r in zip(*reps)]) if len(reps_best) == len(points) else (lambda _: None)
    best = comp.correlation_report(xs, [p["score"] for p in points], transpose(reps_best))
    last = comp.correlation_report(xs, [p["last"] for p in points], transpose(reps_last))
    with_ctx = [p for p in points if p["contextual"] is not None]
    contextual = comp.correlation_report([p["competence"] for p in with_ctx], [p["contextual"] for p in with_ctx])
    sentence = comp.trend_sentence(best, block.higher_is_better, block.label)
    chance = next((r.get("chance") for r in records if r["metric"] == metric), None)
    figure = None
    if points:
        figure = Drawing(reports.competence_scatter, (
            points, block.label, metric, chance,
            f"{dataset}: {metric} (best layer pair, the paper's max) vs {block.label}",
            _wrap(sentence)))
        from prh_stitch.report_board import report_board

        with report_board(out) as board:  # beside the align report's figures of this dataset
            figure = reports.save_figure(figure, out / f"competence_{metric}_{key or side}.png", board,
                                         f"competence/{metric}/{key or side}").name
    return {"side": side, "metric": metric, "competence": block.label, "higher_is_better": block.higher_is_better,
            "points": points, "correlation_best": best, "correlation_last": last,
            "correlation_contextual": contextual,
            "sentence_contextual": comp.trend_sentence(contextual, block.higher_is_better, block.label),
            "sentence": sentence,
            "figure": figure,
            "interval_method": "scores: half-samples, the best layer pair re-selected in each half (same halves for "
                               "every model); Spearman's rho: " + (best.get("interval_method") or "none")}


def _mean_or_none(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _wrap(text: str, width: int = 95) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


# ---- run ----------------------------------------------------------------------------------------------

def run_study(config: Union[str, Path, Mapping[str, Any], StudyConfig], out: Optional[str] = None,
              device: Optional[str] = None, progress: bool = True, config_file: Optional[str] = None,
              notify: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Run the study of ``config`` (a YAML path or shipped name, a mapping, or a StudyConfig); return its summary.

    Reports go to ``out`` (default: the config's ``out``): ``study.md``, ``study.json`` (the summary returned
    here) and, per dataset, the align report and the competence figures. ``config_file`` is recorded in the
    reports (default: ``config`` when it is a path). Before anything is computed, the study's power over models
    (:func:`~prh_stitch.alignment.study_power.power_statement`) is passed to ``notify`` (the CLI prints it).
    """
    started = time.perf_counter()
    cfg = load_config(config)
    config_file = config_file or _config_name(config)
    settings = ScoreSettings(metrics=tuple(cfg.metrics), k=cfg.k, permutations=cfg.permutations,
                             bootstrap=cfg.bootstrap, max_null=cfg.max_null, half_samples=cfg.half_samples,
                             seed=cfg.seed, outlier_quantile=cfg.outlier_quantile, protocol=cfg.protocol).checked()
    kinds = parse_pairs(cfg.pairs)
    inputs = Inputs(device or cfg.device, cfg.cache_dir, cfg.feature_dtype, cfg.batch_size, cfg.num_workers, progress)
    dev, root = pick_device(inputs.device), inputs.root()
    out_dir = Path(out or cfg.out)
    models = [Model(s.name, s, "vision") for s in cfg.vision] + [Model(s.name, s, "text") for s in cfg.text]
    if len({m.label for m in models}) != len(models):
        raise UserError("an encoder is listed twice in the study config")
    protocols.check_poolings(models, settings.protocol)
    power = study_power_of(cfg, models)
    for statement in power:
        (notify or (lambda _: None))(f"power: {statement['sentence']}")
    # Every dataset's report and study.md/.json replace the folder at once; figures of unchanged scores are reused.
    with figure_cache(root / "figures"), atomic_folder(out_dir) as folder:
        return _run_datasets(cfg, config_file, settings, kinds, models, inputs.extraction(), root, dev, folder,
                             started, power)


def _run_datasets(cfg: StudyConfig, config_file: Optional[str], settings: ScoreSettings, kinds, models: List[Model],
                  ex: Extraction, root: Path, dev, out_dir: Path, started: float,
                  power: List[Dict[str, Any]]) -> Dict[str, Any]:
    run = StudyRun(cfg, settings, kinds, models, ex, ScoreCache(root / "scores"), out_dir)
    datasets, notes = [], []
    for block in cfg.data:
        try:
            urls = resolve_data(block, root)
        except DatasetMissing as missing:
            notes.append(str(missing))
            continue
        datasets.append(run.dataset(block, urls, config_file))
        if cfg.binding is not None and block.scenes is not None:  # the binding test (alignment/binding.py)
            from prh_stitch.alignment.binding_report import binding_table

            datasets[-1]["binding"] = binding_table(cfg.binding, block.scenes, models, run.ex, run.cache, root,
                                                    out_dir / block.name)
    if not datasets:
        raise UserError("no dataset of the study could be read: " + "; ".join(notes))
    summary = {
        **reports.provenance("study", _config_dict(cfg, config_file), str(dev), cfg.seed, {}, settings=asdict(settings),
                             protocol=protocols.describe(settings)),
        "power": power,
        "vision_models": [m.label for m in models if m.modality == "vision"],
        "text_models": [m.label for m in models if m.modality == "text"],
        "datasets": [{k: v for k, v in d.items() if k != "records"} | {"alignment": f"{d['name']}/alignment.json"}
                     for d in datasets],
        "notes": notes, "seconds": round(time.perf_counter() - started, 2),
    }
    summary["conclusion"] = conclusion(datasets)
    reports.write_text(out_dir / "study.md", study_markdown(summary, datasets))
    reports.write_json(out_dir / "study.json", summary)
    return summary


def study_power_of(cfg: StudyConfig, models: List[Model]) -> List[Dict[str, Any]]:
    """The power statement of each competence side, from the config alone (before anything is computed)."""
    out = []
    for side, block in ((b.side, b) for b in cfg.competence.values()):
        side_models = [m for m in models if m.modality == side]
        if block.measure is not None:
            out.append(study_power.power_statement(side, block.label, [0.0] * len(side_models), measured=True))
            continue
        table, _ = published_table(block, side)
        values = [float(table[m.label]) for m in side_models if m.label in table]
        out.append(study_power.power_statement(side, block.label, values))
    return out


class StudyRun:
    """One study's fixed parts (config, settings, models, extraction, cache, report folder), per dataset."""

    def __init__(self, cfg: StudyConfig, settings: ScoreSettings, kinds, models: List[Model], ex: Extraction,
                 cache: ScoreCache, out_dir: Path) -> None:
        self.cfg, self.settings, self.kinds, self.models = cfg, settings, kinds, models
        self.ex, self.cache, self.out_dir = ex, cache, out_dir
        self.probes: Dict[str, Any] = {}  # linear-probe competence per block: the same for every dataset

    def dataset(self, block: DataBlock, urls: List[str], config_file: Optional[str]) -> Dict[str, Any]:
        """Features, scores, the align report and the competence analyses of one dataset."""
        t0 = time.perf_counter()
        feature_sets = extract_models(self.models, urls, self.ex)
        t1 = time.perf_counter()
        records = score_models(self.models, feature_sets, self.kinds, self.settings, self.ex.device, self.cache,
                               self.ex.progress)
        extras = study_extras(self.models, feature_sets, records, self.cfg, self.settings, self.ex.device, self.cache)
        t2 = time.perf_counter()
        target = self.out_dir / block.name
        header = reports.provenance(
            "study", {"config_file": config_file, "data": asdict(block)}, str(self.ex.device),
            self.cfg.seed, {label: encoder_record(fs) for label, fs in feature_sets.items()},
            settings=asdict(self.settings), protocol=protocols.describe(self.settings))
        analyses = []
        for key, block_c in self.cfg.competence.items():
            side = block_c.side
            side_models = [m for m in self.models if m.modality == side]
            probes: Dict[str, Any] = {}
            if block_c.measure == "linear_probe":
                if key not in self.probes:
                    self.probes[key] = probe_competence(block_c, side_models, self.ex, self.cache)
                values, excluded, probes = self.probes[key]
            else:
                values, excluded = competence_values(block_c, side_models, feature_sets, self.ex.device, self.cache,
                                                     protocols.BITS_PER_BYTE_DEFINITION[self.settings.protocol])
            analyses += [dict(competence_analysis(side, block_c, side_models, values, records, metric, target,
                                                  block.name, key), excluded=excluded, key=key, probes=probes,
                              sources=published_table(block_c, side)[1])
                         for metric in self.settings.metrics]
        alignment_outputs(target, self.models, records, header, f"Alignment on {block.name}")
        text_labels = [m.label for m in self.models if m.modality == "text"]
        extras["paper_figures"] = [f for f in (paper_figure(a, records, text_labels, target, block.name)
                                               for a in analyses if a["side"] == "vision") if f]
        return {"name": block.name, "n": records[0]["n"], "records": records, "competence": analyses, **extras,
                "seconds": {"features": round(t1 - t0, 2), "scores": round(t2 - t1, 2),
                            "total": round(time.perf_counter() - t0, 2)}}


def study_extras(models: List[Model], feature_sets: Dict[str, Any], records: List[Dict], cfg: StudyConfig,
                 settings: ScoreSettings, device, cache: ScoreCache) -> Dict[str, Any]:
    """Per vision–text record: the best pair's stability across half-samples (``record["best_pair_stability"]``),
    and per mutual-kNN record the k × N table (``knn_grid``); both on the features exactly as scored, both cached."""
    from prh_stitch.alignment.features import layer_names, paired
    from prh_stitch.alignment.settings import clamp_layers, metric_options

    scored_sets, scoring = protocols.for_scoring(feature_sets, models, settings)
    grid = []
    for r in records:
        if r["kind"] != "vision-text" or not (cfg.stability_halves or (r["metric"] == "mutual_knn" and cfg.knn_k)):
            continue
        fa, fb = scored_sets[r["model_a"]], scored_sets[r["model_b"]]
        identity = {"a": encoder_record(fa), "b": encoder_record(fb), "metric": r["metric"], "k": settings.k,
                    "protocol": settings.protocol, "q": scoring.outlier_quantile, "seed": settings.seed,
                    "permutations": settings.permutations, "halves": cfg.stability_halves,
                    "knn_k": list(cfg.knn_k), "knn_n": list(cfg.knn_n), "study_extras": 1}
        key = cache.key(identity)
        hit = cache.get(key)
        if hit is None:
            a, b, _, _ = paired(fa, fb, device)
            names_a, names_b = layer_names(fa), layer_names(fb)
            a = clamp_layers(a, names_a, r["model_a"], scoring.outlier_quantile)
            b = clamp_layers(b, names_b, r["model_b"], scoring.outlier_quantile)
            hit = {"stability": None, "knn_grid": None}
            if cfg.stability_halves and a[0].shape[0] // 2 > settings.k + 1:
                hit["stability"] = study_power.best_pair_stability(
                    a, b, names_a, names_b, r["metric"], metric_options(r["metric"], settings.k),
                    cfg.stability_halves, settings.seed)
            if r["metric"] == "mutual_knn" and cfg.knn_k and cfg.knn_n:
                hit["knn_grid"] = study_power.knn_grid(a[r["layer_a"]], b[r["layer_b"]], cfg.knn_k, cfg.knn_n,
                                                       settings.permutations, settings.seed)
            cache.put(key, hit)
        # Its own key: scoring.py's selection-aware interval (issue #10 item 3) may add a ``stability`` field of its
        # own (all layer pairs only) to the record; this one also covers the contextual selection.
        r["best_pair_stability"] = hit["stability"]
        if hit["knn_grid"]:
            grid.append({"model_a": r["model_a"], "model_b": r["model_b"], "layer_a_name": r["layer_a_name"],
                         "layer_b_name": r["layer_b_name"], "rows": hit["knn_grid"]})
    return {"knn_grid": grid}


def _config_name(config: Any) -> Optional[str]:
    from prh_stitch.configs import shipped_config

    return str(shipped_config(config)) if isinstance(config, (str, Path)) else None


def _config_dict(cfg: StudyConfig, config_file: Optional[str]) -> Dict[str, Any]:
    d = asdict(cfg)
    d["vision"] = [s.to_dict() for s in cfg.vision]
    d["text"] = [s.to_dict() for s in cfg.text]
    d["config_file"] = config_file
    return d
