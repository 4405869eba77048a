#!/usr/bin/env bash
# Train the sketch adapter with the `sketch` training preset (training/presets/sketch.json):
# build its shards where missing, then two runs:
#   1. the `sketch` architecture (10 x 10 head tokens) for its first 750 steps;
#   2. the `sketch-fold16` architecture (EfficientNet-Lite0's stride-16 stage folded onto
#      that grid), started from step 750 of run 1 (its new input weights at zero) and
#      trained for the preset's steps.
# (A continuation A/B from step 750 chose run 2's architecture; docs/experiments.md.)
# Then export run 2's newest checkpoint as bf16 (its moving average of the weights, ema/,
# which the preset keeps) into its export/ folder and evaluate it
# on the first 200 test sketches (the bundled sketch adapter, vlm/weights/sketch, is such
# an export).
# The runs are long on a CPU: stop at any point (--stop_at N applies to run 2, or kill it)
# and run the same command again; each resumes from its last checkpoint (every 25 steps).
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
run="${VLM_RUN_DIR:-$HOME/.cache/vlm/runs/sketch}"  # run 1; run 2 is "$run-fold"
[ -d "$run-fold" ] || [ -d "$run/step-000750" ] || .venv/bin/vlm train --preset sketch --checkpoint.dir "$run" --stop_at 750
.venv/bin/vlm train --preset sketch --model.preset sketch-fold16 --model.init_from "$run/step-000750/model" \
  --checkpoint.dir "$run-fold" "$@"
.venv/bin/python -c 'import sys; from vlm_train.checkpoint import export_latest
print("exported", export_latest(sys.argv[1], sys.argv[2]), "->", sys.argv[2])' "$run-fold" "$run-fold/export"
.venv/bin/vlm eval --model "$run-fold/export" --task sketch --limit 200 --out "$run-fold/eval_sketch.json"
