"""A self-contained HTML page from titled tables and rendered plots (PNGs embedded as base64; no external files)."""

from __future__ import annotations

import base64
import html as escape
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from qbench.report.tables import format_value

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem auto; max-width: 1200px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
table { border-collapse: collapse; font-size: 0.8rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.scroll { overflow-x: auto; } .meta { color: #666; font-size: 0.8rem; }
"""


def table_html(table: pd.DataFrame) -> str:
    """A DataFrame as an escaped HTML table, floats to two decimals, missing values as a dash."""
    index_name = table.index.name or ""
    head = "".join(f"<th>{escape.escape(str(c))}</th>" for c in [index_name, *table.columns])
    rows = []
    for index, row in table.iterrows():
        cells = "".join(f"<td>{escape.escape(format_value(v))}</td>" for v in row)
        rows.append(f"<tr><td>{escape.escape(str(index))}</td>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def figure_html(plot: Any) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    caption = escape.escape(plot.title)
    return f'<figure id="{escape.escape(plot.name)}"><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'


def page(title: str, tables: dict[str, pd.DataFrame], plots: list[Any]) -> str:
    """The whole report page: title, plots, then each titled table."""
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape.escape(title)}</h1>",
        f'<p class="meta">generated {generated} by qbench</p>',
        "<h2>Plots</h2>" if plots else "",
        *(figure_html(plot) for plot in plots),
    ]
    for heading, table in tables.items():
        parts += [f"<h2>{escape.escape(heading)}</h2>", table_html(table)]
    parts.append("</body></html>")
    return "\n".join(parts)
