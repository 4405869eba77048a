#!/usr/bin/env bash
# The main job: set up the environment, then run the example on the bundled model.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${VLM_VENV:-$root/.venv}"
HF_HUB_OFFLINE=1 exec "$venv/bin/python" -m vlm.example "$@"
