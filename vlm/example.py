"""Caption an image with a model: ``python -m vlm.example [--image PATH] [--model DIR]``.

Without ``--model`` it builds the default preset on the bundled offline backbones,
whose adapter is untrained: the LM then ignores the image (its gates are zero), so
the answer shows the pipeline runs, not what a trained model sees.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image, ImageDraw

from .factory import create_model_and_transforms, from_pretrained


def example_image() -> Image.Image:
    """A small drawn scene, so the example needs no image file."""
    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((24, 70, 104, 150), fill=(220, 30, 30))
    draw.rectangle((128, 70, 200, 142), fill=(30, 60, 220))
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm-example", description=__doc__.split("\n")[0])
    parser.add_argument("--image", help="image file (default: a drawn red circle and blue square)")
    parser.add_argument("--model", help="checkpoint folder (default: fresh default preset)")
    parser.add_argument("--question", default="Describe this image in one sentence.")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    if args.image:
        try:
            image = Image.open(args.image)
            image.load()
        except (OSError, ValueError) as e:
            parser.error(f"--image {args.image}: cannot read it as an image ({e})")
    else:
        image = example_image()

    start = time.perf_counter()
    model, processor = from_pretrained(args.model) if args.model else create_model_and_transforms()
    print(f"loaded in {time.perf_counter() - start:.1f} s")
    batch = processor([processor.chat_segments([(args.question, None)])], [[image]])
    stops = tuple(t for t in (processor.tokenizer.eos_token_id, processor.end_of_chunk_token_id) if t is not None)
    start = time.perf_counter()
    with torch.inference_mode():
        new = model.greedy_generate(batch["images"], batch["input_ids"], args.max_new_tokens, stops)
    answer = processor.tokenizer.decode(new[0], skip_special_tokens=True).strip()
    print(f"Q: {args.question}\nA: {answer}\n({new.shape[1]} tokens in {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
