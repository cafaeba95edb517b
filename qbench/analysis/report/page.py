"""A self-contained HTML page from the report's sections and rendered plots (PNGs embedded as base64; no external files)."""

from __future__ import annotations

import base64
import html as escape
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pandas as pd

from qbench.analysis.report import layout
from qbench.analysis.report.tables import format_value

if TYPE_CHECKING:
    from qbench.analysis.report.sections import Section

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem auto; max-width: 1280px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
table { border-collapse: collapse; font-size: 0.8rem; margin: 0.5rem 0; max-width: 100%; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; } td:first-child, th:first-child { text-align: left; }
td.figure { white-space: nowrap; } td.text { min-width: 8em; overflow-wrap: anywhere; } td.left { text-align: left; }
.answer { font-size: 1.05rem; background: #f6f8fa; border-left: 4px solid #2a6; padding: 0.5rem 1rem; }
.meta { color: #666; font-size: 0.8rem; } .note { color: #555; font-size: 0.85rem; }
"""
# the page's width in the layout's character columns (qbench.analysis.report.layout): a table wider than this is
# split into tables that fit, so that no table scrolls sideways in a 1400-pixel window
PAGE_CHARACTERS = 186
PAGE_TEXT_LINES = 6  # a cell of words wraps into up to this many lines before a table is split


def text_html(markdown: str) -> str:
    """Markdown prose (bullets, **bold**, `code`) as HTML; raw HTML in it is escaped, not passed through."""
    from markdown_it import MarkdownIt  # rich's own Markdown parser

    return MarkdownIt("commonmark", {"html": False}).render(markdown)


def table_html(table: pd.DataFrame, wide: bool = False) -> str:
    """A section's table (display strings) as escaped HTML: turned as the terminal turns it (precisions as
    columns), split into tables of PAGE_CHARACTERS columns where it is wider, words wrapping and figures not,
    missing values as a dash."""
    if layout.turned(table, wide):
        table = layout.turn(table)
    index_name = table.index.name or ""
    parts = []
    for group in layout.column_groups(table, PAGE_CHARACTERS, PAGE_TEXT_LINES):
        part = table.iloc[:, group]
        head = "".join(f"<th>{escape.escape(str(c))}</th>" for c in [index_name, *part.columns])
        rows = []
        left = [" left" if layout.is_text(part[c]) else "" for c in part.columns]  # a column of words reads from the left
        for index, row in part.iterrows():
            cells = "".join(f'<td class="{"figure" if layout.is_figure(format_value(v)) else "text"}{side}">'
                            f'{escape.escape(format_value(v))}</td>' for v, side in zip(row, left, strict=True))
            rows.append(f"<tr><td>{escape.escape(str(index))}</td>{cells}</tr>")
        parts.append(f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    return "\n".join(parts)


def figure_html(plot: Any) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    caption = escape.escape(plot.title)
    return f'<figure id="{escape.escape(plot.name)}"><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'


def section_html(section: Section) -> str:
    parts = [f'<h2 id="{escape.escape(section.key)}">{escape.escape(section.title)}</h2>']
    if section.text:
        text = text_html(section.text)
        parts.append(f'<div class="answer">{text}</div>' if section.key == "answer" else text)
    if section.table is not None and not section.table.empty:
        parts.append(table_html(section.table, section.wide))
    if section.note:
        parts.append(f'<div class="note">{text_html(section.note)}</div>')
    return "\n".join(parts)


def page(title: str, sections: list[Section], plots: list[Any], leading: tuple[str, ...] = ()) -> str:
    """The whole report page: title, the `leading` sections (the verdict), the plots, then the other sections."""
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape.escape(title)}</h1>",
        f'<p class="meta">generated {generated} by qbench</p>',
        *(section_html(s) for s in sections if s.key in leading),
        "<h2>Plots</h2>" if plots else "",
        *(figure_html(plot) for plot in plots),
        *(section_html(s) for s in sections if s.key not in leading),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)
