"""Rendering pages in headless Chromium: screenshots, and the boxes of their elements.

One mechanism for ``vlm sketch2html --render`` and the layout scores of ``vlm eval
--render``: Playwright drives the system's Chromium (not a browser of Playwright's own,
which it would download). A page is set as content, never fetched: every request it
makes is refused (the generated pages' CSP already forbids them), and nothing runs inside
the page; element boxes are read through the DevTools protocol, which the CSP does not
govern.

Needs the ``render`` extra (``pip install 'vlm[render]'``: Playwright) and Chromium
(Debian/Ubuntu: ``apt-get install chromium``; or ``$VLM_CHROMIUM`` names the binary).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fileio import write_bytes

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--no-sandbox",  # the sandbox needs user namespaces, often missing in containers and CI
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
TIMEOUT_S = 60
"""Longest wait for the browser to start or for one page to render."""
INSTALL_CHROMIUM = "install it (Debian/Ubuntu: apt-get install chromium) or set VLM_CHROMIUM to its path"
INSTALL_PLAYWRIGHT = "pip install 'vlm[render]'"

# Every element's tag, class and box in document order, for a CSS selector.
_BOXES_JS = """selector => Array.from(document.querySelectorAll(selector), e => {
  const r = e.getBoundingClientRect();
  return [e.tagName.toLowerCase(), e.getAttribute("class") || "", r.x, r.y, r.width, r.height];
})"""


class RenderError(RuntimeError):
    """A page could not be rendered."""


class RendererUnavailable(RenderError):
    """Chromium or Playwright is missing; the message says what to install."""


def find_chromium() -> str:
    """The Chromium binary: ``$VLM_CHROMIUM`` if set, else the first known name on PATH."""
    explicit = os.environ.get("VLM_CHROMIUM")
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise RendererUnavailable(f"VLM_CHROMIUM={explicit!r} is not an executable; {INSTALL_CHROMIUM}")
        return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise RendererUnavailable(f"Chromium not found (looked for {', '.join(CHROMIUM_NAMES)}); {INSTALL_CHROMIUM}")


def check_available() -> str:
    """The Chromium binary, once Playwright is known to be importable too; else
    :class:`RendererUnavailable` naming what to install. Cheap: call it before slow work."""
    executable = find_chromium()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise RendererUnavailable(f"rendering needs Playwright: {INSTALL_PLAYWRIGHT}") from None
    return executable


@dataclass
class Snapshot:
    """A rendered page: its PNG screenshot (the viewport) and, when asked for, the boxes
    ``(tag, class, x, y, width, height)`` (CSS pixels) of the elements a selector matched."""

    png: bytes
    boxes: list[tuple[str, str, float, float, float, float]] = field(default_factory=list)


class Renderer:
    """One headless Chromium that renders many pages at ``width`` x ``height``; use it as a
    context manager (``with Renderer() as renderer: renderer.render(html)``)."""

    def __init__(self, width: int = 1024, height: int = 768) -> None:
        self.width, self.height = width, height
        self._playwright: Any = None
        self._browser: Any = None
        self._page: Any = None

    def __enter__(self) -> Renderer:
        executable = check_available()  # before starting anything, so a missing piece fails fast and clearly
        from playwright.sync_api import Error, sync_playwright

        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(
                executable_path=executable, args=list(CHROMIUM_FLAGS), timeout=TIMEOUT_S * 1000
            )
            self._page = self._browser.new_page(viewport={"width": self.width, "height": self.height})
            self._page.set_default_timeout(TIMEOUT_S * 1000)
            self._page.route("**/*", _only_local)
        except Error as e:
            self.close()
            raise RenderError(f"Chromium ({executable}) did not start: {_first_line(e)}") from None
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._browser is not None:
            self._browser.close()
        if self._playwright is not None:
            self._playwright.stop()
        self._playwright = self._browser = self._page = None

    def render(self, page_html: str, selector: str | None = None) -> Snapshot:
        """Screenshot a complete HTML document; with ``selector``, also the boxes of the
        elements it matches."""
        if self._page is None:
            raise RuntimeError("Renderer is not open: use it as `with Renderer() as renderer:`")
        from playwright.sync_api import Error

        try:
            self._page.set_content(page_html)
            boxes = [tuple(box) for box in self._page.evaluate(_BOXES_JS, selector)] if selector else []
            png = self._page.screenshot(type="png")
        except Error as e:
            raise RenderError(f"Chromium could not render the page: {_first_line(e)}") from None
        return Snapshot(png, boxes)

    def render_png(self, html_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
        """Screenshot the page in ``html_path`` into ``png_path``, written atomically: a
        reader sees the old file or the complete new one."""
        try:
            page_html = Path(html_path).read_text(encoding="utf-8")
        except OSError as e:
            raise RenderError(f"cannot read {html_path}: {e.strerror or e}") from None
        write_bytes(png_path, self.render(page_html).png)


def render_png(html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1024, height: int = 768) -> None:
    """Screenshot one page file at ``width`` x ``height`` into ``png_path`` (a browser per
    call: open a :class:`Renderer` for many pages)."""
    with Renderer(width, height) as renderer:
        renderer.render_png(html_path, png_path)


def _only_local(route: Any) -> None:
    # The CSP already forbids fetching; this is the second lock, in case a page ever gets past it.
    if route.request.url.startswith(("about:", "data:")):
        route.continue_()
    else:
        route.abort()


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__
