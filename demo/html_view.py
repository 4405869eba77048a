"""Body HTML laid out for reading: one element a line, children indented.

Whitespace goes only between tags, never into text, and an element that holds text stays
on one line, so removing the whitespace between tags gives the compact original back.
"""

from __future__ import annotations

import html
from html.parser import HTMLParser

from vlm.html import VOID


class _Node:
    def __init__(self, start: str, tag: str | None = None):
        self.start = start  # the start tag as written, or escaped text for a text node
        self.tag = tag  # None for text
        self.children: list[_Node] = []


class _Tree(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.root = _Node("", "")
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = _Node(self.get_starttag_text() or f"<{tag}>", tag)
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(_Node(self.get_starttag_text() or f"<{tag}/>", tag))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(_Node(html.escape(data, quote=False)))

    def handle_entityref(self, name):
        self.stack[-1].children.append(_Node(f"&{name};"))

    def handle_charref(self, name):
        self.stack[-1].children.append(_Node(f"&#{name};"))


def _inline(node: _Node) -> str:
    if node.tag is None:
        return node.start
    inner = "".join(_inline(c) for c in node.children)
    return node.start if node.tag in VOID else f"{node.start}{inner}</{node.tag}>"


def _lines(node: _Node, depth: int) -> list[str]:
    pad = "  " * depth
    if node.tag is None or node.tag in VOID or any(c.tag is None for c in node.children) or not node.children:
        return [pad + _inline(node)]
    return [pad + node.start, *(line for c in node.children for line in _lines(c, depth + 1)), f"{pad}</{node.tag}>"]


def format_body(body: str) -> str:
    """``body`` (well-formed body HTML, e.g. after :func:`vlm.html.repair_html`) with each
    element that holds only elements opened on its own line and its children indented."""
    tree = _Tree()
    tree.feed(body)
    tree.close()
    if any(child.tag is None and child.start.strip() for child in tree.root.children):
        return body  # text outside any element: one line, as inside an element that holds text
    return "\n".join(line for child in tree.root.children for line in _lines(child, 0) if line.strip())
