"""The page shell for generated sketch-to-HTML output, and a repair pass.

The model writes compact body HTML (semantic tags, a few class names); ``document``
wraps it in a complete page with a fixed stylesheet and a Content-Security-Policy,
and ``repair_html`` makes any model output well-formed first (closing what was left
open, dropping stray end tags and anything script-like).
"""

from __future__ import annotations

import html
from html.parser import HTMLParser

VOID = {"area", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
DROP = {"script", "style", "iframe", "object", "embed", "link", "meta", "base", "frame", "frameset"}

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


# ---------------------------------------------------------------- grammar


class _Repair(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.out: list[str] = []
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.dropping = 0

    def handle_starttag(self, tag, attrs):
        if tag in DROP:
            self.problems.append(f"removed <{tag}>")
            if tag not in VOID:
                self.dropping += 1
            return
        if self.dropping:
            return
        kept = []
        for name, value in attrs:
            if name.startswith("on") or (value or "").strip().lower().startswith("javascript:"):
                self.problems.append(f"removed attribute {name} on <{tag}>")
                continue
            kept.append(f' {name}="{html.escape(value or "", quote=True)}"' if value is not None else f" {name}")
        self.out.append(f"<{tag}{''.join(kept)}>")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID and not self.dropping and self.stack and self.stack[-1] == tag:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in DROP:
            self.dropping = max(0, self.dropping - 1)
            return
        if self.dropping or tag in VOID:
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
            self.out.append(html.escape(data, quote=False))

    def handle_entityref(self, name):
        if not self.dropping:
            self.out.append(f"&{name};")

    def handle_charref(self, name):
        if not self.dropping:
            self.out.append(f"&#{name};")


def repair_html(fragment: str) -> tuple[str, list[str]]:
    """Well-formed body HTML from any model output, and what had to be fixed."""
    parser = _Repair()
    parser.feed(fragment)
    parser.close()
    for tag in reversed(parser.stack):
        parser.out.append(f"</{tag}>")
        parser.problems.append(f"closed unclosed <{tag}>")
    return "".join(parser.out), parser.problems
