#!/usr/bin/env bash
# Sketch-to-HTML adapter ablation: every arm from scratch, the same data order, batch and
# step count (experiments/sketch_arms.py holds the arms). Resumable: rerun the same
# command and each arm continues from its last checkpoint; finished arms are skipped.
#   bash experiments/sketch_ablation.sh [STEPS] [ARM ...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
steps="${1:-240}"; shift || true
arms=("${@:-base tokens px640 latents128 px640-tokens}")
home="${VLM_ABLATION_DIR:-$HOME/.cache/vlm/ablation}"
bin="$root/.venv/bin"
export HF_HUB_OFFLINE=1
# glibc: return freed large tensors to the system at once (a fixed mmap threshold instead of
# the dynamic one), so an arm's resident memory stays near its peak use, not above it.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-131072}"
[ -d "$home/base/init" ] || "$bin/python" experiments/sketch_arms.py init "$home"
for arm in ${arms[@]}; do
  run="$HOME/.cache/vlm/runs/abl-$arm"
  if [ ! -f "$run/eval/markup.json" ]; then
    "$bin/vlm" train --preset experiments/sketch-ablation.json --model.preset "$home/$arm/init" \
      --checkpoint.dir "$run" --steps "$steps"
    "$bin/python" -c "from vlm_train.checkpoint import export_latest; export_latest('$run', '$run/export')"
    mkdir -p "$run/eval"
    "$bin/vlm" eval --model "$run/export" --task sketch --limit 100 --batch_size 16 \
      --out "$run/eval/sketch.json" --predictions "$run/eval/sketch.jsonl"
    "$bin/python" experiments/sketch_arms.py markup "$run/export" --limit 100 > "$run/eval/markup.tmp"
    mv "$run/eval/markup.tmp" "$run/eval/markup.json"
  fi
  echo "$arm: $(cat "$run/eval/markup.json" | tr -d '\n ')"
done
