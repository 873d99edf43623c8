"""The stitch report as markdown, and its numbers as TensorBoard scalars next to the training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from prh_stitch import reports
from prh_stitch.alignment.settings import clamp_note
from prh_stitch.evaluation.splits import split_lines


def stitch_markdown(report: Dict[str, Any]) -> str:
    r = report["retrieval"]
    rows = [[d, r[f"{d}/recall@1"], r[f"{d}/recall@5"], r[f"{d}/recall@10"], r[f"{d}/mean_rank"],
             r[f"{d}/median_rank"]] for d in ("a2b", "b2a")]
    text = (f"# Stitching: {report['source']['name']} ({report['source']['layer_name']}) → "
            f"{report['target']['name']} ({report['target']['layer_name']})\n\n"
            f"N = {report['n']} held-out pairs ({report['unique_captions']} distinct captions), method: "
            f"{report['config']['method']['kind']}, device {report['device']}, seed {report['seed']}.\n\n"
            + ("\n".join(split_lines(report["split"])) + "\n\n" if "split" in report else "")
            + "## Retrieval (a2b = stitched source → target; same-caption items count as correct)\n\n"
            + reports.markdown_table(["direction", "R@1", "R@5", "R@10", "mean rank", "median rank"], rows)
            + f"\nMean cosine of true pairs: {r['mean_cosine']:.4f}\n")
    subsets = r.get("subsets", {})
    if subsets:
        rows = [[name, s["n"], s["distinct"], s["a2b/recall@1"], s["chance@1"], s["a2b/recall@5"], s["chance@5"],
                 s["b2a/recall@1"]] for name, s in subsets.items() if s["n"]]
        text += ("\n### Seen and unseen captions (seen = the exact caption occurs in the training split)\n\n"
                 "Chance is exact for a uniformly random ranking with same-caption items correct "
                 "(Σ|g|²/N² at k = 1; queries are ranked against all N items).\n\n"
                 + reports.markdown_table(["captions", "pairs", "distinct", "R@1 a2b", "chance@1", "R@5 a2b",
                                           "chance@5", "R@1 b2a"], rows))
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
    methods = sorted({both[w].get("interval_method") or "none" for both in report["alignment"].values()
                      for w in ("stitched", "raw")})
    text += (f"\n## Alignment\n\nk = {settings.get('k')}, {clamp_note(settings.get('outlier_quantile'))}, "
             f"{settings.get('permutations')} permutations; 95% intervals: {'; '.join(methods)}.\n\n"
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


def tensorboard_dir(tensorboard: str, ckpt: Optional[str], out: str) -> Optional[Path]:
    """Where the scalars go: ``none`` = nowhere; ``auto`` = next to the training run that wrote ``ckpt``
    (``…/version_N/evaluate``), else ``OUT/tensorboard``; anything else is the folder itself."""
    if tensorboard == "none":
        return None
    if tensorboard != "auto":
        return Path(tensorboard)
    if ckpt is not None:
        path = Path(ckpt).resolve()
        # runs/<name>/lightning_logs/version_N/checkpoints/x.ckpt -> runs/<name>/lightning_logs/version_N/evaluate
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir / "evaluate"
    return Path(out) / "tensorboard"


def log_tensorboard(log_dir: Path, report: Dict[str, Any], markdown: str, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        for key, value in report["retrieval"].items():
            if key == "subsets":
                for name, subset in value.items():
                    for sub_key, sub_value in subset.items():
                        if sub_value == sub_value:  # NaN (an empty subset) is not a scalar worth plotting
                            writer.add_scalar(f"eval/{name}/{sub_key}", sub_value, step)
                continue
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
