"""report.html: the shortcut report's Markdown as one self-contained page a clinician opens offline.

The page is rendered from the very Markdown of report.md (so both say the same), every PNG is
embedded as a data: URI (no file beside it is needed, nothing is fetched), and the verdict
sentence comes first. A one-line script records on <body> how many images decoded, which the
headless-browser test reads back.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import markdown

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
.verdict{font-size:1.35em;font-weight:600;padding:.8em 1em;border-left:6px solid #c0392b;background:#fdf2f0}
.verdict.clear{border-color:#27ae60;background:#f0fbf4}
table{border-collapse:collapse;margin:1em 0;font-size:.85em}th,td{border:1px solid #ccc;padding:.25em .5em}
th{background:#f4f4f4}img{max-width:100%;image-rendering:pixelated}code{background:#f4f4f4;padding:0 .2em}
"""
COUNT_IMAGES = (
    "window.addEventListener('load',function(){var i=document.images,n=0;"
    "for(var k=0;k<i.length;k++){if(i[k].complete&&i[k].naturalWidth>0)n++;}"
    "document.body.setAttribute('data-images-loaded',n);document.body.setAttribute('data-images',i.length);});"
)


def _embed(page: str, folder: Path) -> str:
    """Replace every <img src="name.png"> that names a file in `folder` by a data: URI."""

    def repl(m: re.Match) -> str:
        src = html.unescape(m.group(2))
        f = folder / src
        if src.startswith("data:") or not f.is_file():
            return m.group(0)
        data = base64.b64encode(f.read_bytes()).decode("ascii")
        return f"{m.group(1)}data:image/png;base64,{data}{m.group(3)}"

    return re.sub(r'(<img[^>]*?src=")([^"]+)(")', repl, page)


def write_html(markdown_text: str, verdict: str, folder: Path, title: str, clear: bool = False) -> Path:
    """folder/report.html from the report's Markdown (images it names are read from `folder`)."""
    lead = f"**{verdict}**"
    if markdown_text.startswith(lead):  # the verdict box below says it once, first
        markdown_text = markdown_text[len(lead) :]
    body = _embed(markdown.markdown(markdown_text, extensions=["tables"]), folder)
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style><script>{COUNT_IMAGES}</script></head><body>"
        f'<p class="verdict{" clear" if clear else ""}" id="verdict">{html.escape(verdict)}</p>{body}</body></html>'
    )
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
