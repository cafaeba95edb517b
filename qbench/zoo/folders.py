"""The checkpoint folders the zoo's commands write: checked before the work starts, and a folder that cannot be
written said in one line (exit 2), never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from qbench.contract import files

BAD_FOLDER = 2


def run_writing(prog: str, folder: Path | str, build: Callable[[], object]) -> int:
    """Make `folder` (OutputError when a part of it is a file, read-only, ...) and run `build`; a folder or
    file that cannot be written is one line on standard error and exit 2, a finished build exit 0."""
    try:
        files.make_dirs(folder, "the checkpoint folder")
        build()
    except OSError as error:
        problem = files.OutputError.from_os_error(folder, error)
        print(f"{prog}: {problem}", file=sys.stderr)
        return BAD_FOLDER
    return 0
