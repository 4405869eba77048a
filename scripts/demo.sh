#!/usr/bin/env bash
# The main job: set up the environment, then start the Streamlit demo on the bundled
# model (http://localhost:8501). Extra arguments go to `streamlit run`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${VLM_VENV:-$root/.venv}"
export HF_HUB_OFFLINE=1
exec "$venv/bin/streamlit" run "$root/demo/app.py" --server.headless true --browser.gatherUsageStats false "$@"
