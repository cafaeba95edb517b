"""The user's annotation format: `image_relative_path<TAB>caption` lines plus an image root."""

from __future__ import annotations

from pathlib import Path

from qbench.data.pairs import ClipSplit, DataError


def _image_path(image_root: Path, relative: str, where: str) -> Path:
    candidate = Path(relative)
    if candidate.is_absolute() or relative.startswith(("/", "\\")):
        raise DataError(f"{where}: image path {relative!r} is absolute; paths must be relative to the image root")
    root = image_root.resolve()
    resolved = (root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise DataError(f"{where}: image path {relative!r} escapes the image root {image_root}")
    return resolved


def load_tsv(annotation: Path | str, image_root: Path | str, check_images: bool = True) -> ClipSplit:
    """Read an annotation file. Blank lines are skipped; an image may have several captions, on
    repeated lines or as extra tab-separated fields. Problems name the file and line."""
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
    text = annotation.read_text(encoding="utf-8-sig")
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
            images.append(path)
        for caption in fields:
            if caption:
                captions.append(caption)
                caption_image.append(index_of[path])
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more problems"] if len(problems) > 20 else [])
        raise DataError("\n".join(shown))
    if not captions:
        raise DataError(f"{annotation}: no image-caption lines")
    return ClipSplit(images, captions, caption_image)


def verify_images(split: ClipSplit, annotation: Path | str) -> None:
    """Open every image once; DataError naming the unreadable ones."""
    from PIL import Image, UnidentifiedImageError

    bad = []
    for path in split.images:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError) as error:
            bad.append(f"{annotation}: image {path} is unreadable ({type(error).__name__})")
    if bad:
        raise DataError("\n".join(bad[:20]))
