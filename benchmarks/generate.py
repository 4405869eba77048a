"""Generation speed: our caches against two baselines, in the same run.

    python benchmarks/generate.py            # default backbones (EfficientNet-Lite0 + SmolLM2-135M)
    python benchmarks/generate.py --tiny     # tiny random backbones, seconds
    python benchmarks/generate.py --int8     # also: int8 LM speed and its effect on quality
    python benchmarks/generate.py --sketch-lookup 30   # sketch → HTML: prompt-lookup drafts vs plain greedy
    python benchmarks/generate.py --paths fp16w bf16 int8   # also: frozen LM weights in fp16 / bf16 / int8
    python benchmarks/generate.py --paths bf16 int8 --gates --gate-vqa 1000 --gate-sketch 20   # + quality gates

``--paths`` times the faster frozen-LM paths of :func:`vlm.quantize.fast_lm` (``fp16w``: the
LM's linear layers and head with fp16 weights and float32 arithmetic, fbgemm's kernel on x86;
``fp16w-xattn``: also the cross-attention blocks' per-token layers, what the apps run on such CPUs;
``fp16w-xattn-bf16enc``: also the vision tower and the resampler in bf16 (:func:`vlm.quantize.fast_encoder`);
``bf16``: the decoder layers' weights in bf16, the LM head in float32; ``int8``: weight-only int8 linear
layers with per-channel scales, bf16 compute; ``int8-head-fp32``: the same with a float32
head), each alone, in the same run as the fp32 baseline (``cached``). ``--gates`` then
checks each on the bundled model against fp32: greedy answers identical on 32 fixed
easy-VQA test questions, and optionally easy-VQA accuracy on the first ``--gate-vqa``
test questions and sketch-to-HTML structure on ``--gate-sketch`` test sketches. With
``--gates`` the bundled model (``vlm.load_model()``) is the one timed.

Modes: ``cached`` (LM KV cache + cross-attention K/V over the image computed once per
request: ours), ``media-kv-every-step`` (LM KV cache, but the cross-attention K/V
recomputed at every step in every cross-attention layer, as OpenFlamingo does), and
``no-cache`` (the whole sequence rerun at every step). Time to first token includes
encoding the image. Exactly ``--new-tokens`` tokens are generated (stop tokens off). After
one warm-up each, the repetitions of the modes are interleaved; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from PIL import Image, ImageDraw

import vlm
from vlm.generate import GenerationConfig, generate


def example_image() -> Image.Image:
    """A small drawn scene: a red circle and a blue square."""
    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((24, 70, 104, 150), fill=(220, 30, 30))
    draw.rectangle((128, 70, 200, 142), fill=(30, 60, 220))
    return image


QUESTIONS = [
    "What is in this picture?",
    "Describe the image.",
    "What colours do you see?",
    "How many shapes are there?",
    "Is there a circle?",
    "Where is the square?",
    "What is on the left?",
    "Write a caption.",
]

PERPLEXITY_TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower. "
    "Photosynthesis is the process by which green plants use sunlight to make food from carbon dioxide "
    "and water. The water cycle describes how water evaporates, forms clouds and falls again as rain. "
    "A triangle has three sides, a square has four equal sides, and a circle has no corners at all."
)

QUALITY_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "What is 12 plus 7?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Give me a synonym for happy.",
    "What do bees make?",
    "How many days are in a week?",
]


FAST_PATHS = {  # name: (LM weights, head, adapter) for vlm.quantize.fast_lm, and the image side's dtype
    "fp16w": ("float16", "float16", False, None),
    "fp16w-xattn": ("float16", "float16", True, None),  # + the cross-attention blocks
    "fp16w-xattn-bf16enc": ("float16", "float16", True, torch.bfloat16),  # + vision tower and resampler in bf16
    # + the image side's products (linear, attention, patch embedding) in oneDNN's float32 layout: the apps' default
    "fp16w-xattn-packenc": ("float16", "float16", True, torch.float32),
    "fp32-packed": ("float32-packed", "float32-packed", True, torch.float32),  # float32, every product in that layout
    "bf16": ("bfloat16", "float32", False, None),
    "bf16-head-bf16": ("bfloat16", "bfloat16", False, None),
    "int8": ("int8", "int8", False, None),
    "int8-head-fp32": ("int8", "float32", False, None),
}


def fast_path(model, name: str):
    """A copy of ``model`` on the faster path ``name`` (:data:`FAST_PATHS`)."""
    from vlm.quantize import fast_encoder, fast_lm

    weights, head, adapter, encoder = FAST_PATHS[name]
    out = fast_lm(model, weights, head, adapter=adapter)
    return out if encoder is None else fast_encoder(out, encoder, copy=False)


def build(tiny: bool):
    if not tiny:
        return vlm.create_model_and_transforms(verbose=False)
    from vlm.tiny import make_tiny_lm, tiny_config

    folder = make_tiny_lm(tempfile.mkdtemp(), "llama", chat=True)
    return vlm.create_model_and_transforms(tiny_config(folder), verbose=False)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


MODES = ("cached", "media-kv-every-step", "no-cache")


def run_mode(model, batch, new_tokens: int, mode: str) -> None:
    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=())
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    generate(model, *args, config=cfg, cache_media_kv=(mode == "cached"), use_cache=(mode != "no-cache"))


def speed_table(model, processor, batch_sizes, new_tokens: int, repeats: int, label: str = "", modes=None):
    modes = modes or MODES
    rows = []
    for bs in batch_sizes:
        segments = [processor.chat_segments([(QUESTIONS[i % len(QUESTIONS)], None)]) for i in range(bs)]
        batch = processor(segments, [[example_image()] for _ in range(bs)], padding_side="left")
        firsts: dict[str, list[float]] = {mode: [] for mode in modes}
        totals: dict[str, list[float]] = {mode: [] for mode in modes}
        with torch.inference_mode():
            for mode in modes:  # warm-up
                run_mode(model, batch, 1, mode)
                run_mode(model, batch, new_tokens, mode)
            for _ in range(repeats):  # interleaved: a change in the machine's speed hits every mode alike
                for mode in modes:
                    firsts[mode].append(seconds(lambda m=mode, b=batch: run_mode(model, b, 1, m)))
                    totals[mode].append(seconds(lambda m=mode, b=batch: run_mode(model, b, new_tokens, m)))
        results = {}
        for mode in modes:
            ttft, total = statistics.median(firsts[mode]), statistics.median(totals[mode])
            results[mode] = (ttft, bs * new_tokens / total)
            rows.append((f"{label}{mode}", bs, ttft, bs * new_tokens / total))
        if "cached" in results and len(results) > 1:
            base = results["cached"][1]
            others = ", ".join(f"{base / tps:.2f}x {mode}" for mode, (_, tps) in results.items() if mode != "cached")
            print(f"batch {bs}: cached is {others} in tokens/s", flush=True)
    return rows


def perplexity(model, processor, text: str) -> float:
    ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model(None, ids, labels=ids)
    return float(torch.exp(out.loss))


def int8_quality(model, processor, quantized, new_tokens: int) -> None:
    same, agree, total = 0, 0, 0
    for q in QUALITY_PROMPTS:
        batch = processor([processor.chat_segments([(q, None)], num_images=0)])
        kwargs = dict(max_new_tokens=new_tokens, tokenizer=processor.tokenizer)
        a = generate(model, None, batch["input_ids"], **kwargs)
        b = generate(quantized, None, batch["input_ids"], **kwargs)
        same += a.texts[0] == b.texts[0]
        n = max(len(a.tokens[0]), len(b.tokens[0]))
        agree += sum(x == y for x, y in zip(a.tokens[0], b.tokens[0]))
        total += n
        print(f"  {q!r}\n    fp32: {a.texts[0]!r}\n    int8: {b.texts[0]!r}")
    print(f"greedy answers identical: {same}/{len(QUALITY_PROMPTS)}; token agreement {agree}/{total}")
    p32, p8 = perplexity(model, processor, PERPLEXITY_TEXT), perplexity(quantized, processor, PERPLEXITY_TEXT)
    print(f"perplexity on fixed text: fp32 {p32:.2f}, int8 {p8:.2f} ({(p8 / p32 - 1) * 100:+.1f}%)")


def greedy_texts(model, processor, task, items, batch_size: int) -> list[str]:
    """The task's prompts and decoding (``vlm eval``'s), greedy, ``batch_size`` at a time."""
    from vlm_train.eval.cli import predict

    return predict(model, processor, task, items, items, 0, 0, batch_size)


def quality_gates(model, processor, fast: dict, vqa_count: int, sketch_count: int, batch_size: int) -> list[str]:
    """Each faster path against fp32 on the bundled model; returns the lines printed. The
    sketch gate runs on the model the sketch tools load (``vlm.load_model(task="sketch")``:
    the bundled sketch adapter where there is one) on each path of ``fast``."""
    from vlm.factory import task_checkpoint
    from vlm.tasks import SKETCH, VQA
    from vlm_train.eval.cli import load_items, score
    from vlm_train.eval.html_metrics import parse_tree

    lines = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    items = load_items("data/shards/easy-vqa-test", VQA, max(32, vqa_count))
    fixed = items[:32]
    reference = greedy_texts(model, processor, VQA, fixed, batch_size)
    for name, other in fast.items():
        texts = greedy_texts(other, processor, VQA, fixed, batch_size)
        same = sum(a == b for a, b in zip(reference, texts))
        changed = [(it.query, a, b) for it, a, b in zip(fixed, reference, texts) if a != b]
        say(f"gate {name}: greedy answers identical to fp32 on {same}/32 fixed easy-VQA test questions")
        for q, a, b in changed[:5]:
            say(f"    {q!r}: fp32 {a!r}, {name} {b!r}")
    if vqa_count:
        start = time.perf_counter()
        predictions = greedy_texts(model, processor, VQA, items[:vqa_count], batch_size)
        base = score(VQA, items[:vqa_count], predictions, False)[0]["accuracy"]
        say(
            f"gate fp32: easy-VQA accuracy {100 * base:.2f} % on the first {vqa_count} test questions "
            f"({time.perf_counter() - start:.0f} s)"
        )
        for name, other in fast.items():
            start = time.perf_counter()
            texts = greedy_texts(other, processor, VQA, items[:vqa_count], batch_size)
            acc = score(VQA, items[:vqa_count], texts, False)[0]["accuracy"]
            same = sum(a == b for a, b in zip(predictions, texts))
            say(
                f"gate {name}: easy-VQA accuracy {100 * acc:.2f} % ({100 * (acc - base):+.2f} points vs fp32; "
                f"{same}/{vqa_count} answers identical; {time.perf_counter() - start:.0f} s)"
            )
    if sketch_count:
        if task_checkpoint("sketch") is not None:
            model, processor = vlm.load_model(task="sketch", verbose=False)
            fast = {name: fast_path(model, name) for name in fast}
        say(f"sketch gates on {task_checkpoint('sketch') or 'the bundled default model'}")
        sketches = load_items("data/shards/sketch-test", SKETCH, sketch_count)
        start = time.perf_counter()
        reference = greedy_texts(model, processor, SKETCH, sketches, 1)
        ref_trees = [parse_tree(t) for t in reference]
        exact = sum(parse_tree(t) == parse_tree(it.answer) for t, it in zip(reference, sketches))
        say(
            f"gate fp32: sketch structure equal to the target on {exact}/{sketch_count} test sketches "
            f"({time.perf_counter() - start:.0f} s)"
        )
        for name, other in fast.items():
            start = time.perf_counter()
            texts = greedy_texts(other, processor, SKETCH, sketches, 1)
            same_tree = sum(parse_tree(t) == r for t, r in zip(texts, ref_trees))
            same_text = sum(a == b for a, b in zip(reference, texts))
            exact = sum(parse_tree(t) == parse_tree(it.answer) for t, it in zip(texts, sketches))
            say(
                f"gate {name}: sketch structure unchanged from fp32 on {same_tree}/{sketch_count}, identical "
                f"HTML on {same_text}/{sketch_count}, equal to the target on {exact}/{sketch_count} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    return lines


def sketch_lookup(model, processor, count: int, drafts: list[int]) -> None:
    """Plain greedy against prompt-lookup decoding on the first ``count`` test sketches,
    batch of one, interleaved per sketch; checks the tokens are identical."""
    from vlm.session import Session
    from vlm.tasks import SKETCH_PROMPT
    from vlm_train.data.sketch2html import page_at

    segments = processor.chat_segments([(SKETCH_PROMPT, None)])
    passes = [0]
    feed = Session.feed

    def counted(self, *args, **kwargs):
        passes[0] += 1
        return feed(self, *args, **kwargs)

    Session.feed = counted
    totals = {k: [0, 0, 0.0] for k in [0, *drafts]}  # tokens, decode passes, seconds
    same = 0
    try:
        for i in range(count):
            batch = processor([segments], [[page_at("test", i).sketch]])
            outputs = {}
            for k in totals:
                cfg = GenerationConfig(max_new_tokens=400, prompt_lookup=k)
                passes[0] = 0
                start = time.perf_counter()
                out = generate(
                    model, batch["pixel_values"], batch["input_ids"], config=cfg, tokenizer=processor.tokenizer
                )
                totals[k][2] += time.perf_counter() - start
                totals[k][0] += len(out.tokens[0])
                totals[k][1] += passes[0] - 1  # the prompt's pass is not a decode step
                outputs[k] = out.tokens[0]
            same += all(t == outputs[0] for t in outputs.values())
    finally:
        Session.feed = feed
    print(f"\nsketch → HTML, {count} test sketches, batch 1: identical tokens on {same} of {count}")
    print(
        "| decoding | tokens | decode passes | tokens per pass | tokens/s | vs greedy |\n| --- | --- | --- | --- | --- | --- |"
    )
    base = totals[0][0] / totals[0][2]
    for k, (tokens, n_pass, seconds) in totals.items():
        name = "greedy" if k == 0 else f"prompt lookup, {k} drafts"
        rate = tokens / seconds
        print(f"| {name} | {tokens} | {n_pass} | {tokens / max(n_pass, 1):.2f} | {rate:.1f} | {rate / base:.2f}× |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random backbones instead of the defaults")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="the modes to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="also time the int8 LM and compare its outputs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--paths", nargs="+", default=[], choices=sorted(FAST_PATHS), help="faster LM paths to time")
    parser.add_argument("--gates", action="store_true", help="bundled model; quality gates for --paths vs fp32")
    parser.add_argument("--gate-vqa", type=int, default=0, metavar="N", help="easy-VQA accuracy on N test questions")
    parser.add_argument("--gate-sketch", type=int, default=0, metavar="N", help="sketch structure on N test sketches")
    parser.add_argument("--gate-batch", type=int, default=8, help="batch size for the easy-VQA gates")
    parser.add_argument("--no-speed", action="store_true", help="skip the timings (gates only)")
    parser.add_argument("--sketch-lookup", type=int, metavar="N", help="only: prompt lookup on N test sketches")
    parser.add_argument("--drafts", type=int, nargs="+", default=[4, 10], help="draft lengths for --sketch-lookup")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sketch_lookup:
        model, processor = vlm.load_model(task="sketch", verbose=False)  # what the sketch tools load
        sketch_lookup(model, processor, args.sketch_lookup, args.drafts)
        return 0
    if args.gates:
        model, processor = vlm.load_model(verbose=False)
    else:
        model, processor = build(args.tiny)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens", flush=True)
    fast = {name: fast_path(model, name) for name in args.paths}
    rows = []
    if not args.no_speed:
        rows = speed_table(model, processor, args.batch_sizes, args.new_tokens, args.repeats, modes=args.modes)
        for name, other in fast.items():
            rows += speed_table(
                other, processor, args.batch_sizes, args.new_tokens, args.repeats, f"{name} ", ["cached"]
            )
    gate_lines = []
    if args.gates and fast:
        gate_lines = quality_gates(model, processor, fast, args.gate_vqa, args.gate_sketch, args.gate_batch)
    if args.int8:
        from vlm.quantize import quantize_lm_int8

        quantized = quantize_lm_int8(model, processor.tokenizer)
        lm_linears = sum(
            isinstance(m, torch.nn.Linear) and n.startswith("lm.") and ".xattn." not in n
            for n, m in model.named_modules()
        )
        print(f"int8: {len(quantized.int8_layers)} of {lm_linears} LM linear layers quantised, the rest kept in float")
        rows += speed_table(quantized, processor, args.batch_sizes, args.new_tokens, args.repeats, "int8 ")
        int8_quality(model, processor, quantized, args.new_tokens)
    if rows:
        print("\n| mode | batch | time to first token (s) | tokens/s |\n| --- | --- | --- | --- |")
        for mode, bs, ttft, tps in rows:
            print(f"| {mode} | {bs} | {ttft:.3f} | {tps:.1f} |")
    if gate_lines:
        print("\nquality gates (fp32 = the bundled model as loaded):\n" + "\n".join(gate_lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
