"""``vlm chat``: ask questions about an image in the terminal, with the bundled model.

    vlm chat photo.jpg "What is in the picture?"
    vlm chat photo.jpg "What colour is the shape?" "Is it big?"   # one conversation, turn by turn
    vlm chat photo.jpg                                            # type questions; an empty line or Ctrl-D ends
    vlm chat photo.jpg "Describe it." --model runs/x/model --device cuda --dtype bfloat16

The image is encoded once per conversation, each turn sees the ones before it, and the
answers stream as they are generated. ``--preset NAME`` builds that architecture preset
with an untrained adapter instead (the LM then ignores the image: its gates are zero),
which shows the pipeline runs, not what a trained model sees.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator, Sequence

from .apps import add_model_arguments


def build_parser() -> argparse.ArgumentParser:
    rest = __doc__.split("\n\n", 1)[1]
    parser = argparse.ArgumentParser(
        prog="vlm chat",
        description="Ask questions about an image in the terminal, with the bundled model by default.",
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("image", metavar="IMAGE", help="the image file to ask about")
    add("questions", nargs="*", metavar="QUESTION", help="questions, asked in order (default: read from stdin)")
    add_model_arguments(parser)
    add("--preset", metavar="NAME", help="instead of --model: a vlm architecture preset with an untrained adapter")
    add("--max_new_tokens", type=int, metavar="N", help="longest answer in tokens (default: the checkpoint's)")
    return parser


def questions_from(stream) -> Iterator[str]:
    """Questions typed (or piped) one a line, until an empty line or the end of input."""
    interactive = stream.isatty()
    while True:
        if interactive:
            print("Q: ", end="", flush=True)
        line = stream.readline()
        if not line.strip():
            return
        yield line.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model and args.preset:
        parser.error("--model and --preset exclude each other")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be at least 1")
    logging.basicConfig(format="%(name)s: %(message)s")  # vlm's progress notes (e.g. the first-run dequantising)
    logging.getLogger("vlm").setLevel(logging.INFO)

    from .images import ImageError, load_image

    try:
        image = load_image(args.image).convert("RGB")
    except (OSError, ValueError, ImageError) as e:
        parser.error(f"{args.image}: cannot read it as an image ({e})")

    # torch and the model code only now: `vlm chat --help` answers at once.
    from .chat import Chat
    from .factory import create_model_and_transforms, load_model, place
    from .quantize import apply_lm_weights

    start = time.perf_counter()
    try:
        if args.preset:
            model, processor = create_model_and_transforms(args.preset, verbose=False)
            model = apply_lm_weights(place(model, args.device, args.dtype), args.lm_weights)
        else:
            model, processor = load_model(
                args.model, verbose=False, device=args.device, dtype=args.dtype, lm_weights=args.lm_weights
            )
        model.eval()
    except Exception as e:  # a broken checkpoint, a missing backbone, no such device: one line, no traceback
        parser.exit(2, f"{parser.prog}: error: cannot load the model on {args.device}: {e}\n")
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    chat = Chat(model, processor, [image])
    asked = False
    for question in args.questions or questions_from(sys.stdin):
        asked = True
        if args.questions or not sys.stdin.isatty():
            print(f"Q: {question}")
        print("A: ", end="", flush=True)
        start = time.perf_counter()
        limit = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
        for piece in chat.ask_stream(question, **limit):
            print(piece, end="", flush=True)
        print(flush=True)
        print(f"   ({time.perf_counter() - start:.2f} s)", file=sys.stderr, flush=True)
    if not asked:
        print("no question asked", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
