#!/usr/bin/env bash
# Reproduce the bundled default model: build the data, train with the committed preset
# (resuming if a run exists), export the adapter as bf16 into vlm/weights/default, and
# evaluate it. Extra arguments go to vlm-train (e.g. --steps 1200).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
run="${VLM_RUN_DIR:-$HOME/.cache/vlm/runs/default-mix}"
bash scripts/build_default_data.sh
export HF_HUB_OFFLINE=1
.venv/bin/vlm-train --preset default-mix --checkpoint.dir "$run" "$@"
last="$(ls -d "$run"/step-* | sort | tail -n 1)"
.venv/bin/python - "$last/model" <<'PY'
import sys, torch, vlm
from vlm.factory import DEFAULT_CHECKPOINT
model, _ = vlm.from_pretrained(sys.argv[1], verbose=False)
vlm.save_pretrained(model, DEFAULT_CHECKPOINT, dtype=torch.bfloat16)
print(f"exported {sys.argv[1]} -> {DEFAULT_CHECKPOINT}")
PY
.venv/bin/vlm-eval --task easy-vqa shapes emoji --limit 1000 --out eval_qa.json
.venv/bin/vlm-eval --task sketch --limit 50 --render --out eval_sketch.json
