#!/usr/bin/env bash
# Reproduce the bundled default model in two stages, resuming either if its run exists:
#   1. `default-mix`: the 224-px EfficientNet preset without spatial positions, steps
#      0-1,500 of a 4,000-step schedule (`stop_at`);
#   2. `default-mix-stage2`: the `default` preset (320 px, 2-D spatial positions),
#      started from stage 1's adapter weights, 1,500 steps.
# Then export the adapter as bf16 into vlm/weights/default and evaluate it.
# Extra arguments go to the stage-2 vlm-train (e.g. --steps 800).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
run="${VLM_RUN_DIR:-$HOME/.cache/vlm/runs/default-mix}"
bash scripts/build_default_data.sh
export HF_HUB_OFFLINE=1
.venv/bin/vlm-train --preset default-mix --checkpoint.dir "$run"
.venv/bin/vlm-train --preset default-mix-stage2 --checkpoint.dir "$run-stage2" \
  --model.init_from "$run/step-001500/model" "$@"
last="$(ls -d "$run-stage2"/step-* | sort | tail -n 1)"
.venv/bin/python - "$last/model" <<'PY'
import sys, torch, vlm
from vlm.factory import DEFAULT_CHECKPOINT
model, _ = vlm.from_pretrained(sys.argv[1], verbose=False)
vlm.save_pretrained(model, DEFAULT_CHECKPOINT, dtype=torch.bfloat16)
print(f"exported {sys.argv[1]} -> {DEFAULT_CHECKPOINT}")
PY
.venv/bin/vlm-eval --task easy-vqa shapes emoji --limit 1000 --out eval_qa.json
.venv/bin/vlm-eval --task sketch --limit 50 --render --out eval_sketch.json
