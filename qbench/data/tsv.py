"""The user's annotation format: `image_relative_path<TAB>caption` lines plus an image root."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qbench.data.pairs import ClipSplit, DataError


def _image_path(image_root: Path, relative: str, where: str) -> Path:
    candidate = Path(relative)
    if candidate.is_absolute() or relative.startswith(("/", "\\")):
        raise DataError(f"{where}: image path {relative!r} is absolute; paths must be relative to the image root")
    root = image_root.resolve()
    try:
        resolved = (root / candidate).resolve()
    except (OSError, ValueError) as error:  # a NUL byte, a symlink loop
        raise DataError(f"{where}: image path {relative!r} is not a usable path ({error})") from None
    if not resolved.is_relative_to(root):
        raise DataError(f"{where}: image path {relative!r} escapes the image root {image_root}")
    return resolved


def unreadable_image(path: Path) -> str | None:
    """Why an image file cannot be decoded, or None. Decodes the whole file (JPEGs at reduced size,
    which still reads every byte), so a truncated file is caught here and not in the middle of a cell."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()  # structure and checksums; the image cannot be used afterwards
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{type(error).__name__}: {error}"
    return None


def load_tsv(
    annotation: Path | str, image_root: Path | str, check_images: bool = True, decode_images: bool = False
) -> ClipSplit:
    """Read an annotation file. Blank lines are skipped; an image may have several captions, on
    repeated lines or as extra tab-separated fields. Problems name the file and line.

    `check_images` checks that every image file exists; `decode_images` also decodes each one (slower:
    what the checks before a run do, so that no cell meets a broken image hours later)."""
    annotation, image_root = Path(annotation), Path(image_root)
    if not annotation.is_file():
        raise DataError(f"{annotation}: annotation file not found")
    if not image_root.is_dir():
        raise DataError(f"{image_root}: image root is not a folder")
    images: list[Path] = []
    index_of: dict[Path, int] = {}
    captions: list[str] = []
    caption_image: list[int] = []
    problems: list[str] = []
    try:
        data = annotation.read_bytes()
    except OSError as error:
        raise DataError(f"{annotation}: cannot read the annotation file ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{annotation}:{line}: not UTF-8 text (byte {error.start})") from None
    first_seen: dict[Path, str] = {}  # 'file:line: image NAME' where each image first appears
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{annotation}:{number}"
        if "\t" not in line:
            problems.append(f"{where}: no tab between image path and caption")
            continue
        relative, *fields = line.split("\t")
        fields = [f.strip() for f in fields]
        if not relative.strip():
            problems.append(f"{where}: empty image path")
            continue
        if not any(fields):
            problems.append(f"{where}: empty caption")
            continue
        try:
            path = _image_path(image_root, relative.strip(), where)
        except DataError as error:
            problems.append(str(error))
            continue
        if path not in index_of:
            if check_images and not path.is_file():
                problems.append(f"{where}: image {relative.strip()!r} not found under {image_root}")
                continue
            index_of[path] = len(images)
            first_seen[path] = f"{where}: image {relative.strip()!r}"
            images.append(path)
        for caption in fields:
            if caption:
                captions.append(caption)
                caption_image.append(index_of[path])
    if decode_images:
        with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes without holding the GIL
            for path, reason in zip(images, pool.map(unreadable_image, images), strict=True):
                if reason is not None:
                    problems.append(f"{first_seen[path]} is unreadable ({reason})")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more problems"] if len(problems) > 20 else [])
        raise DataError("\n".join(shown))
    if not captions:
        raise DataError(f"{annotation}: no image-caption lines")
    return ClipSplit(images, captions, caption_image)
