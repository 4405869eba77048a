#!/usr/bin/env bash
# The main job: set up the environment, then start the Streamlit demo on the bundled
# model (http://localhost:8501) with `vlm demo`. Extra arguments go to `streamlit run`; the
# demo's own come after `--`. Visitors pick only among the models the operator allows:
#   VLM_DEMO_MODEL=runs/x/model scripts/demo.sh              # instead of the bundled model
#   scripts/demo.sh -- --model runs/a/model --model runs/b/model
#   VLM_DEMO_MODELS=runs/a/model:runs/b/model scripts/demo.sh  # the same, os.pathsep separated
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${VLM_VENV:-$root/.venv}"
export HF_HUB_OFFLINE=1
exec "$venv/bin/vlm" demo "$@"
