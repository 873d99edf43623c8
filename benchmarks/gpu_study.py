"""The two measurements of the zoo issues that a 2-core CPU cannot make in a session, as one short GPU run.

    probe    Fashion-MNIST linear-probe top-1 of every vision model of the zoo on the full 60,000 training / 10,000
             test images: the study's own probe (``prh_stitch.alignment.study_competence.probe_competence``, the
             closed-form ridge probe of ``prh_stitch.evaluation.linear_probe``, regulariser chosen on a validation
             tenth of the training images), features extracted through the feature store on the GPU. The study
             reads the result back as recorded competence (``configs/study_zoo.yaml``, ``vision_probe_full``).
    prefix   prefix stitching EfficientNet-Lite0 -> SmolLM2-135M (``configs/prefix_smollm2.yaml``) trained on the
             GPU in bf16-mixed until its time budget, through ``train.py``; then ``evaluate.py prefix`` on the
             whole test split (1,024 scenes): caption bits per byte with the image prefix, with none and with a
             shuffled image's prefix, paired bootstrap intervals, greedy captions, attribute accuracy. The best
             checkpoint (chosen on validation bits per byte) comes back, so the test report can be recomputed on a CPU.

    python3 benchmarks/gpu_study.py --out OUT                          # on a GPU machine
    python3 benchmarks/gpu_study.py --device cpu --quick --out OUT     # every code path on a CPU, tiny sizes

Writes OUT/gpu_study.json (rewritten after each part), OUT/fashion_mnist_probe.json, OUT/prefix/ (the evaluation's
prefix.json, prefix.md, prefix_captions.csv), OUT/prefix_best.ckpt and OUT/prefix_train.log. Exit status 1 if a
check failed. Needs the zoo's mobilenet_v2 and smollm2_135m fetched (or their downloads in the zoo's downloads
folder), the efficientnet-lite0/1/2 weight packages, and Fashion-MNIST's IDX files ($PRH_STITCH_FASHION_MNIST).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import REPO, Ctx, Report  # noqa: E402  (also puts this tree's prh_stitch first on the path)

import torch  # noqa: E402

VISION = ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
          "random:efficientnet_lite0"]


def _run(cmd, log: Path, timeout: float, env=None):
    """A subprocess in its own process group (killed with its workers on timeout); (rc, output, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env or dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(timeout, 1.0))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        rc = f"killed after {timeout:.0f} s"
    log.write_text(" ".join(map(str, cmd)) + "\n\n" + output[-400_000:])
    return rc, output, time.perf_counter() - start


def _tail(r: Report, output: str, n: int = 8) -> None:
    for line in [x for x in output.strip().splitlines() if x.strip()][-n:]:
        print(f"      | {line[:220]}")


# ------------------------------------------------------------------------------------------------ probe


def part_probe(ctx: Ctx) -> None:
    from prh_stitch.alignment.align import as_models
    from prh_stitch.alignment.features import Extraction
    from prh_stitch.alignment.score_cache import ScoreCache
    from prh_stitch.alignment.study_competence import probe_competence
    from prh_stitch.alignment.study_config import CompetenceBlock, ProbeData
    from prh_stitch.data.features import FeatureStore, default_cache_dir
    from prh_stitch.encoders import encoder_from_spec

    r, args = ctx.report, ctx.args
    n_train, n_test = (256, 128) if ctx.quick else (60000, 10000)
    block = CompetenceBlock(side="vision", measure="linear_probe", label="Fashion-MNIST linear-probe top-1 (%)",
                            probe=ProbeData(n_train=n_train, n_test=n_test, val_fraction=0.1, seed=0))
    root = default_cache_dir()
    ex = Extraction(FeatureStore(root / "features", "float32"), ctx.dev, batch_size=args.batch_size,
                    num_workers=args.workers, progress=True)
    cache = ScoreCache(root / "scores")
    vision = args.vision.split(",") if args.vision else (VISION[1:] if ctx.quick else VISION)
    results = {"protocol": {"n_train": n_train, "n_test": n_test, "val_fraction": 0.1, "seed": 0,
                            "probe": "closed-form ridge on the final pooled layer (prh_stitch.evaluation.linear_probe)",
                            "device": torch.cuda.get_device_name(ctx.dev) if ctx.cuda else str(ctx.dev)},
               "models": {}}
    print(f"  Fashion-MNIST probe: {n_train} train / {n_test} test images, models {vision}, batch {args.batch_size}, "
          f"{args.workers} workers on {ctx.dev}")
    for name in vision:
        models = as_models({"vision": [name]})
        try:
            encoder_from_spec(models[0].spec)  # weights present? (an unfetched zoo model names its fetch command)
        except Exception as exc:  # noqa: BLE001
            r.check(f"{name}: weights available", False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                    warn_only=True)
            continue
        if ctx.left() < 10:
            r.check(f"{name}: probe", False, f"skipped: {ctx.left():.0f} s of the --budget left", warn_only=True)
            continue
        start = time.perf_counter()
        values, excluded, details = probe_competence(block, models, ex, cache)
        seconds = time.perf_counter() - start
        label = models[0].label
        results["models"][name] = dict(details.get(label, {}), top1_percent=values.get(label),
                                       seconds=round(seconds, 1), excluded=excluded)
        ok = r.check(f"{name}: probe top-1 measured and above chance", label in values and values[label] > 10.0 + 1.0,
                     f"{values.get(label, float('nan')):.2f} % in {seconds:.0f} s (chance 10 %)")
        if ok:
            ci = details[label].get("ci")
            print(f"      top-1 {values[label]:.2f} % (95 % interval {ci}), layer {details[label].get('layer')}, "
                  f"lambda {details[label].get('lambda')}")
        (ctx.out / "fashion_mnist_probe.json").write_text(json.dumps(results, indent=1, default=str))
    r.value("probe", results)


# ------------------------------------------------------------------------------------------------ prefix


def _ensure_language_model(ctx: Ctx, name: str) -> None:
    """Fetch a zoo LM from the downloads folder; a conversion that differs from the recorded digest is reported
    (a WARN with both digests) and installed unverified, so the run goes on: the digest is the CPU's conversion."""
    from prh_stitch.zoo.entries import get_entry
    from prh_stitch.zoo.fetch import fetch

    r = ctx.report
    try:
        fetch(name)
        r.check(f"{name}: fetched and verified (recorded sha256)", True)
    except ValueError as exc:
        r.check(f"{name}: conversion matches the recorded sha256", False, str(exc)[:300], warn_only=True)
        fetch(name, entry=dataclasses.replace(get_entry(name), sha256=None), force=True)


def _scalars(folder: Path, tag: str) -> list:
    """One TensorBoard scalar's values in step order, from every event file under ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for events in sorted(folder.glob("**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            points += [(e.step, e.value) for e in acc.Scalars(tag)]
    return [round(float(v), 5) for _, v in sorted(points)]


def part_prefix(ctx: Ctx) -> None:
    r, args, work = ctx.report, ctx.args, ctx.tmp / "prefix"
    shutil.rmtree(work, ignore_errors=True)  # a fresh run: its checkpoints and event files are the only ones there
    work.mkdir(parents=True)
    lm = "tiny_gpt2" if ctx.quick else "smollm2_135m"
    if not ctx.quick:
        _ensure_language_model(ctx, lm)
    accel = ["--trainer.accelerator", "gpu" if ctx.cuda else "cpu", "--trainer.devices", "1"]
    train = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "prefix_smollm2.yaml"),
             "--model.language_model", lm, *accel, "--trainer.default_root_dir", str(work),
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if ctx.quick:
        train += ["--data.scenes.n_train=64", "--data.scenes.n_val=32", "--data.scenes.n_test=32",
                  "--data.scenes.image_size=64", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                  "--trainer.limit_val_batches=1"]
    else:
        # Every training caption each epoch, whole-set validation (the checkpoint is chosen on it), until the
        # time budget: Lightning's max_time stops the run and the best checkpoint so far is the one reported.
        minutes, seconds = divmod(int(args.prefix_train_seconds), 60)
        train += ["--trainer.precision", "bf16-mixed", f"--data.batch_size={args.prefix_batch}",
                  f"--data.num_workers={args.workers}", "--trainer.max_epochs=1000",
                  "--trainer.limit_train_batches=1.0", "--trainer.limit_val_batches=1.0",
                  f"--trainer.max_time=00:00:{minutes:02d}:{seconds:02d}", f"--model.lr={args.prefix_lr}",
                  "--trainer.log_every_n_steps=10"]
    rc, output, seconds = _run(train, ctx.out / "prefix_train.log", timeout=min(args.prefix_train_seconds + 120,
                                                                                   ctx.left()))
    r.value("train", {"rc": rc, "seconds": round(seconds, 1), "command": " ".join(train)})
    if not r.check("train.py (prefix) exits 0", rc == 0, f"rc {rc} in {seconds:.0f} s; log prefix_train.log"):
        _tail(r, output)
        return
    best = sorted(work.glob("**/best-*.ckpt"))
    if not r.check("best checkpoint written", bool(best), str([p.name for p in best])):
        return
    ckpt = torch.load(best[-1], map_location="cpu", weights_only=True)
    epochs = ckpt.get("epoch")
    r.value("best_checkpoint", {"file": best[-1].name, "epoch": epochs, "global_step": ckpt.get("global_step"),
                                "bytes": best[-1].stat().st_size})
    # The map's weights without Adam's moments and the loop state: what evaluation and sharing need (it comes back
    # from the GPU machine, whose files are limited in size), and the copy evaluated below, so it is known to suffice.
    slim = ctx.out / "prefix_best.ckpt"
    torch.save({k: v for k, v in ckpt.items() if k not in ("optimizer_states", "lr_schedulers", "loops")}, slim)
    size = slim.stat().st_size
    r.check("the checkpoint holds the map, not the frozen LM (< 15 MiB without optimizer state)", size < 15 * 2**20,
            f"{size / 2**20:.1f} MiB (with optimizer state {best[-1].stat().st_size / 2**20:.1f} MiB)")
    if size >= 15 * 2**20:
        slim.unlink()
        slim = best[-1]
    last = sorted(work.glob("**/last.ckpt"))
    if last:
        state = torch.load(last[-1], map_location="cpu", weights_only=True)
        r.value("last_checkpoint", {"epoch": state.get("epoch"), "global_step": state.get("global_step")},
                f"trained {state.get('epoch', -1) + 1} epochs ({state.get('global_step')} steps) in {seconds:.0f} s "
                f"(process start and feature extraction included); best epoch {epochs}")
    curve = _scalars(work, "val/bits_per_byte")
    r.value("val_bits_per_byte_by_epoch", curve,
            "validation bits per byte by epoch: " + ", ".join(f"{v:.3f}" for v in curve[:6])
            + (f", ... {curve[-1]:.3f} ({len(curve)} epochs)" if len(curve) > 6 else ""))
    report = ctx.out / "prefix"
    evaluate = [sys.executable, str(REPO / "evaluate.py"), "prefix", "--ckpt", str(slim), "--out", str(report),
                "--device", str(ctx.dev), "--batch_size", "128" if ctx.cuda else "16", "--progress", "false",
                "--generate", "16" if not ctx.quick else "4"]
    if ctx.quick:
        evaluate += ["--max_captions", "16", "--bootstrap", "50"]
    rc, output, seconds = _run(evaluate, ctx.out / "prefix_evaluate.log", timeout=max(ctx.left(), 30))
    r.value("evaluate", {"rc": rc, "seconds": round(seconds, 1)})
    if not r.check("evaluate.py prefix exits 0", rc == 0, f"rc {rc} in {seconds:.0f} s"):
        _tail(r, output)
        return
    result = json.loads((report / "prefix.json").read_text())
    r.value("report", result)
    print((report / "prefix.md").read_text()[:3000])


# ------------------------------------------------------------------------------------------------ main

PARTS = {"probe": part_probe, "prefix": part_prefix}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every code path")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all parts; later models are skipped")
    p.add_argument("--vision", default=None, help=f"comma-separated vision models of the probe (default {VISION})")
    p.add_argument("--batch-size", type=int, default=256, help="images per extraction batch")
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--prefix-train-seconds", type=float, default=150.0, help="the prefix run's max_time")
    p.add_argument("--prefix-batch", type=int, default=64, help="captions per prefix training step")
    p.add_argument("--prefix-lr", type=float, default=2e-4, help="the prefix map's learning rate")
    args = p.parse_args(argv)
    if args.quick:
        args.workers = 0
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in parts if s not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "gpu_study.json", args)
    tmp = Path(os.environ.get("PRH_GPU_STUDY_TMP") or (out.parent / "gpu_study_work"))
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args, report, tmp, out)
    print(f"prh_stitch GPU study: device {args.device}{' (quick)' if args.quick else ''}, parts {','.join(parts)}, "
          f"cache {os.environ.get('PRH_STITCH_CACHE', '~/.cache/prh_stitch')}")
    for name in parts:
        report.begin(name)
        start = time.perf_counter()
        try:
            PARTS[name](ctx)
            report.end("done", time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - recorded, then the next part runs
            text = traceback.format_exc()
            print(text, flush=True)
            report.check(f"part {name} ran to the end", False, f"{type(exc).__name__}: {str(exc)[:300]}")
            report.end("raised", time.perf_counter() - start, text[-4000:])
    report.save()
    summary = report.data["summary"]
    print(f"\n=== summary: {summary['checks']} checks, {len(summary['failed'])} failed, "
          f"{len(summary['warnings'])} warnings, {summary['elapsed_s']:.0f} s")
    for line in summary["failed"]:
        print(f"  FAIL {line}")
    for line in summary["warnings"]:
        print(f"  WARN {line}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
