"""Rendering report sections as markdown and as one self-contained HTML page (figures embedded)."""

from __future__ import annotations

import base64
import functools
import html
from pathlib import Path

from core.records import ReportSection as Section


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_md(sections: list[Section]) -> str:
    out = []
    for i, sec in enumerate(sections):
        out.append(("# " if i == 0 else "## ") + sec.title + "\n")
        out += [t + "\n" for t in sec.text]
        for t in sec.tables:
            out.append("| " + " | ".join(map(_md_cell, t.headers)) + " |")
            out.append("|" + "|".join("---" for _ in t.headers) + "|")
            out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in t.rows]
            out.append("")
        out += [f"![{cap}]({path})\n" for path, cap in sec.figures]
    return "\n".join(out).rstrip() + "\n"


@functools.cache
def _markdown():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False})  # raw HTML in a run's text is shown, never interpreted


def _inline_md(text: str) -> str:
    """A paragraph of the report's prose (markdown: `code`, **bold**) as HTML."""
    return _markdown().renderInline(text)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;"
       "text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
       "img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6;padding:0 3px}")


def render_html(sections: list[Section], root: Path) -> str:
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
           f"<title>{html.escape(sections[0].title)}</title><style>{CSS}</style></head><body>"]
    for i, sec in enumerate(sections):
        tag = "h1" if i == 0 else "h2"
        out.append(f"<{tag}>{html.escape(sec.title)}</{tag}>")
        out += [f"<p>{_inline_md(t)}</p>" for t in sec.text]
        for t in sec.tables:
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.headers) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t.rows]
            out.append("</table>")
        for path, cap in sec.figures:
            data = base64.b64encode((root / path).read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(cap)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
