"""Reading data files line by line the way `wc -l`, `awk` and `csv` read them, with physical line numbers.

A line ends at LF ("\\n") and nowhere else; a CR before the LF (a Windows line ending) is dropped.
Python's `str.splitlines()` also breaks at \\x0b, \\x0c, \\x1c-\\x1e, \\x85, U+2028 and U+2029, which no
standard tool does: a caption holding one of them would become two lines and every later line number
would be off. A CR anywhere else is refused, because `csv` ends a line there and `wc -l` does not: the
tools disagree, so the file does not say how many lines it has. A NUL byte means a binary file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qbench.contract.files import not_a_file


class DataError(ValueError):
    """A data file that cannot be used; `problems` holds one line per problem, each naming the file and,
    where it applies, its physical line (`FILE:LINE: ...`)."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


MAX_PROBLEMS_SHOWN = 20


def raise_problems(problems: list[str]) -> None:
    """DataError with the first MAX_PROBLEMS_SHOWN problems (and how many more), when there are any."""
    if problems:
        more = len(problems) - MAX_PROBLEMS_SHOWN
        raise DataError(problems[:MAX_PROBLEMS_SHOWN] + ([f"... and {more} more problems"] if more > 0 else []))


def read_text(path: Path | str, what: str = "file", on_read: Callable[[bytes], None] | None = None) -> str:
    """The file as text: UTF-8, a leading byte order mark dropped, CRLF read as LF; nothing else changed.
    `on_read` gets the bytes as read (the data fingerprint hashes them: no second read).

    DataError naming the file (and the physical line of the first bad byte) when it is missing, not a
    regular file (a folder, a FIFO, a device: `files.not_a_file`), unreadable, binary (a NUL byte) or
    not UTF-8.
    """
    path = Path(path)
    odd = not_a_file(path)
    if odd:
        raise DataError(f"{path}: {what} {odd}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: {what} is a folder, not a file") from None
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read the {what} ({getattr(error, 'strerror', None) or error})") from None
    if on_read is not None:
        on_read(data)
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise DataError(f"{path}:{line}: a NUL byte (byte {nul}): a binary file, not UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {error.start})") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def physical_lines(path: Path | str, what: str = "file", on_read: Callable[[bytes], None] | None = None) -> list[tuple[int, str]]:
    """(line number from 1, text without its line ending) for every line, as `wc -l` and `awk` count them.

    A last line without a final LF is still a line. DataError as `read_text`, and naming the line of a
    CR that does not end one.
    """
    text = read_text(path, what, on_read)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the LF that ends the last line does not start another
    numbered = list(enumerate(lines, start=1))
    stray = [number for number, line in numbered if "\r" in line]
    if stray:
        raise DataError(
            f"{path}:{stray[0]}: a carriage return (CR) inside a line: old Mac line endings or a stray CR; `csv` "
            f"and `wc -l` would count different lines ({len(stray)} such line(s)); save the file with LF or CRLF endings"
        )
    return numbered
