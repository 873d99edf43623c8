"""``evaluate.py translate``: features from the store, the protocol, one report (JSON, markdown, CSV) and the
unsupervised map saved as an ordinary stitcher folder (``stitcher/``: config.json + model.safetensors)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

from prh_stitch import reports
from prh_stitch.translation.protocol import TranslationOutcome, run_protocol

CSV_FIELDS = ("method", "n", "top1", "top5", "mean_rank", "median_rank", "b2a_top1", "b2a_mean_rank", "mean_cosine",
              "mean_cosine_all_pairs", "fraction_of_ridge@1")
PROTOCOL = ("unpaired halves: the train series' rows are split (seeded) into two disjoint halves; the unsupervised "
            "fit sees source features of half A and target features of half B (shuffled), never a pair. Held-out "
            "evaluation on n pairs of the evaluation series that no fit saw: each translated source row queries all n "
            "target rows by cosine (a2b), and each target row all translated rows (b2a). Upper bound: supervised "
            "ridge (affine, standardised input) fitted on half A's pairs, its strength/gain/whitening chosen on half "
            "B's pairs. Reference: orthogonal Procrustes fitted on half A's pairs in the unsupervised method's own "
            "frames (the best its function class does). Chance: top-1 = 1/n, mean rank = (n + 1)/2.")


@dataclass
class TranslationReport:
    report: Dict[str, Any]
    outcome: TranslationOutcome

    def write(self, out: str, folder_config: Dict[str, Any]) -> Path:
        """``translate.json``, ``translate.md``, ``translate.csv`` and ``stitcher/`` (atomically, as a whole)."""
        from prh_stitch.atomic import atomic_folder
        from prh_stitch.model_folder import HubStitcher

        hub = HubStitcher(**self.outcome.stitcher.config())
        hub.load_state_dict(self.outcome.stitcher.state_dict(), strict=True)
        hub.folder_config = folder_config
        hub._hub_mixin_config = folder_config
        with atomic_folder(out) as tmp:
            reports.write_json(tmp / "translate.json", self.report)
            reports.write_text(tmp / "translate.md", translation_markdown(self.report))
            reports.write_csv(tmp / "translate.csv", csv_rows(self.report), CSV_FIELDS)
            hub.save_pretrained(tmp / "stitcher")
        return Path(out)


def csv_rows(report: Dict[str, Any]):
    for method, s in report["scores"].items():
        yield {"method": method, "n": report["n"], "top1": s.get("a2b/recall@1"), "top5": s.get("a2b/recall@5"),
               "mean_rank": s.get("a2b/mean_rank"), "median_rank": s.get("a2b/median_rank"),
               "b2a_top1": s.get("b2a/recall@1"), "b2a_mean_rank": s.get("b2a/mean_rank"),
               "mean_cosine": s.get("mean_cosine"), "mean_cosine_all_pairs": s.get("mean_cosine_all_pairs"),
               "fraction_of_ridge@1": s.get("fraction_of_ridge@1")}


def translation_markdown(report: Dict[str, Any]) -> str:
    rows = [[r["method"], r["top1"], r["top5"], r["mean_rank"], r["b2a_top1"], r["mean_cosine"],
             r["mean_cosine_all_pairs"]] for r in csv_rows(report)]
    data = report["data"]
    u = report["info"]["unsupervised"]
    fraction = report["scores"]["unsupervised"].get("fraction_of_ridge@1")
    return (f"# Translation without pairs: {report['source']['name']} → {report['target']['name']}\n\n"
            f"Data `{data['kind']}` ({data['folder']}): train series {data['n_train_rows']} rows → two disjoint halves "
            f"of {report['info']['half_a']} (source side) and {report['info']['half_b']} (target side); evaluation on "
            f"N = {report['n']} held-out pairs of the evaluation series. Seed {report['seed']}.\n\n"
            f"Protocol: {PROTOCOL}\n\n"
            + reports.markdown_table(["method", "top-1", "top-5", "mean rank", "top-1 b2a", "mean cos (true pairs)",
                                      "mean cos (all pairs)"], rows)
            + f"\nUnsupervised top-1 is {reports.fmt(fraction, 3)} of the supervised ridge's. Fit: common dim "
              f"{u['dim']}, matched cosine {u['matched_cosine']:.4f} after {u['refinement_steps']} refinement steps "
              f"(restart {u['chosen_restart']} of {len(u['restarts'])}); relative distance of its rotation to the "
              f"paired Procrustes rotation {report['info']['rotation_vs_paired']:.3f}. {report['seconds']:.1f} s.\n")


def _side_features(ex, spec, urls_train, urls_eval):
    from prh_stitch.alignment.features import load_features
    from prh_stitch.encoders import encoder_from_spec

    encoder = encoder_from_spec(spec)
    layer = encoder.resolve_layer(spec.layer)
    sets = [load_features(ex, encoder, urls, spec.pooling, [layer]) for urls in (urls_train, urls_eval)]
    record = {"name": spec.name, "modality": encoder.modality, "layer": spec.layer, "pooling": spec.pooling,
              "layer_name": encoder.layer_names[layer],
              "fingerprint": encoder.fingerprint([spec.layer], spec.pooling)}
    return sets, record


def _aligned(a, b):
    from prh_stitch.data.features import align_by_key

    ia, ib = align_by_key(a, b)
    return next(iter(a.features.values()))[ia].float(), next(iter(b.features.values()))[ib].float()


def translate(source: Union[str, Dict[str, Any]], target: Union[str, Dict[str, Any]], out: str,
              data: str = "scenes", n_train: int = 1024, n_eval: int = 1024, image_size: int = 224,
              data_seed: int = 0, n: Optional[int] = 1024, seed: int = 0,
              unsupervised: Optional[Dict[str, Any]] = None, device: Optional[str] = "auto",
              cache_dir: Optional[str] = None, batch_size: int = 64, progress: bool = True) -> TranslationReport:
    """Learn a map between two encoders without pairs and score it on held-out pairs.

    Args:
        source: source encoder (a name, or a spec: name, layer, pooling, ...)
        target: target encoder (same forms)
        out: report folder (translate.json, translate.md, translate.csv, stitcher/)
        data: scenes, scenes_reworded or fashion_mnist (see prh_stitch.translation.data)
        n_train: rows of the train series (split into two unpaired halves)
        n_eval: rows of the evaluation series (held-out pairs)
        image_size: scene image side in pixels
        data_seed: seed of the scenes and of the rewording
        n: evaluation pairs N (a seeded subset of the evaluation series; null = all)
        seed: seed of the halves, the evaluation subset and the method
        unsupervised: options of the method (dim, whiten, coarse, init, sample, clusters, epsilon, select, restarts,
            iterations, keep, batch)
        device: where encoders run if the store lacks their features (auto, cpu, cuda, ...)
        cache_dir: feature store root (default $PRH_STITCH_CACHE)
        batch_size: encoder batch size for extraction
        progress: progress bars
    """
    from prh_stitch.alignment.settings import Inputs
    from prh_stitch.closed_form.unsupervised import UnsupervisedOptions
    from prh_stitch.encoders import EncoderSpec
    from prh_stitch.translation.data import ensure_translation_data

    started = time.perf_counter()
    options = UnsupervisedOptions.coerce({"seed": seed, **(unsupervised or {})})
    inputs = Inputs(device=device, cache_dir=cache_dir, batch_size=batch_size, progress=progress)
    ex = inputs.extraction()
    series = ensure_translation_data(inputs.root() / "translate", data, n_train, n_eval, data_seed, image_size)
    specs = {"source": EncoderSpec.coerce(source), "target": EncoderSpec.coerce(target)}
    (sa_train, sa_eval), record_a = _side_features(ex, specs["source"], series["train"], series["eval"])
    (sb_train, sb_eval), record_b = _side_features(ex, specs["target"], series["train"], series["eval"])
    from prh_stitch.translation.protocol import SideFeatures

    xa, yb = _aligned(sa_train, sb_train)
    xe, ye = _aligned(sa_eval, sb_eval)
    outcome = run_protocol(SideFeatures(xa, xe), SideFeatures(yb, ye), n=n, seed=seed, options=options)
    report = {"source": record_a, "target": record_b, "n": outcome.info["n"], "seed": seed, "protocol": PROTOCOL,
              "data": {"kind": data, "folder": series["folder"], "n_train_rows": len(xa), "n_eval_rows": len(xe),
                       "train": [str(u) for u in series["train"]], "eval": [str(u) for u in series["eval"]]},
              "scores": outcome.scores, "info": outcome.info, "seconds": time.perf_counter() - started,
              "device": str(ex.device)}
    return TranslationReport(report, outcome)


def folder_config(report: Dict[str, Any], specs: Dict[str, Any]) -> Dict[str, Any]:
    """The stitcher folder's config.json: what load_stitcher and the model card read."""
    from prh_stitch import __version__
    from prh_stitch.model_folder import FOLDER_FORMAT

    return reports.to_jsonable({
        "format": FOLDER_FORMAT, "library": "prh_stitch", "version": __version__,
        "stitcher": None, "source": specs["source"], "target": specs["target"],
        "source_layer": report["source"]["layer_name"], "target_layer": report["target"]["layer_name"],
        "source_fingerprint": report["source"]["fingerprint"], "target_fingerprint": report["target"]["fingerprint"],
        "objective": {"name": "none (unsupervised translation)", "options": {}},
        "fit": {"method": "unsupervised", "init": None, "closed_form": {"method": "unsupervised",
                                                                         "unsupervised": report["info"]["unsupervised"]}},
        "data": {"train": report["data"]["folder"] + " (train, unpaired halves)", "choices_made_on": "none"},
        "checkpoint": None, "test": {"split": "eval", "retrieval": report["scores"]["unsupervised"]},
    })


def write_translation(result: TranslationReport, out: str, source, target) -> Path:
    from prh_stitch.encoders import EncoderSpec

    config = folder_config(result.report, {"source": EncoderSpec.coerce(source).to_dict(),
                                           "target": EncoderSpec.coerce(target).to_dict()})
    config["stitcher"] = result.outcome.stitcher.config()
    return result.write(out, config)


def summary_line(report: Dict[str, Any]) -> str:
    s = report["scores"]
    return (f"N = {report['n']}: unsupervised top-1 {s['unsupervised']['a2b/recall@1']:.4f} (mean rank "
            f"{s['unsupervised']['a2b/mean_rank']:.1f}), ridge {s['ridge (supervised)']['a2b/recall@1']:.4f}, chance "
            f"{s['chance']['a2b/recall@1']:.4f}")

