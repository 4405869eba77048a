"""Turn hand-drawn page sketches into HTML pages: ``vlm-sketch2html SKETCH.png [...] [--render]``.

For each sketch ``x.png`` it writes ``x.html``, a complete page around the model's body
HTML after :func:`vlm.html.repair_html` has made it well-formed and safe (only the tags,
attributes and classes of the canonical pages survive: no URL, style or script); ``--render`` also saves
a screenshot of each page as ``x.page.png``, taken with headless Chromium.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from vlm.factory import load_model
from vlm.generate import GenerationConfig, generate
from vlm.html import document, repair_html
from vlm.images import ImageError, load_image
from vlm.model import VLM
from vlm.processor import SKETCH_PROMPT, Processor

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
RENDER_TIMEOUT_S = 60
INSTALL_HINT = "install it (Debian/Ubuntu: apt-get install chromium) or set VLM_CHROMIUM to its path"


class RenderError(RuntimeError):
    """A page could not be rendered to PNG."""


class ChromiumNotFound(RenderError):
    """No Chromium binary on this machine."""


def sketch_to_html(
    model: VLM,
    processor: Processor,
    images: Sequence[Image.Image],
    max_new_tokens: int = 400,
    num_beams: int = 1,
) -> list[tuple[str, list[str]]]:
    """A complete HTML document and the list of repairs it needed, per sketch."""
    if not images:
        return []
    segments = processor.chat_segments([(SKETCH_PROMPT, None)])
    batch = processor([segments] * len(images), [[image] for image in images], padding_side="left")
    device = next(model.parameters()).device
    # Pages repeat their own markup: with one sketch, prompt-lookup drafts give greedy's page
    # in fewer passes (1.25x tokens/s on 10 test sketches, benchmarks/generate.py --sketch-lookup).
    lookup = 4 if num_beams == 1 and len(images) == 1 else 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, prompt_lookup=lookup)
    with torch.inference_mode():
        result = generate(
            model,
            batch["images"].to(device),
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            config=config,
            tokenizer=processor.tokenizer,
        )
    pages = []
    for text in result.texts or []:
        body, problems = repair_html(text)
        pages.append((document(body), problems))
    return pages


def find_chromium() -> str:
    """The Chromium binary: ``$VLM_CHROMIUM`` if set, else the first known name on PATH."""
    explicit = os.environ.get("VLM_CHROMIUM")
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise ChromiumNotFound(f"VLM_CHROMIUM={explicit!r} is not an executable; {INSTALL_HINT}")
        return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise ChromiumNotFound(f"Chromium not found (looked for {', '.join(CHROMIUM_NAMES)}); {INSTALL_HINT}")


def render_png(html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1024, height: int = 768) -> None:
    """Screenshot ``html_path`` at ``width`` x ``height`` into ``png_path``, or :class:`RenderError`."""
    binary = find_chromium()
    html_path, png_path = Path(html_path).resolve(), Path(png_path)
    if not html_path.is_file():
        raise RenderError(f"{html_path} does not exist")
    # Chromium writes into a temp file beside the target, so a stale or half-written PNG is never mistaken for
    # this render's output and readers see the old file or the complete new one.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{png_path.name}.", suffix=".png", dir=png_path.parent)
    os.close(fd)
    os.unlink(tmp_name)
    try:
        # A fresh profile per page: a shared one is locked by a still-exiting Chromium and carries state across pages.
        with tempfile.TemporaryDirectory(prefix="vlm-chromium-", ignore_cleanup_errors=True) as profile:
            command = [
                binary,
                "--headless",
                "--no-sandbox",  # the sandbox needs user namespaces, often missing in containers and CI
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--hide-scrollbars",
                f"--window-size={width},{height}",
                f"--screenshot={tmp_name}",
                html_path.as_uri(),
            ]
            # Its own process group, so a timeout also ends the renderer and GPU helper processes.
            proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
            try:
                _, stderr = proc.communicate(timeout=RENDER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                if sys.platform == "win32":  # no process groups (start_new_session is POSIX only)
                    proc.kill()
                else:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise RenderError(f"Chromium took longer than {RENDER_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            lines = [line for line in stderr.splitlines() if line.strip()]
            detail = lines[-1][-300:] if lines else "no output"
            raise RenderError(f"Chromium exited with code {proc.returncode}: {detail}")
        if not os.path.isfile(tmp_name) or os.path.getsize(tmp_name) == 0:
            raise RenderError("Chromium wrote no screenshot")
        os.replace(tmp_name, png_path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that readers see the old file or the complete new one, never a partial page."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only; a web page is meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


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
    parser.add_argument("--model", help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--out-dir", type=Path, help="folder for the pages (default: next to each sketch)")
    parser.add_argument("--max-new-tokens", type=_positive, default=400)
    parser.add_argument("--num-beams", type=_positive, default=1)
    parser.add_argument("--batch-size", type=_positive, default=4, help="sketches per generation batch")
    parser.add_argument("--render", action="store_true", help="also save a PNG screenshot of each page")
    parser.add_argument("--width", type=_positive, default=1024, help="screenshot width in pixels")
    parser.add_argument("--height", type=_positive, default=768, help="screenshot height in pixels")
    return parser


def _say(message: str, error: bool = False) -> None:
    tqdm.write(message, file=sys.stderr if error else sys.stdout)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")  # vlm's progress notes (e.g. the first-run dequantising)
    logging.getLogger("vlm").setLevel(logging.INFO)
    if args.render:
        try:
            find_chromium()  # before the minutes spent loading a model
        except ChromiumNotFound as e:
            print(f"error: --render: {e}", file=sys.stderr)
            return 2
    if args.out_dir is not None:
        try:
            args.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"error: --out-dir {args.out_dir}: {e}", file=sys.stderr)
            return 2

    failed = 0
    jobs: list[tuple[Path, Path]] = []
    claimed: set[Path] = set()
    for sketch in args.sketches:
        out = (args.out_dir or sketch.parent) / f"{sketch.stem}.html"
        # Two sketches with one stem would silently overwrite each other's page in a shared --out-dir.
        if out.resolve() in claimed:
            _say(f"{sketch}: error: {out} is already the page of another input", error=True)
            failed += 1
            continue
        claimed.add(out.resolve())
        jobs.append((sketch, out))

    try:
        model, processor = load_model(args.model)
    except Exception as e:  # a wrong folder, a broken checkpoint, a missing backbone: one line, not a traceback
        print(f"error: cannot load the model from {args.model or 'the bundled checkpoint'}: {e}", file=sys.stderr)
        return 2
    model.eval()

    written = rendered = 0
    with tqdm(total=len(args.sketches), unit="sketch", disable=None) as progress:
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
                    write_atomic(out, page)
                except OSError as e:
                    _say(f"{sketch}: error: cannot write {out}: {e}", error=True)
                    failed += 1
                    continue
                written += 1
                if args.render:
                    try:
                        render_png(out, out.with_name(f"{out.stem}.page.png"), args.width, args.height)
                        rendered += 1
                    except (RenderError, OSError) as e:
                        _say(f"{sketch}: error: render failed: {e}", error=True)
                        failed += 1
    print(f"wrote {written} pages ({rendered} rendered), failed {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
