#!/usr/bin/env bash
# How a sketch model does on sketches drawn differently from its training renderer: the
# same first N test layouts drawn plain and in each held-out style
# (training/data/sketch_style.py HELD_OUT), scored by `vlm eval --task sketch`.
#   bash experiments/sketch_styles.sh MODEL_DIR [N] [OUT_DIR]
# Prints one line per style (structure exact, tree similarity, tag F1, text similarity);
# the shards and eval JSON stay in OUT_DIR (default: MODEL_DIR/styles).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="${1:?usage: sketch_styles.sh MODEL_DIR [N] [OUT_DIR]}"
count="${2:-100}"
out="${3:-$model/styles}"
bin="$root/.venv/bin"
export HF_HUB_OFFLINE=1
styles="$("$bin/python" -c 'from vlm_train.data.sketch_style import HELD_OUT; print(" ".join(HELD_OUT))')"
mkdir -p "$out"
for style in plain $styles; do
  shards="$out/shards-$style-$count"
  if [ ! -d "$shards" ]; then
    "$bin/vlm" data sketch --split test --count "$count" --style "$style" --out "$shards.tmp" --shard_size 2000 >&2
    mv "$shards.tmp" "$shards"
  fi
  [ -f "$out/$style.json" ] || "$bin/vlm" eval --model "$model" --task sketch --shards "$shards" --limit "$count" \
    --batch_size 16 --out "$out/$style.json" --predictions "$out/$style.jsonl" >&2
  "$bin/python" - "$out/$style.json" "$style" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"]["sketch"]["0-shot"]
print(f"{sys.argv[2]:>12}: structure exact {r['structure_exact']:.1%} of {r['count']}, tree similarity "
      f"{r['tree_similarity']:.3f}, tag F1 {r['tag_f1']:.3f}, text similarity {r['text_similarity']:.3f}")
EOF
done
