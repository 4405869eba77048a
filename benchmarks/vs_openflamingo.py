"""vlm against OpenFlamingo's own code, side by side in one process, the same configuration.

    python benchmarks/vs_openflamingo.py                      # batch 1 and 8, 3 interleaved repetitions
    python benchmarks/vs_openflamingo.py --reps 5 --new_tokens 32 --batches 1 8 --train
    python benchmarks/vs_openflamingo.py --paths fp32 --batches 1 --reps 1   # a quick look

Both models: a random open_clip ViT-B-32 at 224 px (nothing downloaded); one Llama folder
of SmolLM2-135M's shape (random weights by default, ``--lm smollm2`` for the bundled real
ones: the cost is the same) loaded by both; a perceiver of depth 6 with 64 latents at the
vision width (OpenFlamingo's); gated cross-attention before every 4th layer
(``cross_attn_every_n_layers=4``: layers 3, 7, ..., 27); fp32; greedy decoding of exactly
``--new_tokens`` tokens. OpenFlamingo is built by its own factory with a random adapter
(gates open), its checkpoint converted with ``vlm.convert.convert_openflamingo``, and the
greedy tokens of both are checked to agree before anything is timed.

Timed per repetition, each system in turn (the order rotates between repetitions):
time to first token (image encoding + prompt, one new token), the image encoding alone
(tower and perceiver: ``encode_images``, OpenFlamingo's ``_encode_vision_x``) and the time
for ``--new_tokens``; decode tokens/s is ``B * (N - 1) / (t_N - t_1)``. Ratios are medians of
the per-repetition ratios against OpenFlamingo. "others' CPU" is the share of the
machine's CPU time that other processes used during a system's runs (``/proc/stat`` minus
this process's own times): a loaded machine slows every column. The bare-LM floor is the
same Llama without any adapter, a plain cached greedy loop (no Hugging Face ``generate``).

Needs ``pip install --no-deps open-flamingo einops einops-exts`` (a benchmark-only
dependency). The shim OpenFlamingo needs under transformers 5 is applied here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402
from generate import FAST_PATHS, fast_path  # noqa: E402  (benchmarks/generate.py)
from open_flamingo.src.flamingo_lm import FlamingoLMMixin  # noqa: E402
from openflamingo import convert_pair  # noqa: E402  (benchmarks/openflamingo.py, beside this file)
from transformers import AutoModelForCausalLM, DynamicCache, LlamaForCausalLM  # noqa: E402

from vlm.generate import generate  # noqa: E402
from vlm.quantize import Fp16WeightLinear, PackedLinear  # noqa: E402

VIT = "vlm-bench-ViT-B-32"
PROMPT = "<image>Question: What is in this picture? Answer:"
PATHS = ["fp32", *FAST_PATHS]  # fp32 and benchmarks/generate.py's faster paths


# ---------------------------------------------------------------------- building


def register_vit(root: Path) -> str:
    """ViT-B-32 whose patch tokens are taken before ``ln_post``: what OpenFlamingo's
    open_clip (< 2.23) handed its perceiver, and what vlm reads."""
    config = open_clip.get_model_config("ViT-B-32")
    config["vision_cfg"]["final_ln_after_pool"] = True
    (root / "oc").mkdir()
    (root / "oc" / f"{VIT}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / "oc")
    return VIT


def make_lm(root: Path, kind: str) -> Path:
    """A Llama folder of SmolLM2-135M's shape and tokenizer: random weights or the real ones."""
    from transformers import AutoTokenizer

    from vlm.registry import smollm2_folder

    real = smollm2_folder()
    if kind == "smollm2":
        return real
    config = LlamaForCausalLM.config_class.from_pretrained(real)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "lm")
    AutoTokenizer.from_pretrained(real).save_pretrained(root / "lm")
    return root / "lm"


# ---------------------------------------------------------------------- measuring


class CpuShare:
    """The share of the machine's CPU time used by other processes between start and stop."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _machine() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
        return total, total - fields[3] - fields[4]

    def __enter__(self) -> CpuShare:
        self.start, self.own = self._machine(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc) -> None:
        total, busy = self._machine()
        own = (sum(os.times()[:2]) - self.own) * self.tick
        dt = total - self.start[0]
        self.others = max(0.0, (busy - self.start[1] - own) / dt) if dt > 0 else 0.0


def weight_bytes(module: torch.nn.Module) -> int:
    """Parameters and buffers, each storage once, plus packed fp16 and oneDNN weights (opaque handles)."""
    seen, total = set(), sum(m.nbytes for m in module.modules() if isinstance(m, (Fp16WeightLinear, PackedLinear)))
    for t in [*module.parameters(), *module.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def greedy_bare(lm, ids: torch.Tensor, n: int) -> torch.Tensor:
    """A plain cached greedy loop over the bare LM: the floor a decoding loop can reach."""
    cache = DynamicCache(config=lm.config)
    logits = lm(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    out = []
    for step in range(n):
        token = logits.argmax(-1, keepdim=True)  # (B, 1)
        out.append(token)
        if step < n - 1:
            logits = lm(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.cat(out, 1)


def train_step(system: str, model, images, ids) -> None:
    """Forward and backward of the language-modelling loss (no optimiser step)."""
    labels = ids.clone()
    if system == "OpenFlamingo":
        loss = model(images[:, :, None], ids, attention_mask=torch.ones_like(ids), labels=labels)[0]
    else:
        loss = model(images, ids, labels=labels, return_logits=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default: %(default)s)")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=int, default=4, help="cross_attn_every_n_layers (default: %(default)s)")
    parser.add_argument("--lm", choices=("random", "smollm2"), default="random", help="the Llama's weights")
    parser.add_argument("--paths", nargs="+", choices=sorted(PATHS), default=["fp32", "bf16", "int8"])
    parser.add_argument("--no_bare", action="store_true", help="skip the bare-LM floor")
    parser.add_argument("--train", action="store_true", help="also time a train step (forward + backward)")
    parser.add_argument("--train_tokens", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    FlamingoLMMixin.forward.__defaults__ = (None,)  # transformers 5's generate drops an all-ones mask
    workdir = tempfile.TemporaryDirectory(prefix="vlm-bench-")  # ~1.5 GB of weights, removed at exit
    root = Path(workdir.name)
    register_vit(root)
    lm_dir = make_lm(root, args.lm)
    ref, tokenizer, base = convert_pair(root, VIT, lm_dir, args.every, noise=0.02)
    ours = {path: fast_path(base, path) if path != "fp32" else base for path in args.paths}
    bare = None if args.no_bare else AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    n = args.new_tokens
    prompt_ids = tokenizer([PROMPT], return_tensors="pt")["input_ids"]  # (1, S)
    torch.manual_seed(1)
    all_images = torch.randn(max(args.batches), 1, 3, 224, 224)  # (B, T, C, H, W)
    text_only = prompt_ids.masked_fill(prompt_ids >= bare.config.vocab_size, 0) if bare is not None else None

    def run(system: str, bs: int, tokens: int) -> torch.Tensor:
        ids, images = prompt_ids.expand(bs, -1), all_images[:bs]
        with torch.inference_mode():
            if system == "OpenFlamingo":
                out = ref.generate(
                    images[:, :, None], ids, torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens
                )
                return out[:, ids.shape[1] :]
            if system == "bare LM":
                return greedy_bare(bare, text_only.expand(bs, -1), tokens)
            model = ours[system.removeprefix("vlm ")]
            return torch.tensor(generate(model, images, ids, max_new_tokens=tokens, stop_token_ids=()).tokens)

    def encode(system: str, bs: int) -> None:
        """The image side of the time to first token: tower and perceiver."""
        with torch.inference_mode():
            if system == "OpenFlamingo":
                ref._encode_vision_x(all_images[:bs, :, None])
            elif system != "bare LM":
                ours[system.removeprefix("vlm ")].encode_images(all_images[:bs])

    systems = ["OpenFlamingo", *[f"vlm {p}" for p in args.paths], *([] if bare is None else ["bare LM"])]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; LM {args.lm} "
        f"(SmolLM2-135M shape), cross-attention before layers {base.cross_attn_layers}; "
        f"perceiver depth {base.config.resampler.depth}, {base.config.resampler.num_latents} latents; "
        f"{n} new tokens; prompt {prompt_ids.shape[1]} tokens + 1 image",
        flush=True,
    )
    # Correctness first: the same greedy tokens (up to the first end of chunk / EOS, where
    # Hugging Face's min_new_tokens starts changing theirs).
    stops = {tokenizer.convert_tokens_to_ids("<|endofchunk|>"), tokenizer.eos_token_id}
    theirs = run("OpenFlamingo", 1, n)[0].tolist()
    cut = next((i for i, t in enumerate(theirs) if t in stops), n)
    fp32 = run("vlm fp32", 1, n)[0].tolist() if "fp32" in args.paths else None
    for path in args.paths:
        mine = run(f"vlm {path}", 1, n)[0].tolist()
        same = sum(a == b for a, b in zip(theirs[:cut], mine[:cut]))
        line = f"greedy tokens, vlm {path} vs OpenFlamingo: {same}/{cut} equal"
        if fp32 is not None and path != "fp32":
            line += f"; vs vlm fp32: {sum(a == b for a, b in zip(fp32, mine))}/{n} equal"
            first = next((i for i, (a, b) in enumerate(zip(fp32, mine)) if a != b), None)
            line += "" if first is None else f" (first difference at token {first})"
        print(line, flush=True)
    print(f"OpenFlamingo's tokens: {theirs}", flush=True)

    times: dict[tuple[str, int, int], list[float]] = {}
    others: dict[str, list[float]] = {s: [] for s in systems}
    for s in systems:  # warm-up: first calls allocate and pick kernels
        run(s, 1, 2)
    for rep in range(args.reps):
        order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
        for bs in args.batches:
            for s in order:
                with CpuShare() as share:
                    for tokens in (1, n):
                        start = time.perf_counter()
                        run(s, bs, tokens)
                        times.setdefault((s, bs, tokens), []).append(time.perf_counter() - start)
                    start = time.perf_counter()
                    encode(s, bs)
                    times.setdefault((s, bs, 0), []).append(time.perf_counter() - start)
                others[s].append(share.others)
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)

    train: dict[str, list[float]] = {}
    if args.train:
        bs = max(args.batches)
        ids = tokenizer([PROMPT + " a photo of" * 64], return_tensors="pt")["input_ids"][:, : args.train_tokens]
        ids = ids.expand(bs, -1).contiguous()
        images = all_images[:bs]
        trainers = {"OpenFlamingo": ref, "vlm fp32": base}
        for rep in range(args.reps + 1):  # the first is a warm-up
            for s, model in trainers.items():
                model.train()
                start = time.perf_counter()
                train_step(s, model, images, ids)
                if rep:
                    train.setdefault(s, []).append(time.perf_counter() - start)
                model.eval()

    def decode_rate(s: str, bs: int, rep: int) -> float:
        return bs * (n - 1) / (times[(s, bs, n)][rep] - times[(s, bs, 1)][rep])

    def ratio(values) -> str:
        return f"{statistics.median(values):.2f}×"

    head = ["measure", *systems]
    print("\n| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for bs in args.batches:
        cells = [f"{statistics.median(decode_rate(s, bs, r) for r in range(args.reps)):.1f}" for s in systems]
        print(f"| decode tokens/s, batch {bs} | " + " | ".join(cells) + " |")
        cells = [f"{statistics.median(times[(s, bs, 1)]):.3f} s" for s in systems]
        print(f"| time to first token, batch {bs} | " + " | ".join(cells) + " |")
        cells = [f"{statistics.median(times[(s, bs, 0)]):.3f} s" if s != "bare LM" else "" for s in systems]
        print(f"| of which image encoding (timed alone), batch {bs} | " + " | ".join(cells) + " |")
    if train:
        cells = [f"{statistics.median(train[s]):.2f} s" if s in train else "" for s in systems]
        print(f"| train step, batch {max(args.batches)} × {args.train_tokens} | " + " | ".join(cells) + " |")
    sizes = {"OpenFlamingo": weight_bytes(ref), **{f"vlm {p}": weight_bytes(m) for p, m in ours.items()}}
    if bare is not None:
        sizes["bare LM"] = weight_bytes(bare)
    print("| weights in memory | " + " | ".join(f"{sizes[s] / 2**20:.0f} MiB" for s in systems) + " |")
    print("| others' CPU share (median) | " + " | ".join(f"{statistics.median(others[s]):.0%}" for s in systems) + " |")

    print("\nvs OpenFlamingo (median of per-repetition ratios; > 1: faster than OpenFlamingo)")
    print("| measure | " + " | ".join(systems[1:]) + " |\n|" + " --- |" * len(systems))
    of = "OpenFlamingo"
    for bs in args.batches:
        cells = [ratio(decode_rate(s, bs, r) / decode_rate(of, bs, r) for r in range(args.reps)) for s in systems[1:]]
        print(f"| decode tokens/s, batch {bs} | " + " | ".join(cells) + " |")
        cells = [ratio(times[(of, bs, 1)][r] / times[(s, bs, 1)][r] for r in range(args.reps)) for s in systems[1:]]
        print(f"| time to first token, batch {bs} (theirs / ours) | " + " | ".join(cells) + " |")
    if train:
        cells = [ratio(a / b for a, b in zip(train[of], train[s])) if s in train else "" for s in systems[1:]]
        print("| train step (theirs / ours) | " + " | ".join(cells) + " |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nprocess peak RSS {peak:.2f} GiB (all systems together); load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
