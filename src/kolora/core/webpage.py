"""Self-contained HTML pages (the run report, the filter report): one file a person can copy off the cluster and
open anywhere. Every image is a data: URI, the style is inline and nothing comes from the network (cluster nodes
are offline). Every string that comes from a dataset or a config goes through `esc` or `fmt`.

Each page carries a small inline check: on load it sets `data-images` on <body> to "<loaded>/<total>" (and
`data-tables` to the number of table body rows), for a person ("1 image failed" in the title) and for tests
that read them back from a headless browser."""

from __future__ import annotations

import base64
import html
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f0f3f7; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.note { color: #666; font-size: 13px; }
"""

CHECK = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
  document.body.setAttribute('data-tables', String(document.querySelectorAll('table tbody tr').length));
  if (ok < imgs.length) { document.title = (imgs.length - ok) + ' image(s) failed: ' + document.title; }
});
"""


def esc(value: Any) -> str:
    """Any value as HTML text, quotes included (safe in an attribute too)."""
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "–" if value is None else esc(value)


def table(head: list[str], rows: list[list[Any]], cls: str) -> str:
    """A table; numbers right-aligned, every cell escaped."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{fmt(v)}</td>' if isinstance(v, int | float) and not isinstance(v, bool) else
        f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def page(title: str, body: str, style: str = "") -> str:
    """The page around `body` (HTML): the shared style plus the page's own, and the load check."""
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(title)}</title><style>{STYLE}{style}</style>"
            f"<script>{CHECK}</script></head>\n<body>\n{body}\n</body></html>\n")
