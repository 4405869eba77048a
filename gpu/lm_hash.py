"""One hash over an LM's weights (tied lm_head left out), to check that another machine
dequantised the bundled GGUF file into the very same tensors."""

import hashlib
import sys

from safetensors import safe_open

weights = safe_open(sys.argv[1], "pt")
digest = hashlib.sha256()
for name in sorted(weights.keys()):
    if name != "lm_head.weight":
        digest.update(name.encode())
        digest.update(weights.get_tensor(name).float().contiguous().numpy().tobytes())
print(digest.hexdigest())
