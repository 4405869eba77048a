"""The page shell for generated sketch-to-HTML output, and a repair pass.

The model writes compact body HTML (semantic tags, a few class names); ``document``
wraps it in a complete page with a fixed stylesheet and a Content-Security-Policy,
and ``repair_html`` first makes any model output well-formed and safe on its own: only
the tags, attributes and classes of the canonical sketch pages survive, so no URL,
style or script reaches the page even where the CSP or a sandbox is missing.
"""

from __future__ import annotations

import html
from html.parser import HTMLParser

import nh3

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
# Removed with everything inside them: code, styles, embedded documents, page metadata
# and foreign (SVG, MathML) markup, whose text is no page content either.
DROP = {"script", "style", "iframe", "object", "embed", "link", "meta", "base", "frame", "frameset", "svg", "math",
        "template"}  # fmt: skip
# The allow-list: exactly the markup of the canonical pages (training/data/sketch2html.py)
# and of STYLESHEET. No attribute that holds a URL, a style or a script is on it, so
# there is no URL scheme to get wrong. Other tags are removed and their text kept.
TAGS = {"header", "h1", "h2", "h3", "nav", "a", "main", "p", "img", "form", "label", "input", "button", "ul", "li",
        "section", "div", "footer"}  # fmt: skip
ATTRIBUTES = {"img": {"alt"}}
CLASSES = {"section": {"row", "cols"}, "div": {"card"}}

STYLESHEET = (
    "body{margin:0;font-family:system-ui,sans-serif;color:#222;background:#fff;line-height:1.4}"
    "header{background:#2d3e50;color:#fff;padding:12px 24px}header h1{margin:0;font-size:1.6em}"
    "nav{display:flex;gap:20px;padding:10px 24px;border-bottom:1px solid #ccd}nav a{color:#2456a6;text-decoration:underline}"
    "main{padding:16px 24px;max-width:960px}main>*{margin:0 0 16px}"
    "img{display:block;width:280px;height:160px;background:#d8dee6;border:1px solid #9aa5b1}"
    "button{padding:8px 18px;border:1px solid #2456a6;border-radius:8px;background:#2f6fd6;color:#fff;font:inherit}"
    "form{display:flex;flex-direction:column;align-items:flex-start;gap:10px;max-width:420px;padding:14px;"
    "border:1px solid #ccd;border-radius:6px}"
    "label{display:flex;gap:12px;width:100%;justify-content:space-between}input{flex:1;max-width:260px}"
    ".row,.cols{display:flex;gap:16px}.cols>div{flex:1}.cols img{width:100%}"
    ".card{flex:1;padding:12px;border:1px solid #ccd;border-radius:8px}.card h3{margin:0 0 6px}"
    "footer{padding:12px 24px;background:#eef1f4;text-align:center;color:#555}"
)


def document(body_html: str, title: str = "Generated page") -> str:
    """A complete HTML5 document around compact body HTML, styled by ``STYLESHEET``.

    The CSP allows only the inline stylesheet and data: images, so rendering a generated
    page can never run a script or fetch anything.
    """
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLESHEET}</style>\n</head>\n"
        f"<body>{body_html}</body>\n</html>\n"
    )


# ---------------------------------------------------------------- repair

# Ammonia (through nh3), a maintained sanitiser with a browser's HTML5 parser, has the
# final word: html.parser below reads some markup differently from a browser, which is
# how hand-written sanitisers are bypassed. Built once; it is safe to share.
_CLEANER = nh3.Cleaner(
    tags=TAGS,
    clean_content_tags=DROP,
    attributes=ATTRIBUTES,
    allowed_classes=CLASSES,
    url_schemes=set(),
    link_rel=None,
    strip_comments=True,
)


def _escape_text(text: str) -> str:
    # As Ammonia's serialiser writes text, so that its pass leaves clean markup unchanged.
    return html.escape(text, quote=False).replace("\xa0", "&nbsp;")


def _escape_attribute(value: str) -> str:
    return html.escape(value, quote=False).replace('"', "&quot;").replace("\xa0", "&nbsp;")


class _Repair(HTMLParser):
    """Balances tags and applies the allow-list, noting each change in ``problems``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.dropping = 0

    def _attributes(self, tag: str, attrs: list[tuple[str, str | None]]) -> str:
        kept, seen = [], set()
        for name, value in attrs:
            if name in seen:  # a browser keeps the first of repeated attributes
                continue
            seen.add(name)
            if name == "class" and tag in CLASSES:
                words = (value or "").split()
                allowed = [w for w in words if w in CLASSES[tag]]
                if len(allowed) < len(words):
                    self.problems.append(f"removed class {' '.join(w for w in words if w not in allowed)} on <{tag}>")
                if allowed:
                    kept.append(f' class="{" ".join(allowed)}"')
            elif name in ATTRIBUTES.get(tag, ()):
                kept.append(f' {name}="{_escape_attribute(value or "")}"')
            else:
                self.problems.append(f"removed attribute {name} on <{tag}>")
        return "".join(kept)

    def handle_starttag(self, tag, attrs):
        if tag in DROP:
            self.problems.append(f"removed <{tag}>")
            if tag not in VOID:
                self.dropping += 1
            return
        if self.dropping:
            return
        if tag not in TAGS:
            self.problems.append(f"removed <{tag}>")
            return
        self.out.append(f"<{tag}{self._attributes(tag, attrs)}>")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if tag in DROP:  # <svg/>: nothing inside to drop
            if not self.dropping:
                self.problems.append(f"removed <{tag}>")
            return
        self.handle_starttag(tag, attrs)
        if tag in TAGS and tag not in VOID and not self.dropping:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in DROP:
            self.dropping = max(0, self.dropping - 1)
            return
        if self.dropping or tag in VOID or tag not in TAGS:  # a removed tag's end: reported with its start
            return
        if tag not in self.stack:
            self.problems.append(f"dropped stray </{tag}>")
            return
        while self.stack:
            open_tag = self.stack.pop()
            self.out.append(f"</{open_tag}>")
            if open_tag == tag:
                break
            self.problems.append(f"closed unclosed <{open_tag}>")

    def handle_data(self, data):
        if not self.dropping:
            self.out.append(_escape_text(data))


def repair_html(fragment: str) -> tuple[str, list[str]]:
    """Well-formed, safe body HTML from any model output, and what had to be fixed."""
    parser = _Repair()
    parser.feed(fragment)
    parser.close()
    for tag in reversed(parser.stack):
        parser.out.append(f"</{tag}>")
        parser.problems.append(f"closed unclosed <{tag}>")
    repaired = "".join(parser.out)
    body = _CLEANER.clean(repaired)
    if body != repaired:  # e.g. a <div> inside a <p>, which a browser moves out of it
        parser.problems.append("rewrote markup as a browser parses it")
    return body, parser.problems
