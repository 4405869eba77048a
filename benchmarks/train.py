"""Training speed: samples/s, peak memory and achieved FLOP/s against this machine's
measured matmul peak, for the default architecture at a fixed batch and length.

    python benchmarks/train.py                           # CPU, fp32 and bf16-frozen
    python benchmarks/train.py --device cuda --precision bf16
    python benchmarks/train.py --random-weights          # same shapes, no weight files needed
    python benchmarks/train.py --compare                 # issue #19: prefix cache, prompt, vision
    python benchmarks/train.py --grouping --steps 1      # sketch batches grouped by length or not

``--compare`` (default model, bf16-frozen, side by side in one run): sketch batches (16
generated pages at their real lengths) with and without the prefix cache of the frozen
LM below the first cross-attention layer (steps/s and ratio) and the cache's size per
1,000 samples; easy-VQA batches with the template's default system message and with the
short (empty) one (tokens a sample, steps/s); and the frozen vision tower's share of a
step at 320 and 640 px, which decides whether caching vision tokens too would pay.

A step is forward + backward + AdamW on the trainable adapter, logits only at the
labelled positions (the trainer's setting). FLOPs are counted by PyTorch's
``FlopCounterMode`` on one step; the peak is a 4096² (CPU: 2048²) matmul timed here
in the step's compute dtype.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import vlm
from vlm.config import get_preset
from vlm_train.train import build_model, cast_frozen, param_groups

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
        "pixel_values": torch.randn(batch, 1, 3, image_size, image_size, generator=g).to(device),
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


def run(args, precision: str) -> dict:
    from vlm_train.config import TrainConfig

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
    image_size = args.image_size or model.config.vision.image_size or 224  # the preset's: 320 px by default
    batch = fake_batch(model, args.batch_size, args.length, image_size, device)
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
        "image_size": image_size,
        "s_per_step": seconds,
        "samples_per_s": args.batch_size / seconds,
        "peak_mem_gib": peak_mem,
        "tflops": flops / seconds / 1e12,
        "peak_tflops": peak / 1e12,
    }


def _samples(built, processor, kind: str, max_tokens: int = 2048):
    """``(encoded, pixels)`` of generated shard samples through the loader's own path."""
    from vlm_train.data.decode import decode_sample, example_segments, fit_tokens

    encoded, pixels = [], []
    for sample, _ in built:
        example = decode_sample(sample, kind)  # a builder's sample is what the shard reader gives back
        ids, labels = processor.encode(example_segments(processor, example))
        ids, labels, _ = fit_tokens(ids, labels, max_tokens)
        encoded.append((ids, labels))
        pixels.append(processor.transform_images(example.images))
    return encoded, pixels


def _timed_steps(model, opt, runs: list[tuple[dict, torch.Tensor | None]], steps: int, autocast=None) -> list[float]:
    """Seconds a step for each ``(batch, prefix)`` (prefix None: no cache), timed in turn
    step by step, so a neighbour's load on a shared machine hits all of them alike."""
    autocast = autocast if autocast is not None else torch.autocast("cpu", dtype=torch.bfloat16)
    for run in runs:
        _step(model, opt, autocast, *run)  # warm-up
    total = [0.0] * len(runs)
    for _ in range(steps):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            _step(model, opt, autocast, *run)
            total[i] += time.perf_counter() - start
    return [t / steps for t in total]


def _step(model, opt, autocast, batch, prefix) -> None:
    with autocast:
        loss = model(**batch, return_logits=False, prefix=prefix).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _step_flops(model, opt, autocast, batch, prefix) -> float:
    """FLOPs of one training step, counted by PyTorch (nan where it cannot count)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            _step(model, opt, autocast, batch, prefix)
    except (AssertionError, RuntimeError):
        return float("nan")
    return counter.get_total_flops()


def compare(args) -> int:
    """Issue #19's figures, side by side in one process (see the module docstring)."""
    from vlm.factory import fast_matmul
    from vlm_train.config import TrainConfig
    from vlm_train.data import builders, prefix_cache
    from vlm_train.data.loader import SourceConfig
    from vlm_train.data.shards import ShardWriter

    cfg = TrainConfig()
    cfg.precision = "bf16-frozen" if fast_matmul(torch.bfloat16, "cpu") else "fp32"  # as the trainer decides
    model, processor = build_model(cfg)
    model.embed.new_rows.requires_grad_(False)  # as the trainer holds them with the cache on
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.optim))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision != "fp32")
    rows = []

    # Sketch pages: 16 generated samples at their real lengths.
    built = list(builders.sketches("train", args.sketch_batch, seed=0))
    encoded, pixels = _samples(built, processor, "sketch")
    batch = processor.collate(encoded, pixels)
    lengths = [len(ids) for ids, _ in encoded]
    with torch.no_grad(), autocast:
        prefix = model.prefix_hidden_states(batch["input_ids"], batch["attention_mask"])  # (B, S, D)
    flops = [_step_flops(model, opt, autocast, batch, p) for p in (None, prefix)]
    plain, cached = _timed_steps(model, opt, [(batch, None), (batch, prefix)], args.steps, autocast)
    rows.append(("sketch, no cache", sum(lengths) / len(lengths), plain))
    rows.append(("sketch, prefix cache", sum(lengths) / len(lengths), cached))
    with tempfile.TemporaryDirectory() as tmp:
        with ShardWriter(tmp, "sketch", max_samples=len(built)) as writer:
            for sample, _ in built:
                writer.write(sample)
        _, report = prefix_cache.ensure(
            model,
            processor,
            [SourceConfig(tmp, "sketch")],
            "fp32" if cfg.precision == "fp32" else "bf16",
            autocast=autocast,
            log=lambda m: None,
        )
    sketch_mib_per_k = report.bytes / report.samples * 1000 / 2**20

    # easy-VQA: the template's default system message against the short one.
    evqa_rows = []
    if builders.easy_vqa_installed():
        samples = [s for _, s in zip(range(args.vqa_batch), builders.easy_vqa("train"), strict=False)]
        batches, tokens = [], []
        for prompt in (None, ""):
            processor.system_prompt = prompt
            encoded, pixels = _samples(samples, processor, "qa")
            batches.append((processor.collate(encoded, pixels), None))
            tokens.append(sum(len(ids) for ids, _ in encoded) / len(encoded))
        processor.system_prompt = model.config.system_prompt
        times = _timed_steps(model, opt, batches, args.steps, autocast)
        for prompt, n, seconds in zip((None, ""), tokens, times, strict=True):
            evqa_rows.append((f"easy-VQA, system prompt {prompt!r}", n, seconds))

    # The frozen vision tower's share of a step (a vision-token cache could save at most it).
    vision_rows = []
    tower = next(model.vision.parameters())
    for px in (320, 640):
        images = torch.randn(args.sketch_batch, 1, 3, px, px).to(tower.dtype)
        with torch.no_grad():
            model.vision(images)
            start = time.perf_counter()
            feats = model.vision(images)  # (B, T, N, Dv)
            seconds = time.perf_counter() - start
        per_sample = feats[0].numel() * (4 if cfg.precision == "fp32" else 2)  # bytes as stored
        vision_rows.append((px, seconds, feats.shape[2], per_sample * 1000 / 2**20))

    print(f"\ncpu, {torch.get_num_threads()} threads, default model, {cfg.precision}, {args.steps} timed steps each")
    print("| batch | tokens/sample | s/step | steps/s |")
    print("| --- | --- | --- | --- |")
    for name, tokens, seconds in rows + evqa_rows:
        print(f"| {name} | {tokens:.1f} | {seconds:.3f} | {1 / seconds:.3f} |")
    print(
        f"\nprefix cache speed-up on sketch batches ({args.sketch_batch} samples, "
        f"{min(lengths)}-{max(lengths)} tokens): {plain / cached:.2f}x; FLOPs a step {flops[0] / 1e9:.0f} G without, "
        f"{flops[1] / 1e9:.0f} G with: {flops[0] / flops[1]:.2f}x fewer (the most the cache could give)"
    )
    print(
        f"prefix cache size: {sketch_mib_per_k:.1f} MiB per 1,000 sketch samples ({cfg.precision}, layer "
        f"{model.first_cross_attn_layer} of {len(model.decoder_layers())})"
    )
    if evqa_rows:
        (_, t_old, s_old), (_, t_new, s_new) = evqa_rows
        print(f"easy-VQA: {t_old:.1f} -> {t_new:.1f} tokens a sample; {s_old / s_new:.2f}x steps/s")
    print("\n| image size | vision tower s (batch) | share of a sketch step with the cache | tokens | MiB per 1,000 |")
    print("| --- | --- | --- | --- | --- |")
    for px, seconds, tokens, mib in vision_rows:
        print(f"| {px} | {seconds:.3f} | {seconds / cached:.1%} | {tokens} | {mib:.0f} |")
    return 0


def grouping(args) -> int:
    """Sketch batches as the loader makes them with and without ``data.group_by_length``:
    the same 16 × G generated pages, G batches each way, steps timed in turn."""
    from vlm.factory import fast_matmul
    from vlm_train.config import TrainConfig
    from vlm_train.data import builders
    from vlm_train.data.loader import LoaderConfig, SourceConfig, make_loader
    from vlm_train.data.shards import ShardWriter

    cfg = TrainConfig()
    cfg.precision = "bf16-frozen" if fast_matmul(torch.bfloat16, "cpu") else "fp32"
    model, processor = build_model(cfg)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.optim))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision != "fp32")
    count = args.sketch_batch * args.groups
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        with ShardWriter(tmp, "sketch", max_samples=count) as writer:
            for sample, _ in builders.sketches("train", count, seed=0):
                writer.write(sample)
        for group in (0, args.groups):
            loader = LoaderConfig(
                [SourceConfig(tmp, "sketch")], batch_size=args.sketch_batch, num_workers=0, shuffle_buffer=0,
                group_by_length=group,
            )  # fmt: skip
            batches = [b for b in make_loader(loader, processor) if "input_ids" in b]
            runs[group] = [
                ({k: b[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels")}, None) for b in batches
            ]
    plain, grouped = runs[0], runs[args.groups]
    seconds = _timed_steps(model, opt, plain + grouped, args.steps, autocast)
    rows = []
    for name, batches, times in (
        ("random batches", plain, seconds[: len(plain)]),
        ("grouped by length", grouped, seconds[len(plain) :]),
    ):
        real = sum(int(b["attention_mask"].sum()) for b, _ in batches)
        padded = sum(b["input_ids"].numel() for b, _ in batches)
        rows.append((name, real / padded, sum(times), count / sum(times)))
    print(f"\ncpu, {torch.get_num_threads()} threads, default model, {cfg.precision}, {count} sketch pages in "
          f"{args.groups} batches of {args.sketch_batch}, {args.steps} timed pass(es)")  # fmt: skip
    print("| batches | real tokens / padded | s for all | samples/s |")
    print("| --- | --- | --- | --- |")
    for name, share, total, rate in rows:
        print(f"| {name} | {share:.1%} | {total:.1f} | {rate:.2f} |")
    print(f"\ngrouped by length: {rows[1][3] / rows[0][3]:.2f}x samples/s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16-frozen"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--image-size", type=int, help="image side in px (default: the model's, 320 for the default)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--compare", action="store_true", help="issue #19's side-by-side figures")
    parser.add_argument("--sketch-batch", type=int, default=16)
    parser.add_argument("--vqa-batch", type=int, default=32)
    parser.add_argument("--grouping", action="store_true", help="sketch batches with and without data.group_by_length")
    parser.add_argument("--groups", type=int, default=4, help="--grouping: batches a length group holds")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args)
    if args.grouping:
        return grouping(args)
    rows = [run(args, p) for p in args.precision]
    print(
        f"\ndevice {args.device}, batch {args.batch_size} x {args.length} tokens, {rows[0]['image_size']} px, "
        f"{torch.get_num_threads()} threads"
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
