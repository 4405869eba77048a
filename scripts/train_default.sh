#!/usr/bin/env bash
# Reproduce the bundled default model: build the data, then train the stages of the
# `default` recipe (training/presets/default.json) in order, each started from the one
# before it (exported as bf16), export the last as bf16 into vlm/weights/default and
# evaluate it. Each stage resumes its run if its checkpoint folder exists.
# A stage's length is its time budget (`time_budget_s`, an input: the trainer fits the
# steps to this machine), so stage 1, made on one H200 in 439 s, gets fewer steps on a
# CPU; each stage's `note` records what the bundled run of it gave (to repeat one stage's
# step count: vlm train --preset default:STAGE --steps N --time_budget_s null).
#   bash scripts/train_default.sh
# Other arguments go to every vlm train call (e.g. --time_budget_s 600 to fit a machine).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/build_default_data.sh
export HF_HUB_OFFLINE=1
export_to() {  # export_to RUN_DIR TARGET: the run's newest checkpoint, as bf16
  .venv/bin/python -c 'import sys; from vlm_train.checkpoint import export_latest
print("exported", export_latest(sys.argv[1], sys.argv[2]), "->", sys.argv[2])' "$1" "$2"
}
run="${VLM_RUN_DIR:-$HOME/.cache/vlm/runs/default-gpu}"  # stage 1's run; stage S's is "$run-S"
stages="$(.venv/bin/python -m vlm_train.recipe default)"  # the stage names, in order
prev=""
for stage in $stages; do
  if [ -z "$prev" ]; then
    .venv/bin/vlm train --preset "default:$stage" --checkpoint.dir "$run" "$@"
    prev="$run"
  else
    export_to "$prev" "$prev-export"
    .venv/bin/vlm train --preset "default:$stage" --checkpoint.dir "$run-$stage" \
      --model.init_from "$prev-export" "$@"
    prev="$run-$stage"
  fi
done
export_to "$prev" vlm/weights/default
.venv/bin/vlm eval --task easy-vqa shapes emoji --limit 1000 --out eval_qa.json
.venv/bin/vlm eval --task sketch --limit 30 --render --out eval_sketch.json
