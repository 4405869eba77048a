"""Caption an image with a model: ``python -m vlm.example [--image PATH] [--model DIR]``.

Without ``--model`` it builds the default preset on the bundled offline backbones,
whose adapter is untrained: the LM then ignores the image (its gates are zero), so
the answers show the pipeline runs (a streamed, multi-turn chat that encodes the
image once), not what a trained model sees.
"""

from __future__ import annotations

import argparse
import logging
import time

from PIL import Image, ImageDraw

from .chat import Chat
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
    parser.add_argument("--follow-up", nargs="*", default=["What is the capital of France?"], help="more turns")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")  # vlm's progress notes (e.g. the first-run dequantising)
    logging.getLogger("vlm").setLevel(logging.INFO)

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
    chat = Chat(model, processor, [image])
    for question in [args.question, *args.follow_up]:
        print(f"Q: {question}\nA: ", end="", flush=True)
        start = time.perf_counter()
        for piece in chat.ask_stream(question, max_new_tokens=args.max_new_tokens):
            print(piece, end="", flush=True)
        print(f"\n   ({time.perf_counter() - start:.2f} s; {chat.session.length} tokens in the session)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
