"""Training speed: samples/s, peak memory and achieved FLOP/s against this machine's
measured matmul peak, for the default architecture at a fixed batch and length.

    python benchmarks/train.py                           # CPU, fp32 and bf16-frozen
    python benchmarks/train.py --device cuda --precision bf16
    python benchmarks/train.py --random-weights          # same shapes, no weight files needed

A step is forward + backward + AdamW on the trainable adapter, logits only at the
labelled positions (the trainer's setting). FLOPs are counted by PyTorch's
``FlopCounterMode`` on one step; the peak is a 4096² (CPU: 2048²) matmul timed here
in the step's compute dtype.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vlm  # noqa: E402
from training.train import build_model, cast_frozen, param_groups  # noqa: E402
from vlm.config import get_preset  # noqa: E402

SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)


def random_default(tmp: Path):
    """The default architecture with random weights (for machines without the weight files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm.tiny import tiny_tokenizer

    LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).save_pretrained(tmp / "lm")
    tiny_tokenizer().save_pretrained(tmp / "lm")
    cfg = get_preset("default")
    cfg.vision.pretrained = None
    cfg.lm.name = str(tmp / "lm")
    return cfg


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 50 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fake_batch(model, batch: int, length: int, image_size: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (batch, length), generator=g)
    ids[:, 0] = model.image_token_id
    labels = ids.clone()
    labels[:, : length // 2] = -100  # a prompt, then an answer, as in question-answer data
    return {
        "images": torch.randn(batch, 1, 3, image_size, image_size, generator=g).to(device),
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


def run(args, precision: str) -> dict:
    from training.config import TrainConfig

    device = torch.device(args.device)
    cfg = TrainConfig()
    cfg.precision = precision
    if args.random_weights:
        import tempfile

        tmp = Path(tempfile.mkdtemp())
        model, _ = vlm.create_model_and_transforms(random_default(tmp), verbose=False)
        if precision == "bf16-frozen":
            cast_frozen(model, torch.bfloat16)
    else:
        model, _ = build_model(cfg)
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.optim))
    batch = fake_batch(model, args.batch_size, args.length, 224, device)
    bf16 = precision.startswith("bf16")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step():
        with autocast:
            loss = model(**batch, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    step()  # warm-up
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            step()
        flops = counter.get_total_flops()
    except (AssertionError, RuntimeError) as e:  # e.g. torch 2.11 cannot count grouped-query SDPA
        print(f"FLOP count unavailable with torch {torch.__version__} ({e}); TFLOP/s left blank", file=sys.stderr)
        flops = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak_mem = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    peak = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
    return {
        "precision": precision,
        "s_per_step": seconds,
        "samples_per_s": args.batch_size / seconds,
        "peak_mem_gib": peak_mem,
        "tflops": flops / seconds / 1e12,
        "peak_tflops": peak / 1e12,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16-frozen"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--random-weights", action="store_true")
    args = parser.parse_args(argv)
    rows = [run(args, p) for p in args.precision]
    print(
        f"\ndevice {args.device}, batch {args.batch_size} x {args.length} tokens, 224 px, {torch.get_num_threads()} threads"
    )
    print("| precision | s/step | samples/s | peak memory (GiB) | achieved TFLOP/s | matmul peak TFLOP/s | fraction |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['precision']} | {r['s_per_step']:.3f} | {r['samples_per_s']:.1f} | {r['peak_mem_gib']:.2f} | "
            f"{r['tflops']:.3f} | {r['peak_tflops']:.3f} | {r['tflops'] / r['peak_tflops']:.1%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
