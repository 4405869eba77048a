"""Generation speed against OpenFlamingo's own code, same prompt, same images, same run.

    python benchmarks/openflamingo.py                       # tiny random pair (as in tests/test_openflamingo.py)
    python benchmarks/openflamingo.py --new_tokens 64 --batch 4

Builds an OpenFlamingo model with its factory over a tiny random open_clip ViT and a
tiny random Llama, converts its checkpoint with ``vlm.convert``, checks that both give
the same greedy tokens, then times greedy decoding of exactly ``--new_tokens`` tokens:
theirs (``Flamingo.generate``: Hugging Face ``generate``, the cross-attention keys/values
recomputed at every step in every layer) and ours (``vlm.generate``: the LM's cache and
the media keys/values computed once). Needs ``pip install --no-deps open-flamingo einops
einops-exts``. The shim OpenFlamingo needs under transformers 5 is applied here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from open_flamingo import create_model_and_transforms
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from safetensors.torch import save_file

import vlm
from vlm.convert import convert_openflamingo
from vlm.generate import generate
from vlm.tiny import make_tiny_lm

TINY_VIT = "vlm-bench-tiny-vit"
TINY_VIT_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
TINY_VIT_CONFIG["vision_cfg"]["final_ln_after_pool"] = True  # tokens before ln_post, as in training
PROMPT = "the cat sits on the mat.<image>a red circle left of a blue square<|endofchunk|><image>a green"


def build_pair(root: Path, every: int):
    (root / "oc").mkdir()
    (root / "oc" / f"{TINY_VIT}.json").write_text(json.dumps(TINY_VIT_CONFIG))
    open_clip.add_model_config(root / "oc")
    return convert_pair(root, TINY_VIT, make_tiny_lm(root / "lm", "llama"), every, noise=0.2)


def convert_pair(root: Path, vit: str, lm: Path, every: int, noise: float, seed: int = 0):
    """OpenFlamingo built by its own factory over the open_clip model ``vit`` and the LM
    folder ``lm`` (a random adapter: weights moved by ``noise``, gates open) and vlm's
    conversion of its checkpoint, both in eval mode: ``(reference, tokenizer, ours)``."""
    torch.manual_seed(seed)
    ref, _, tokenizer = create_model_and_transforms(
        vit, None, str(lm), str(lm), cross_attn_every_n_layers=every, use_local_files=True
    )
    with torch.no_grad():
        for name, p in [
            *ref.perceiver.named_parameters(),
            *ref.lang_encoder.gated_cross_attn_layers.named_parameters(),
        ]:
            p.uniform_(0.3, 1.0) if name.endswith("_gate") else p.add_(torch.randn_like(p) * noise)
    ref.eval()
    # OpenFlamingo's checkpoint: the perceiver, the cross-attention and the embeddings (its
    # train_utils filter, which imports wandb, keeps exactly these); plus the LM head, so
    # that the added tokens' output rows are the reference's.
    state = {
        k: v
        for k, v in ref.state_dict().items()
        if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k or "embed" in k or k.endswith("lm_head.weight")
    }
    state = {k: v for k, v in state.items() if not k.startswith(("lang_encoder.old_", "lang_encoder.gated_cross"))}
    torch.save(state, root / "checkpoint.pt")
    save_file(
        {f"visual.{k}": v.contiguous() for k, v in ref.vision_encoder.state_dict().items()}, root / "vit.safetensors"
    )
    out = convert_openflamingo(
        root / "checkpoint.pt", lm=str(lm), vision=vit, pretrained=str(root / "vit.safetensors"), out_dir=root / "vlm"
    )
    model, _ = vlm.from_pretrained(out, verbose=False)
    return ref, tokenizer, model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--every", type=int, default=1, help="cross_attn_every_n_layers (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    FlamingoLMMixin.forward.__defaults__ = (None,)  # transformers 5's generate drops an all-ones mask
    workdir = tempfile.TemporaryDirectory(prefix="vlm-bench-")  # removed at exit
    root = Path(workdir.name)
    ref, tokenizer, model = build_pair(root, args.every)
    ids = tokenizer([PROMPT] * args.batch, return_tensors="pt")["input_ids"]
    torch.manual_seed(1)
    images = torch.randn(args.batch, 2, 3, 32, 32)
    n = args.new_tokens
    eoc = tokenizer.convert_tokens_to_ids("<|endofchunk|>")

    @torch.no_grad()
    def theirs():
        out = ref.generate(images[:, :, None], ids, torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n)
        return out[:, ids.shape[1] :]

    def ours():
        return torch.tensor(generate(model, images, ids, max_new_tokens=n, stop_token_ids=()).tokens)

    # The same greedy tokens up to the first <|endofchunk|> (theirs may not stop before n).
    a, b = theirs()[0].tolist(), ours()[0].tolist()
    cut = a.index(eoc) if eoc in a else n
    assert a[:cut] == b[:cut], (a, b)
    rows = []
    for name, run in (("OpenFlamingo generate", theirs), ("vlm generate", ours)):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        rows.append((name, statistics.median(times)))
    print(
        f"tiny random pair, batch {args.batch}, {n} new tokens, median of {args.repeats}, {torch.get_num_threads()} threads"
    )
    for name, seconds in rows:
        print(f"  {name:<22} {args.batch * n / seconds:8.1f} tokens/s")
    print(f"  speed-up: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
