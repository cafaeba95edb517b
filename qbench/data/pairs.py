"""The image-caption split every CLIP loader produces, and the torch dataset over it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and, where it applies, the line."""


@dataclass(frozen=True)
class ClipSplit:
    """Images and captions; caption i describes images[caption_image[i]] (several captions may share an image)."""

    images: list[Any]  # PIL images, or paths of image files
    captions: list[str]
    caption_image: list[int]


def positives(split: ClipSplit) -> torch.Tensor:
    """Boolean [captions, images] matrix of true matches."""
    index = torch.tensor(split.caption_image)
    return index[:, None] == torch.arange(len(split.images))[None, :]


def open_image(image: Any):
    """A PIL RGB image from a PIL image or a path."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


class CaptionPairs(torch.utils.data.Dataset):
    """(image, caption) pairs of a split, one per caption; images are opened lazily (worker processes)."""

    def __init__(self, split: ClipSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        return open_image(self.split.images[self.split.caption_image[index]]), self.split.captions[index]
