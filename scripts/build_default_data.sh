#!/usr/bin/env bash
# Build the shards the bundled default model is trained and evaluated on, into
# data/shards/ (or $1). Deterministic: the same command gives the same shards.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/data/shards}"
bash "$root/scripts/setup.sh"
data=("$root/.venv/bin/vlm" data)
"${data[@]}" easy-vqa --split train --out "$out/easy-vqa-train" --shard_size 2000
"${data[@]}" easy-vqa --split test --out "$out/easy-vqa-test" --shard_size 2000
"${data[@]}" shapes --split train --count 6000 --kind qa --out "$out/shapes-train" --shard_size 4000 --workers "$(nproc)"
"${data[@]}" shapes --split test --count 300 --kind qa --out "$out/shapes-test" --shard_size 4000
"${data[@]}" emoji --split train --kind caption --out "$out/emoji-train" --shard_size 2000
"${data[@]}" emoji --split test --kind caption --out "$out/emoji-test" --shard_size 2000
"${data[@]}" sketch --split train --count 12000 --out "$out/sketch-train" --shard_size 2000 --workers "$(nproc)"
"${data[@]}" sketch --split test --count 200 --out "$out/sketch-test" --shard_size 2000
