"""Everything qbench puts on disk: names checked against where they land, files written atomically, folders
created exclusively and replaced only when qbench can show it owns them; a failed write is one OutputError.

Why each rule:
- a name from user input (suite name, cell id, run label) that is `..` or holds a separator would put a run,
  a baseline or a removal outside the folder it belongs to (`path_component`, `child`);
- a reader (report, compare, resume, another qbench) must see an old file or the whole new one, never a
  torn one, also when the disk fills up half-way (`write_bytes_atomic` and friends);
- two commands started at the same moment must not share a run folder, nor replace each other's report or
  baseline half-way (`create_dir_exclusive`, `staging_dir` + `publish_dir`);
- a folder qbench replaces (a report, a baseline) may hold a person's own files under any name: qbench
  replaces it only when its marker (`OWNED_MARKER`, written last) lists every file in it with the bytes
  qbench wrote, never judging by names (`mark_owned`, `ownership_problem`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_NAME_BYTES = 255  # one path component on Linux, macOS and Windows file systems


class OutputError(OSError):
    """A file or folder qbench had to write could not be written: one line naming it and the reason.

    An OSError (errno and filename kept), so callers that catch OSError still do; `str()` is the line shown.
    """

    def __init__(self, path: Path | str, reason: str, code: int | None = None):
        super().__init__(code or 0, reason, str(path))
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.reason}"

    @classmethod
    def from_os_error(cls, path: Path | str, error: OSError) -> OutputError:
        if isinstance(error, OutputError):
            return error
        return cls(error.filename or path, error.strerror or str(error), error.errno)


def path_component(name: str, what: str) -> str:
    """`name` if it is safe as one folder or file name (not empty, `.` or `..`, no separator, NUL or control
    character, at most 255 bytes); ValueError saying which `what` (e.g. "suite name") is not otherwise."""
    problem = component_problem(name)
    if problem:
        raise ValueError(f"{name!r} is not a valid {what} ({problem})")
    return name


def component_problem(name: str) -> str | None:
    """Why `name` cannot be one path component, or None when it can."""
    if not isinstance(name, str) or not name:
        return "empty"
    if set(name) <= {"."}:
        return "it names the folder itself or its parent"
    if any(sep in name for sep in ("/", "\\", "\0")):
        return "it holds a path separator"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "it holds a control character"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    return None


def child(parent: Path | str, name: str, what: str) -> Path:
    """`parent/name`, checked to land directly inside `parent` (see `path_component`); also when
    `parent/name` already exists as a link to elsewhere. ValueError otherwise."""
    parent = Path(parent)
    path = parent / path_component(name, what)
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; qbench does not write through it ({what} {name!r})")
    return path


def disk_name(text: str) -> str:
    """A path read from a UTF-8 file (a suite, an annotation file) as this process must name it to find it:
    itself, except where the file system encoding cannot hold it (an ASCII locale without Python's UTF-8
    mode, where "café.png" cannot be encoded and an existing file would read as missing): then the same
    UTF-8 bytes, as Python names undecodable bytes (surrogate escapes)."""
    try:
        os.fsencode(text)
        return text
    except UnicodeEncodeError:
        return os.fsdecode(text.encode("utf-8", "surrogateescape"))


def not_a_file(path: Path | str, wanted: str = "file") -> str | None:
    """Why `path` is not the `wanted` thing ("file": a regular file to read; "folder"), in words ("is a FIFO
    (named pipe), not a file"), or None: it is one, or nothing is there at all (the caller says "not found")."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        return None
    except ValueError:
        return "is not a usable path (it holds a NUL byte)"
    except OSError as error:
        reasons = {errno.ELOOP: "is a symbolic link that loops back on itself", errno.ENAMETOOLONG: "is a path too long for this system",
                   errno.ENOTDIR: "cannot be reached: a part of its path is a file, not a folder",
                   errno.EACCES: "cannot be reached (permission denied on a folder of its path)"}
        return reasons.get(error.errno, f"cannot be read ({error.strerror or error})")
    kinds = [(stat.S_ISREG, "file", "a file"), (stat.S_ISDIR, "folder", "a folder"), (stat.S_ISFIFO, "", "a FIFO (named pipe)"),
             (stat.S_ISCHR, "", "a character device"), (stat.S_ISBLK, "", "a block device"), (stat.S_ISSOCK, "", "a socket")]
    kind, name = next(((kind, name) for test, kind, name in kinds if test(mode)), ("", "not a regular file"))
    if kind == wanted:
        return None
    why = " (qbench reads its data files whole, and more than once)" if wanted == "file" and not kind else ""
    return f"is {name}, not a {wanted}{why}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, at import: os.umask sets as it reads, which is not safe once threads write files


def _temporary(path: Path) -> tuple[int, str]:
    """A temporary file beside `path`, with the mode a plain open() would give it (0666 less the umask;
    mkstemp's own 0600 would keep other users of a shared results folder from reading the records)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~UMASK)
        return fd, name
    except OSError as error:
        raise OutputError.from_os_error(path.parent, error) from None


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """Write `data` so a reader sees the old file or the whole new one, never a torn one; on any failure
    (a full disk, a read-only folder) the old file is left as it was and OutputError names `path`."""
    path = Path(path)
    fd, temporary = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise OutputError(path, error.strerror or str(error), error.errno) from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def json_text(data: Any) -> str:
    """How qbench writes a JSON file: indented, keys sorted, anything else as its str()."""
    return json.dumps(data, indent=1, sort_keys=True, default=str) + "\n"


def write_json_atomic(path: Path | str, data: Any) -> None:
    """JSON written atomically (see `write_bytes_atomic`)."""
    write_text_atomic(path, json_text(data))


def make_dirs(path: Path | str, what: str) -> Path:
    """Create `path` and its parents if missing; OutputError naming `what` (e.g. "--out") when one is a file,
    read-only, or cannot be created."""
    path = Path(path)
    for ancestor in (path, *path.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise OutputError(ancestor, f"{what}: {ancestor} is not a folder", errno.ENOTDIR)
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(error.filename or path, f"{what}: {error.strerror or error}", error.errno) from None
    return path


def create_dir_exclusive(parent: Path | str, name: str, what: str = "folder") -> Path:
    """Create a new folder `parent/name`, or `parent/name-2`, `-3`, ... if taken: the folder returned was
    created by this call and by no other process (mkdir is atomic), so two commands started at the same
    moment never share one. OutputError when `parent` cannot hold it."""
    parent = make_dirs(parent, what)
    path_component(name, what)
    for suffix in range(1, 10_000):
        candidate = parent / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as error:
            raise OutputError(candidate, f"{what}: {error.strerror or error}", error.errno) from None
    raise OutputError(parent / name, f"{what}: 10,000 folders of that name exist already", errno.EEXIST)


def staging_dir(target: Path | str) -> Path:
    """A new hidden folder beside `target` to fill before `publish_dir` moves it into place (same file
    system, so the move is a rename). OutputError when the folder beside cannot be written."""
    target = Path(target)
    parent = make_dirs(target.parent, str(target))
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
        os.chmod(staging, 0o777 & ~UMASK)  # published as a plain mkdir would make it, not with mkdtemp's 0700
        return staging
    except OSError as error:
        raise OutputError(error.filename or parent, error.strerror or str(error), error.errno) from None


class NotOwned(ValueError):
    """A folder qbench was asked to replace holds something qbench did not write there."""


OWNED_MARKER = ".qbench-owned.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entries(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(files, folders, other entries: links, FIFOs...) under `folder`, as paths relative to it, marker left out."""
    found: tuple[list[str], list[str], list[str]] = ([], [], [])
    for root, folders, names in os.walk(folder, onerror=_raise):
        here = Path(root).relative_to(folder)
        for name in folders:
            (found[2] if (Path(root) / name).is_symlink() else found[1]).append((here / name).as_posix())
        for name in names:
            path = Path(root) / name
            if here == Path(".") and name == OWNED_MARKER:
                continue
            (found[0] if path.is_file() and not path.is_symlink() else found[2]).append((here / name).as_posix())
    return found


def _raise(error: OSError) -> None:
    raise error


def mark_owned(folder: Path | str, written_by: str) -> None:
    """Write `folder`'s marker: every file qbench wrote in it, with its size and sha256 (call it last, once the
    folder holds everything; `ownership_problem` later tells whether it still holds only that)."""
    folder = Path(folder)
    listed = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
              for name in sorted(_entries(folder)[0])}
    (folder / OWNED_MARKER).write_text(json_text({"written_by": written_by, "files": listed}), encoding="utf-8")


def ownership_problem(folder: Path | str) -> str | None:
    """Why qbench may not remove `folder`, or None: it does not exist, is empty, or holds nothing but the files
    its marker lists, each still as qbench wrote it. Names alone prove nothing: a `report.md` of a person's
    own is theirs."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or not folder.is_dir():
        return "not a folder qbench wrote"
    try:
        found, folders, other = _entries(folder)
        if not found and not folders and not other and not (folder / OWNED_MARKER).exists():
            return None
        try:
            listed = json.loads((folder / OWNED_MARKER).read_text(encoding="utf-8"))["files"]
            if not isinstance(listed, dict):
                raise TypeError
        except FileNotFoundError:
            names = sorted(found + other)
            return (f"holds files qbench did not write there ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}; "
                    f"no {OWNED_MARKER} lists them)")
        except (ValueError, TypeError, KeyError):
            return f"its {OWNED_MARKER} is not one qbench wrote"
        foreign = sorted(other + [name for name in found if name not in listed])
        if foreign:
            return f"holds files qbench did not write there ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
        for name in found:
            expected = listed[name] if isinstance(listed[name], dict) else {}
            path = folder / name
            if path.stat().st_size != expected.get("bytes") or _sha256(path) != expected.get("sha256"):
                return f"{name} was changed since qbench wrote it"
        holding = {parent.as_posix() for name in found for parent in Path(name).parents}
        empty = sorted(set(folders) - holding)
        if empty:
            return f"holds folders qbench did not write there ({', '.join(empty[:3])})"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    return None


def publish_dir(staging: Path, target: Path, owned: Callable[[Path], str | None] | None = None,
                written_by: str = "qbench") -> Path:
    """Mark the finished folder `staging` as qbench's (`mark_owned`) and move it to `target`. An existing
    `target` is replaced only when `ownership_problem` finds nothing in it that qbench did not write, and
    `owned(target)` (a caller's further check) returns None; NotOwned otherwise, and `target` is left as it
    was. The old folder is moved aside first and removed only once the new one is in place. `staging` is
    removed whatever happens."""
    staging, target = Path(staging), Path(target)
    aside = None
    try:
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise NotOwned(f"{target} is not a folder qbench wrote; move it away or choose another folder")
        try:
            mark_owned(staging, written_by)
        except OSError as error:
            raise OutputError.from_os_error(staging / OWNED_MARKER, error) from None
        if target.exists():
            reason = ownership_problem(target) or (owned(target) if owned is not None else None)
            if reason:
                raise NotOwned(f"{target}: {reason}")
            aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                target.rename(aside)
            except OSError as error:
                raise OutputError.from_os_error(target, error) from None
        try:
            staging.rename(target)
        except OSError as error:
            if aside is not None and not target.exists():
                aside.rename(target)  # put the old one back
                aside = None
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise OutputError(target, "another qbench command wrote it at the same moment", error.errno) from None
            raise OutputError.from_os_error(target, error) from None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return target
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
