"""How a table of display strings is laid out in a fixed number of character columns (a terminal, or an HTML page's
width in characters): what each column needs so that no cell is cut, and how its columns split into tables that fit."""

from __future__ import annotations

import re

import pandas as pd
from rich.cells import cell_len

ROW_NAMES_WIDTH = 30  # row names wrap beyond this, so that the figures beside them keep their room
FRAME = 1  # a table's left border; each column adds its width, two of padding and a border


def _longest_word(text: str) -> int:
    return max((cell_len(word) for word in str(text).split()), default=0)


def _cell_need(value: object, lines: int = 2) -> int:
    """Columns a cell needs: a figure ("71.56 [66.56, 76.56]", "46 % smaller") its whole length, words ("no
    difference the eval can detect") a `lines`-th of it, wrapped at spaces, but never less than their longest word."""
    text = str(value)
    if _FIGURE.match(text):
        return cell_len(text)
    return max(_longest_word(text), -(-cell_len(text) // lines))


_FIGURE = re.compile(r"^[-+]?[\d.—∞]")


def needs(frame: pd.DataFrame, lines: int = 2) -> tuple[int, list[int]]:
    """Columns each part needs so that no cell is cut (headers and words may wrap at spaces, a cell of words
    into `lines` lines): the row names' (up to ROW_NAMES_WIDTH), then each column's."""
    names = [str(i) for i in frame.index] + [str(frame.index.name or "")]
    row_names = max(max(map(_longest_word, names)), min(max(map(cell_len, names)), ROW_NAMES_WIDTH))
    columns = [max([_longest_word(c)] + [_cell_need(v, lines) for v in frame[c]]) for c in frame.columns]
    return row_names, columns


def column_groups(frame: pd.DataFrame, width: int | None, lines: int = 2) -> list[list[int]]:
    """The frame's columns (positions) split into consecutive groups that each fit `width` beside the row names;
    one group when everything fits or the width is unbounded. A column too wide alone gets a group of its own.
    `lines`: how many lines a cell of words may wrap into."""
    if width is None or frame.columns.empty:
        return [list(range(len(frame.columns)))]
    row_names, columns = needs(frame, lines)
    groups: list[list[int]] = [[]]
    used = FRAME + row_names + 3
    for position, need in enumerate(columns):
        if groups[-1] and used + need + 3 > width:
            groups.append([])
            used = FRAME + row_names + 3
        groups[-1].append(position)
        used += need + 3
    # as many tables, the columns shared out evenly (2 + 2 + 1 rather than 2 + 2 + ... + 1) where that fits too
    size = -(-len(columns) // len(groups))
    even = [list(range(start, min(start + size, len(columns)))) for start in range(0, len(columns), size)]
    fits = all(FRAME + row_names + 3 + sum(columns[p] + 3 for p in group) <= width for group in even)
    return even if fits and len(even) == len(groups) else groups


def is_figure(text: str) -> bool:
    """A cell that starts like a number ("71.56 [66.56, 76.56]", "46 % smaller", "0.62×", "—"): kept on one line."""
    return bool(_FIGURE.match(text))


def is_text(values: pd.Series) -> bool:
    """A column of words rather than figures (most of its cells do not start like a number)."""
    cells = [str(v) for v in values if str(v) not in ("", "—")]
    return bool(cells) and sum(not _FIGURE.match(c) for c in cells) > len(cells) / 2


def widths(frame: pd.DataFrame, group: list[int], width: int) -> list[int]:
    """Fixed widths for the row names and the `group`'s columns within `width`: what each needs, then the room
    left shared out, row names first, up to what each would take unwrapped."""
    row_names, columns = needs(frame)
    names = [str(i) for i in frame.index] + [str(frame.index.name or "")]
    wanted = [max(map(cell_len, names))] + [max([cell_len(str(frame.columns[p]))] + [cell_len(str(v)) for v in frame.iloc[:, p]])
                                            for p in group]
    chosen = [row_names] + [columns[p] for p in group]
    spare = width - FRAME - sum(w + 3 for w in chosen)
    for i, want in enumerate(wanted):
        grow = max(0, min(spare, want - chosen[i]))
        chosen[i] += grow
        spare -= grow
    return chosen


# a table is turned (its rows become columns: precisions side by side) while it has at most this many rows and
# is wide: a screen holds six precisions across more easily than twenty figures
TURNED_MAX_ROWS = 6


def turned(table: pd.DataFrame, wide: bool) -> bool:
    """Whether a section's table is shown turned (see TURNED_MAX_ROWS): the same in the terminal and the HTML."""
    return len(table) <= TURNED_MAX_ROWS and (wide or len(table.columns) > 5)


def turn(table: pd.DataFrame) -> pd.DataFrame:
    """The table turned: its columns' names become the row names, under an empty heading."""
    shown = table.T
    shown.index.name = ""
    return shown
