"""Turn hand-drawn page sketches into HTML pages: ``vlm-sketch2html SKETCH.png [...] [--render]``.

For each sketch ``x.png`` it writes ``x.html``, a complete page around the model's body
HTML after :func:`vlm.html.repair_html` has made it well-formed and safe (only the tags,
attributes and classes of the canonical pages survive: no URL, style or script); ``--render`` also saves
a screenshot of each page as ``x.page.png``, taken with headless Chromium.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vlm.apps import add_model_arguments
from vlm.tasks import SKETCH


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-sketch2html", description=__doc__.split("\n")[0])
    parser.add_argument("sketches", nargs="+", type=Path, metavar="SKETCH", help="sketch image files")
    add_model_arguments(parser)
    parser.add_argument("--out_dir", type=Path, help="folder for the pages (default: next to each sketch)")
    parser.add_argument(
        "--max_new_tokens", type=_positive, help=f"default: the checkpoint's, else {SKETCH.decoding.max_new_tokens}"
    )
    parser.add_argument("--num_beams", type=_positive, default=1)
    parser.add_argument("--batch_size", type=_positive, default=4, help="sketches per generation batch")
    parser.add_argument("--render", action="store_true", help="also save a PNG screenshot of each page")
    parser.add_argument("--width", type=_positive, default=1024, help="screenshot width in pixels")
    parser.add_argument("--height", type=_positive, default=768, help="screenshot height in pixels")
    return parser


def _say(message: str, error: bool = False) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr if error else sys.stdout)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")  # vlm's progress notes (e.g. the first-run dequantising)
    logging.getLogger("vlm").setLevel(logging.INFO)
    from contextlib import ExitStack

    from tqdm import tqdm

    from vlm import render
    from vlm.factory import load_model
    from vlm.fileio import write_text
    from vlm.images import ImageError, load_image
    from vlm.tasks import sketch_to_html

    if args.render:
        try:
            render.check_available()  # before the minutes spent loading a model
        except render.RendererUnavailable as e:
            print(f"error: --render: {e}", file=sys.stderr)
            return 2
    if args.out_dir is not None:
        try:
            args.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"error: --out_dir {args.out_dir}: {e}", file=sys.stderr)
            return 2

    failed = 0
    jobs: list[tuple[Path, Path]] = []
    claimed: set[Path] = set()
    for sketch in args.sketches:
        out = (args.out_dir or sketch.parent) / f"{sketch.stem}.html"
        # Two sketches with one stem would silently overwrite each other's page in a shared --out_dir.
        if out.resolve() in claimed:
            _say(f"{sketch}: error: {out} is already the page of another input", error=True)
            failed += 1
            continue
        claimed.add(out.resolve())
        jobs.append((sketch, out))

    try:
        model, processor = load_model(
            args.model, device=args.device, dtype=args.dtype, task="sketch", lm_weights=args.lm_weights
        )
    except Exception as e:  # a wrong folder, a broken checkpoint, a missing backbone: one line, not a traceback
        print(f"error: cannot load the model from {args.model or 'the bundled checkpoint'}: {e}", file=sys.stderr)
        return 2
    model.eval()

    written = rendered = 0
    browser = ExitStack()
    try:  # one browser for every page
        renderer = browser.enter_context(render.Renderer(args.width, args.height)) if args.render else None
    except render.RenderError as e:
        print(f"error: --render: {e}", file=sys.stderr)
        return 2
    with browser, tqdm(total=len(args.sketches), unit="sketch", disable=None) as progress:
        progress.update(len(args.sketches) - len(jobs))
        for start in range(0, len(jobs), args.batch_size):
            chunk = jobs[start : start + args.batch_size]
            ready, images = [], []
            for sketch, out in chunk:
                try:
                    images.append(load_image(sketch))
                    ready.append((sketch, out))
                except ImageError as e:
                    _say(f"{sketch}: error: {e.reason}", error=True)
                    failed += 1
                    progress.update()
            try:
                pages = sketch_to_html(model, processor, images, args.max_new_tokens, args.num_beams)
            except (RuntimeError, ValueError) as e:  # e.g. out of memory: this batch fails, the next may not
                for sketch, _ in ready:
                    _say(f"{sketch}: error: generation failed: {e}", error=True)
                failed += len(ready)
                progress.update(len(ready))
                continue
            for (sketch, out), (page, problems) in zip(ready, pages):
                progress.update()
                if problems:
                    _say(f"{sketch}: repaired: {', '.join(problems)}")
                try:
                    write_text(out, page)
                except OSError as e:
                    _say(f"{sketch}: error: cannot write {out}: {e}", error=True)
                    failed += 1
                    continue
                written += 1
                if renderer is not None:
                    try:
                        renderer.render_png(out, out.with_name(f"{out.stem}.page.png"))
                        rendered += 1
                    except (render.RenderError, OSError) as e:
                        _say(f"{sketch}: error: render failed: {e}", error=True)
                        failed += 1
    print(f"wrote {written} pages ({rendered} rendered), failed {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
