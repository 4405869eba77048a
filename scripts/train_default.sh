#!/usr/bin/env bash
# Reproduce the bundled default model: build the data, train with the `default-gpu`
# preset (one run: 1,523 steps of 64 samples, the count a 439-s time budget chose on one
# H200; about 6 min of training there), export the adapter as bf16 into
# vlm/weights/default and evaluate it. Resumes the run if its checkpoint folder exists.
#   bash scripts/train_default.sh                 # the bundled model's recipe (a GPU)
#   bash scripts/train_default.sh --cpu           # the smaller two-stage CPU recipe (about 3 h
#                                                 # on 2 cores; 85.6 % easy-VQA)
# Other arguments go to vlm-train (e.g. --time_budget_s 600 to fit another machine).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/build_default_data.sh
export HF_HUB_OFFLINE=1
if [ "${1:-}" = "--cpu" ]; then
  shift
  run="${VLM_RUN_DIR:-$HOME/.cache/vlm/runs/default-mix}"
  .venv/bin/vlm-train --preset default-mix --checkpoint.dir "$run"
  .venv/bin/vlm-train --preset default-mix-stage2 --checkpoint.dir "$run-stage2" \
    --model.init_from "$run/step-001500/model" "$@"
  run="$run-stage2"
else
  run="${VLM_RUN_DIR:-$HOME/.cache/vlm/runs/default-gpu}"
  .venv/bin/vlm-train --preset default-gpu --checkpoint.dir "$run" "$@"
fi
.venv/bin/python -c 'import sys; from training.checkpoint import export_latest; from vlm.factory import DEFAULT_CHECKPOINT
print("exported", export_latest(sys.argv[1], DEFAULT_CHECKPOINT), "->", DEFAULT_CHECKPOINT)' "$run"
.venv/bin/vlm-eval --task easy-vqa shapes emoji --limit 1000 --out eval_qa.json
.venv/bin/vlm-eval --task sketch --limit 30 --render --out eval_sketch.json
