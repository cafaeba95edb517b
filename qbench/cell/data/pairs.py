"""The image-caption split every CLIP loader produces, and the torch dataset over it."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qbench.cell.data.lines import DataError  # noqa: F401 (its old place: callers import it from here)


@dataclass(frozen=True)
class ClipSplit:
    """Images and captions; caption i describes images[caption_image[i]] (several captions may share an image)."""

    images: list[Any]  # PIL images, or paths of image files
    captions: list[str]
    caption_image: list[int]


def _text_groups(split: ClipSplit, text_of: Callable[[str], Hashable] | None) -> torch.Tensor:
    """Per caption, the index of its text among the split's distinct texts."""
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(text_of(c) if text_of else c, len(ids)) for c in split.captions], dtype=torch.long)


def positives(split: ClipSplit, text_of: Callable[[str], Hashable] | None = None) -> torch.Tensor:
    """Boolean [captions, images] matrix of true matches.

    Caption c matches its own image and every image that carries a caption with the same text, as in
    CLIP_benchmark's positive matrix: identical captions get identical embeddings, so they tie, and a
    tie counted against the query would make such captions unfindable whatever the model does.
    `text_of` says what "the same text" is (default: the identical string; the CLIP task passes the
    token ids the model reads, so captions that differ only where the tokenizer does not look match too).
    """
    groups = _text_groups(split, text_of)
    carried = torch.zeros(int(groups.max()) + 1 if len(groups) else 0, len(split.images), dtype=torch.bool)
    carried[groups, torch.tensor(split.caption_image, dtype=torch.long)] = True  # text -> the images carrying it
    return carried[groups]


def duplicate_captions(split: ClipSplit, text_of: Callable[[str], Hashable] | None = None) -> int:
    """How many captions share their text (as `positives` reads it) with a caption of another image."""
    return int((positives(split, text_of).sum(dim=1) > 1).sum())


def open_image(image: Any):
    """An 8-bit RGB PIL image from a PIL image or a path (16-bit scaled, transparency on white: `images.to_rgb`)."""
    from qbench.cell.data.images import open_rgb, to_rgb

    if isinstance(image, (str, Path)):
        return open_rgb(image)
    return to_rgb(image)


class CaptionPairs(torch.utils.data.Dataset):
    """(image, caption) pairs of a split, one per caption; images are opened lazily (worker processes).
    With `indices`, (image index, caption): the images were preprocessed beforehand."""

    def __init__(self, split: ClipSplit, indices: bool = False):
        self.split = split
        self.indices = indices

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        image = self.split.caption_image[index]
        return (image if self.indices else open_image(self.split.images[image])), self.split.captions[index]
