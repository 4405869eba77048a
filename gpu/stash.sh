#!/usr/bin/env bash
# Device call 1 (see pack.sh): keep payload part 1 on the machine for call 2, then run
# the GPU checks (gpu/check.sh) for at most ${CHECK_S:-110} s into $OUT.
set -uo pipefail
mkdir -p /tmp/stash && cp .gpu/a/part1 /tmp/stash/part1 || exit 3
mkdir -p /tmp/wheels && tar xf /tmp/stash/part1 -C /tmp/wheels wheels 2>/dev/null
mkdir -p .whl && cp /tmp/wheels/wheels/*.whl .whl/ || exit 4
timeout "${CHECK_S:-110}" bash gpu/check.sh "${OUT:-/tmp/gpu_check}" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
echo "stash: part 1 kept; now make call 2 at once"
