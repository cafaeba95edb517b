"""What a cell's parent tells it without a message: a byte of memory the fork server shares with every cell it
forks, set when the server stops its cells because the runner is gone (rather than because the run asked)."""

from __future__ import annotations

import mmap

_flag: mmap.mmap | None = None


def share_with_children() -> None:
    """Make the flag (the fork server, once, before it forks any cell): its children inherit the same page."""
    global _flag
    if _flag is None:
        _flag = mmap.mmap(-1, 1)


def mark_runner_gone() -> None:
    """The runner is gone: the SIGTERM the cells get next is its death passed on (the fork server, before it
    stops them)."""
    if _flag is not None:
        _flag[0] = 1


def runner_gone() -> bool:
    """Whether this cell's fork server said the runner is gone (False in a cell that was not forked)."""
    return _flag is not None and _flag[0] == 1
