"""The report's document model: blocks (headings, paragraphs, tables, figures, code) rendered to
Markdown and to one self-contained HTML page (figures embedded as base64, nothing fetched)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


# ============================================================================ document model
@dataclass
class Link:
    text: str
    href: str



@dataclass
class Block:
    kind: str                 # h1 | h2 | p | table | img | pre | note
    text: str = ""
    headers: list | None = None
    rows: list | None = None
    path: str = ""            # img: path relative to the run folder
    align: list | None = None  # table: "l" / "r" per column



def _cell_md(v: Any) -> str:
    if isinstance(v, Link):
        return f"[{v.text}]({v.href})"
    if isinstance(v, list):
        return "<br>".join(_cell_md(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")



def _cell_html(v: Any) -> str:
    if isinstance(v, Link):
        return f'<a href="{html.escape(v.href)}">{html.escape(v.text)}</a>'
    if isinstance(v, list):
        return "<br>".join(_cell_html(x) for x in v)
    return html.escape(str(v))



def _inline_md_to_html(text: str) -> str:
    """Paragraph text: escape, then **bold** and `code` (the only markup the report uses)."""
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    return t



def render_md(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}\n")
        elif b.kind == "h2":
            out.append(f"## {b.text}\n")
        elif b.kind in ("p", "note"):
            out.append(("> " if b.kind == "note" else "") + b.text + "\n")
        elif b.kind == "table":
            align = b.align or ["l"] * len(b.headers)
            out.append("| " + " | ".join(_cell_md(h) for h in b.headers) + " |")
            out.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")  # l, w: left
            for row in b.rows:
                out.append("| " + " | ".join(_cell_md(c) for c in row) + " |")
            out.append("")
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.path})\n")
        elif b.kind == "pre":
            out.append("```yaml\n" + b.text.rstrip() + "\n```\n")
    return "\n".join(out) + "\n"



CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d2329;
       max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; line-height: 1.45; background: #fff; }
h1 { font-size: 1.8em; margin: 0.2em 0 0.3em; border-bottom: 3px solid #2f6fb3; padding-bottom: 0.2em; }
h2 { font-size: 1.3em; margin: 1.6em 0 0.5em; color: #204a78; border-bottom: 1px solid #d5dde5; padding-bottom: 0.15em; }
p { margin: 0.4em 0 0.8em; }
.tw { overflow-x: auto; margin: 0.4em 0 1.2em; }
table { border-collapse: collapse; font-size: 0.88em; }
th, td { border: 1px solid #cfd8e1; padding: 4px 9px; vertical-align: top; }
th { background: #eef3f8; text-align: left; vertical-align: bottom; }
td { white-space: nowrap; }
td.w { white-space: normal; min-width: 16em; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #f8fafc; }
code { background: #f1f3f5; padding: 0 3px; border-radius: 3px; font-size: 0.92em; }
pre { background: #f6f8fa; border: 1px solid #dfe4ea; padding: 10px 14px; overflow-x: auto; font-size: 0.82em;
      line-height: 1.35; }
figure { margin: 0.6em 0.5% 1.4em 0; display: inline-block; vertical-align: top; width: 49%; }
td:first-child { white-space: nowrap; }
figure img { max-width: 100%; border: 1px solid #e1e6eb; }
figcaption { font-size: 0.85em; color: #5a6570; }
.note { border-left: 4px solid #e0a800; background: #fff8e1; padding: 6px 12px; margin: 0.6em 0; }
.headline { font-size: 1.05em; }
a { color: #1f5fa8; }
details summary { cursor: pointer; color: #204a78; font-weight: 600; }
"""



def render_html(blocks: list[Block], run_dir: Path, title: str) -> str:
    body = []
    for b in blocks:
        if b.kind == "h1":
            body.append(f"<h1>{html.escape(b.text)}</h1>")
        elif b.kind == "h2":
            body.append(f"<h2>{html.escape(b.text)}</h2>")
        elif b.kind == "p":
            body.append(f"<p>{_inline_md_to_html(b.text)}</p>")
        elif b.kind == "note":
            body.append(f'<div class="note">{_inline_md_to_html(b.text)}</div>')
        elif b.kind == "table":
            align = b.align or ["l"] * len(b.headers)
            head = "".join(f'<th class="{a}">{_cell_html(h)}</th>' for h, a in zip(b.headers, align))
            rows = "".join("<tr>" + "".join(f'<td class="{a}">{_cell_html(c)}</td>' for c, a in zip(r, align)) + "</tr>"
                           for r in b.rows)
            body.append(f'<div class="tw"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
        elif b.kind == "img":
            data = base64.b64encode((run_dir / b.path).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
        elif b.kind == "pre":
            body.append(f"<details open><summary>configuration (YAML)</summary><pre>{html.escape(b.text)}</pre></details>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


__all__ = ["Block", "CSS", "Link", "render_html", "render_md"]
