#!/usr/bin/env bash
# Reproduce the bundled default model: build the data, then train in seven stages, export
# the adapter as bf16 into vlm/weights/default and evaluate it. Each stage resumes its
# run if its checkpoint folder exists.
#   stage 1: `default-gpu` (1,523 steps of 64 samples, the count a 439-s time budget
#            chose on one H200; about 6 min of training there), head features only;
#   stage 2: `default-colour` (1,646 steps of 16, the count a 5,400-s budget chose on
#            this project's 2-core CPU; 79 min there), which adds the vision
#            tower's last-stage channels (vision.with_last_stage) and starts them at zero;
#   stage 3: `default-stage3` (1,518 steps of 16, the count a 6,300-s budget chose on
#            the same CPU), with easy-VQA questions that name a colour weighted up;
#   stage 4: `default-stage4` (1,230 steps of 16, the count a 5,400-s budget chose on
#            the same CPU), another cosine cycle with those questions weighted 4;
#   stage 5: `default-stage5` (603 steps of 16, a 1,800-s budget), the same mixture
#            at half the learning rate;
#   stage 6: `default-stage6` (1,191 steps of 16, a 4,800-s budget), sketches and
#            colour questions weighted up;
#   stage 7: `default-stage7` (1,645 steps of 16, the count a 4,800-s budget chose;
#            2 h 1 min), questions naming brown, red or teal weighted up as well.
#   bash scripts/train_default.sh                 # the bundled model's recipe
#   bash scripts/train_default.sh --cpu           # the older two-stage CPU recipe (about 3 h
#                                                 # on 2 cores; 85.6 % easy-VQA)
# Other arguments go to every vlm-train call (e.g. --time_budget_s 600 to fit a machine).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/build_default_data.sh
export HF_HUB_OFFLINE=1
export_to() {  # export_to RUN_DIR TARGET: the run's newest checkpoint, as bf16
  .venv/bin/python -c 'import sys; from training.checkpoint import export_latest
print("exported", export_latest(sys.argv[1], sys.argv[2]), "->", sys.argv[2])' "$1" "$2"
}
if [ "${1:-}" = "--cpu" ]; then
  shift
  run="${VLM_RUN_DIR:-$HOME/.cache/vlm/runs/default-mix}"
  .venv/bin/vlm-train --preset default-mix --checkpoint.dir "$run" "$@"
  .venv/bin/vlm-train --preset default-mix-stage2 --checkpoint.dir "$run-stage2" \
    --model.init_from "$run/step-001500/model" "$@"
  run="$run-stage2"
else
  run="${VLM_RUN_DIR:-$HOME/.cache/vlm/runs/default-gpu}"
  .venv/bin/vlm-train --preset default-gpu --checkpoint.dir "$run" "$@"
  prev="$run"
  for stage in colour stage3 stage4 stage5 stage6 stage7; do  # each starts from the previous, exported as bf16
    export_to "$prev" "$prev-export"
    .venv/bin/vlm-train --preset "default-$stage" --checkpoint.dir "$run-$stage" \
      --model.init_from "$prev-export" "$@"
    prev="$run-$stage"
  done
  run="$prev"
fi
export_to "$run" vlm/weights/default
.venv/bin/vlm-eval --task easy-vqa shapes emoji --limit 1000 --out eval_qa.json
.venv/bin/vlm-eval --task sketch --limit 30 --render --out eval_sketch.json
