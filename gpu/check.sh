#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (one short run): the training benchmark in bf16
# and fp32 on the default architecture (random weights: the weight files do not
# travel), and the trainer on CUDA through torchrun with NCCL: FSDP2 in bf16 with a
# checkpoint and a resume, then DDP with bf16 frozen weights. Wheels for packages
# the machine lacks are expected in .whl/ (see the device tool's notes).
# Usage there: bash gpu/check.sh "$OUT" (gpu/stash.sh runs it)
set -uo pipefail
out="${1:-/tmp/gpu_check}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

echo "== 1. training benchmark (default architecture, random weights)"
python3 benchmarks/train.py --device cuda --random-weights --precision bf16 fp32 --batch-size 32 --length 128 --steps 10 2>&1 \
  | grep -v "Loading weights" | tee "$out/train_bench.txt" || echo "FAILED: benchmark"

echo "== 2. trainer on CUDA with NCCL"
work=/tmp/gpuwork
rm -rf "$work" && mkdir -p "$work"
python3 - "$work" <<'PY' || echo "FAILED: tiny setup"
import sys, logging, torch
logging.disable(logging.WARNING)
from pathlib import Path
import vlm
from vlm.tiny import make_tiny_lm, tiny_config
from vlm_train.data import builders
from vlm_train.data.cli import write
w = Path(sys.argv[1])
make_tiny_lm(w / "lm", "llama", chat=True)
torch.manual_seed(0)
model, _ = vlm.create_model_and_transforms(tiny_config(w / "lm"), verbose=False)
vlm.save_pretrained(model, w / "init")
write(builders.shapes("train", 300), str(w / "train"), "train", 200, 1 << 28)
write(builders.shapes("val", 40), str(w / "val"), "val", 1000, 1 << 28)
PY
common=(--model.preset "$work/init" --data.sources "[{\"shards\": \"$work/train\", \"kind\": \"qa\"}]"
  --eval.data "{\"sources\": [{\"shards\": \"$work/val\", \"kind\": \"qa\"}], \"num_workers\": 0}"
  --eval.every 20 --data.batch_size 16 --data.num_workers 2 --optim.lr 3e-3 --optim.warmup_steps 5 --log_every 10 --device cuda)
run() { python3 -m torch.distributed.run --nproc_per_node 1 -m vlm_train.train "$@" 2>&1 | grep -v "^  \|^{\|^}\|Loading weights" | tail -6; }
run "${common[@]}" --parallel.strategy fsdp --precision bf16 --steps 20 --checkpoint.every 10 --checkpoint.dir "$work/fsdp" || echo "FAILED: fsdp"
run "${common[@]}" --parallel.strategy fsdp --precision bf16 --steps 30 --checkpoint.every 10 --checkpoint.dir "$work/fsdp" || echo "FAILED: fsdp resume"
run "${common[@]}" --parallel.strategy ddp --precision bf16-frozen --parallel.activation_checkpointing true --steps 20 --checkpoint.every 20 --checkpoint.dir "$work/ddp" || echo "FAILED: ddp"
tail -n 2 "$work/fsdp/metrics.jsonl" "$work/ddp/metrics.jsonl" | tee "$out/metrics_tail.txt"
ls "$work/fsdp" "$work/ddp"
