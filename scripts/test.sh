#!/usr/bin/env bash
# The test command: set up the environment, then lint and run the whole suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${VLM_VENV:-$root/.venv}"
cd "$root"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
HF_HUB_OFFLINE=1 exec "$venv/bin/python" -m pytest "$@"
