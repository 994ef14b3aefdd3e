"""Write the report as one self-contained HTML page: text, tables and the PNGs inlined as
base64 data URIs, so the file opens offline and can be mailed on its own."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

__all__ = ["Section", "image_tag", "page"]

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1,h2{font-weight:600}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}
p.verdict{font-size:1.1em}"""

Section = Tuple[str, List[str]]   # heading, HTML fragments


def image_tag(png: Optional[Path], alt: str) -> str:
    """An <img> with the PNG inlined; '' when there is no figure."""
    if png is None:
        return ""
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def paragraph(text: str, cls: str = "") -> str:
    if not text:
        return ""
    text = escape(text, quote=False)
    return f'<p class="{cls}">{text}</p>' if cls else f"<p>{text}</p>"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c), quote=False)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, sections: Sequence[Section]) -> str:
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>"]
    for heading, fragments in sections:
        parts.append(f"<h2>{escape(heading)}</h2>")
        parts.extend(f for f in fragments if f)
    parts.append("</body></html>\n")
    return "\n".join(parts)
