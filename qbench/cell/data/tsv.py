"""The user's annotation format: `image_relative_path<TAB>caption` lines plus an image root."""

from __future__ import annotations

import hashlib
import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qbench.cell.data.lines import DataError, physical_lines, raise_problems
from qbench.cell.data.pairs import ClipSplit
from qbench.contract.files import disk_name, not_a_file
from qbench.contract.fingerprint import FileHashes


def _image_path(image_root: Path, relative: str, where: str) -> Path:
    candidate = Path(disk_name(relative))
    if candidate.is_absolute() or relative.startswith(("/", "\\")):
        raise DataError(f"{where}: image path {relative!r} is absolute; paths must be relative to the image root")
    root = image_root.resolve()
    try:
        resolved = (root / candidate).resolve()
    except RuntimeError:  # pathlib's "Symlink loop from ..."
        raise DataError(f"{where}: image path {relative!r} is a symbolic link that loops back on itself") from None
    except (OSError, ValueError) as error:  # a NUL byte, a name too long
        raise DataError(f"{where}: image path {relative!r} is not a usable path ({error})") from None
    if not resolved.is_relative_to(root):
        raise DataError(f"{where}: image path {relative!r} escapes the image root {image_root}")
    return resolved


def unreadable_image(path: Path) -> str | None:
    """Why an image file cannot be used, or None (see `read_image`)."""
    return read_image(path)[0]


def read_image(path: Path) -> tuple[str | None, str | None, int]:
    """(why the image file cannot be used or None, sha256 of its bytes, its size): the file is read once,
    hashed (the data fingerprint) and decoded whole from those bytes (JPEGs at reduced size, which still
    reads every byte) and converted to RGB as a cell will (`images.to_rgb`), so a truncated file or a pixel
    format qbench refuses is caught here and not in the middle of a cell. An image PIL warns about as a
    possible decompression bomb is refused too (a cell would decode it whole in every epoch)."""
    from PIL import Image

    from qbench.cell.data.images import to_rgb

    try:
        data = path.read_bytes()
    except (OSError, ValueError) as error:
        return f"cannot be read ({getattr(error, 'strerror', None) or error})", None, 0
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a line of ours, not PIL's raw warning
            with Image.open(io.BytesIO(data)) as image:
                image.verify()  # structure and checksums; the image cannot be used afterwards
            with Image.open(io.BytesIO(data)) as image:
                image.draft(image.mode, (64, 64))  # a JPEG decodes at reduced size; other formats ignore this
                image.load()
                to_rgb(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{type(error).__name__}: {error}", digest, len(data)
    return None, digest, len(data)


def parse_line(line: str) -> tuple[str, str] | str:
    """(image path, caption) of one annotation line, or why the line is not one.

    A line is `image_relative_path<TAB>caption`: the path is the text before the first tab, the caption
    the text after it; spaces around either are dropped, and so are empty fields at the end of the line
    (a spreadsheet's trailing tab). A further tab inside the caption is an error: it is either a caption
    holding a tab or a second caption on the same line, and qbench will not guess which (put each caption
    of an image on its own line)."""
    if "\t" not in line:
        return "no tab between image path and caption"
    relative, _, caption = line.partition("\t")
    caption = caption.rstrip("\t ")
    if "\t" in caption:
        fields = 2 + caption.count("\t")
        return (
            f"{fields} tab-separated fields; a line is image_path<TAB>caption: put each further caption of this image "
            "on a line of its own (a caption cannot hold a tab)"
        )
    if not relative.strip():
        return "empty image path"
    if not caption.strip():
        return "empty caption"
    return relative.strip(), caption.strip()


def load_tsv(
    annotation: Path | str, image_root: Path | str, check_images: bool = True, decode_images: bool = False,
    hashes: FileHashes | None = None, key: str = "data",
) -> ClipSplit:
    """Read an annotation file of `image_relative_path<TAB>caption` lines (`parse_line`).

    Lines are counted as `wc -l` and `awk` count them (`qbench.cell.data.lines`): UTF-8, LF or CRLF endings, a
    byte order mark allowed; blank lines are skipped. An image may have several captions, one per line.
    Every problem names the file and its physical line (DataError, one problem per line).

    `check_images` checks that every image file exists; `decode_images` also decodes each one (slower:
    what the checks before a run do, so that no cell meets a broken image hours later). `hashes` (the data
    fingerprint, suite key `key`) gets the hash of the annotation file and, when decoding, of every image,
    from the bytes read for the checks."""
    annotation, image_root = Path(annotation), Path(image_root)
    if not image_root.is_dir():
        raise DataError(f"{image_root}: image root is not a folder")
    numbered = physical_lines(annotation, "annotation file",
                              (lambda data: hashes.add_data_file(key, data)) if hashes is not None else None)
    relative_of: dict[Path, str] = {}
    images: list[Path] = []
    index_of: dict[Path, int] = {}
    captions: list[str] = []
    caption_image: list[int] = []
    problems: list[str] = []
    first_seen: dict[Path, str] = {}  # 'file:line: image NAME' where each image first appears
    for number, line in numbered:
        if not line.strip():
            continue
        where = f"{annotation}:{number}"
        parsed = parse_line(line)
        if isinstance(parsed, str):
            problems.append(f"{where}: {parsed}")
            continue
        relative, caption = parsed
        try:
            path = _image_path(image_root, relative, where)
        except DataError as error:
            problems += error.problems
            continue
        if path not in index_of:
            if check_images and not path.is_file():
                odd = not_a_file(path) or not_a_file(image_root / disk_name(relative))  # a dangling link resolves away
                problems.append(f"{where}: image {relative!r} {odd if odd else 'not found'} under {image_root}")
                continue
            index_of[path] = len(images)
            relative_of[path] = relative
            first_seen[path] = f"{where}: image {relative!r}"
            images.append(path)
        captions.append(caption)
        caption_image.append(index_of[path])
    if decode_images:
        with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes without holding the GIL
            for path, (reason, digest, size) in zip(images, pool.map(read_image, images), strict=True):
                if reason is not None:
                    problems.append(f"{first_seen[path]} is unreadable ({reason})")
                if hashes is not None and digest is not None:
                    hashes.add_image(relative_of[path], digest, size)
    raise_problems(problems)
    if not captions:
        raise DataError(f"{annotation}: no image-caption lines")
    return ClipSplit(images, captions, caption_image)
