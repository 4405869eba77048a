#!/usr/bin/env bash
# Train the sketch adapter with the `sketch` preset (training/presets/sketch.json): build
# its shards where missing, train (or resume), export the newest checkpoint as bf16 into
# the run's export/ folder and evaluate it on the first 200 test sketches (the bundled
# sketch adapter, vlm/weights/sketch, is such an export).
# The run is long on a CPU: stop it at any point (--stop_at N, or kill it) and run the
# same command again; it resumes from its last checkpoint (every 25 steps).
#   bash scripts/train_sketch.sh [--stop_at N] [other vlm train arguments]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
data=(.venv/bin/vlm data sketch --shard_size 2000 --workers "$(nproc)")
[ -d data/shards/sketch-train ] || "${data[@]}" --split train --count 12000 --out data/shards/sketch-train
# Other pages (seed 1), each drawn with a random pen, lettering, spacing and phone photo.
[ -d data/shards/sketch-train-varied ] ||
  "${data[@]}" --split train --count 24000 --seed 1 --style varied --out data/shards/sketch-train-varied
[ -d data/shards/sketch-val ] || "${data[@]}" --split val --count 200 --out data/shards/sketch-val
[ -d data/shards/sketch-test ] || "${data[@]}" --split test --count 200 --out data/shards/sketch-test
export HF_HUB_OFFLINE=1
run="${VLM_RUN_DIR:-$HOME/.cache/vlm/runs/sketch}"
.venv/bin/vlm train --preset sketch --checkpoint.dir "$run" "$@"
.venv/bin/python -c 'import sys; from vlm_train.checkpoint import export_latest
print("exported", export_latest(sys.argv[1], sys.argv[2]), "->", sys.argv[2])' "$run" "$run/export"
.venv/bin/vlm eval --model "$run/export" --task sketch --limit 200 --out "$run/eval_sketch.json"
