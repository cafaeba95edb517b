"""The builtin "shapes" image-caption dataset: coloured shapes on coloured backgrounds, generated.

Every image is a 32x32 RGB picture of one shape (circle, square, ...) in one colour, placed with
some jitter on a background of another colour. The splits differ in what the captions say:

- ``pretrain``: the caption names the shape and its colour, never the background, in a dozen
  wordings. A model trained on it learns to ignore the background.
- ``shifted-train`` / ``shifted-eval``: the caption also names the background colour
  ("a blue background with a red circle"; training also uses "a red circle on a blue
  background"). This is the shift LoRA has to learn. The two splits hold disjoint (colour, shape,
  background) combinations; the combination split is fixed and does not depend on the seed, so
  any train seed and any eval seed stay disjoint. Every eval caption is unique, so text-to-image
  retrieval has exactly one right answer.

A base model that knows shapes and colours but not backgrounds can at best rank the right eval
caption among the four that differ only in the background, so its zero-shot recall@1 stays low
(about 20% for the builtin tiny CLIP).

Same (split, seed) gives byte-identical images and captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from qbench.cell.data.pairs import ClipSplit

IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # drawn 4x larger and downsampled, so edges are anti-aliased

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (35, 160, 55),
    "cyan": (40, 205, 220),
    "blue": (35, 65, 215),
    "purple": (135, 45, 185),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")

PRETRAIN_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "{colour} {shape}",
    "the {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "an image of a {colour} {shape}",
    "a drawing of the {colour} {shape}",
    "a small picture of a {colour} {shape}",
    "there is a {colour} {shape} in the picture",
    "this is a photo of a {colour} {shape}",
    "a simple drawing of a {colour} {shape} shape",
)
SHIFTED_TEMPLATES: tuple[str, ...] = (
    "a {background} background with a {colour} {shape}",
    "a {colour} {shape} on a {background} background",
)

SPLITS: dict[str, str] = {
    "pretrain": "shape + colour captions, background never named (what the tiny CLIP learned)",
    "shifted-train": "captions also name the background colour; LoRA fine-tuning data",
    "shifted-eval": "held-out colour/shape/background combinations, one unique caption per image",
}

_PRETRAIN_IMAGES = 12000
_SHIFTED_TRAIN_IMAGES_PER_COMBO = 6
_EVAL_BACKGROUNDS_PER_PAIR = 4  # of the 7 backgrounds a (colour, shape) can have, 4 are held out
_SPLIT_STREAMS = {"pretrain": 1, "shifted-train": 2, "shifted-eval": 3}


@dataclass(frozen=True)
class Scene:
    """What one image shows: enough to draw it and to caption it."""

    shape: str
    colour: str
    background: str
    size_px: float  # side of the shape's bounding box, in output pixels
    centre_x: float
    centre_y: float
    angle_deg: float


def make_split(name: str, seed: int = 0) -> ClipSplit:
    """Generate split ``name`` (a key of SPLITS) deterministically from ``seed``."""
    if name not in SPLITS:
        raise ValueError(f"unknown shapes split {name!r}; choose one of {sorted(SPLITS)}")
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[name]])
    if name == "pretrain":
        scenes = [_random_scene(rng, *_random_content(rng)) for _ in range(_PRETRAIN_IMAGES)]
        captions = [_caption(rng, scene, PRETRAIN_TEMPLATES) for scene in scenes]
        return ClipSplit([render(s, rng) for s in scenes], captions, list(range(len(scenes))))
    train_combos, eval_combos = shifted_combinations()
    if name == "shifted-train":
        scenes = [_random_scene(rng, *combo) for combo in train_combos for _ in range(_SHIFTED_TRAIN_IMAGES_PER_COMBO)]
        order = rng.permutation(len(scenes))
        scenes = [scenes[i] for i in order]
        captions = [_caption(rng, scene, SHIFTED_TEMPLATES) for scene in scenes]
        return ClipSplit([render(s, rng) for s in scenes], captions, list(range(len(scenes))))
    scenes = [_random_scene(rng, *combo) for combo in eval_combos]
    captions = [_caption(rng, scene, SHIFTED_TEMPLATES[:1]) for scene in scenes]
    return ClipSplit([render(s, rng) for s in scenes], captions, list(range(len(scenes))))


def content_bytes(split: ClipSplit) -> bytes:
    """What a generated split holds, as bytes to hash (the data fingerprint): every image's size, mode and
    pixels, every caption and the image it describes."""
    parts = [f"{image.size[0]}x{image.size[1]} {image.mode}\n".encode() + image.tobytes() for image in split.images]
    parts += [f"{index}\t{caption}\n".encode() for index, caption in zip(split.caption_image, split.captions, strict=True)]
    return b"".join(parts)


def split_size(name: str) -> int:
    """Images (one caption each) of split ``name``, counted without drawing them."""
    if name not in SPLITS:
        raise ValueError(f"unknown shapes split {name!r}; choose one of {sorted(SPLITS)}")
    if name == "pretrain":
        return _PRETRAIN_IMAGES
    train, held_out = shifted_combinations()
    return len(train) * _SHIFTED_TRAIN_IMAGES_PER_COMBO if name == "shifted-train" else len(held_out)


def shifted_combinations() -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(colour, shape, background) combinations of shifted-train and shifted-eval; disjoint.

    Each (colour, shape) keeps 3 of its 7 possible backgrounds for training and holds out 4; the
    held-out ones rotate with colour and shape, so every (colour, background) and (shape,
    background) pair still occurs in training.
    """
    colours = list(COLOURS)
    train, held_out = [], []
    for c, colour in enumerate(colours):
        backgrounds = colours[c + 1 :] + colours[:c]  # the 7 colours other than the shape's
        for s, shape in enumerate(SHAPES):
            for k in range(len(backgrounds)):
                combo = (colour, shape, backgrounds[(k + c + 2 * s) % len(backgrounds)])
                (held_out if k < _EVAL_BACKGROUNDS_PER_PAIR else train).append(combo)
    return train, held_out


def render(scene: Scene, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``scene`` as an IMAGE_SIZE x IMAGE_SIZE RGB image; ``rng`` adds pixel noise."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    cx, cy = scene.centre_x * _SUPERSAMPLE, scene.centre_y * _SUPERSAMPLE
    r = scene.size_px * _SUPERSAMPLE / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(r * 0.4)))
    elif scene.shape == "square":
        draw.polygon(_polygon(cx, cy, r * 0.9 * 2**0.5, 4, 45 + scene.angle_deg), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.1, 3, -90 + scene.angle_deg), fill=fill)
    elif scene.shape == "cross":
        arm = r * 0.36
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    if rng is None:
        return image
    noise = rng.normal(0.0, 6.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def vocabulary() -> list[str]:
    """Every word any split's captions can use, sorted."""
    words = set(COLOURS) | set(SHAPES)
    for template in PRETRAIN_TEMPLATES + SHIFTED_TEMPLATES:
        words.update(w for w in template.split() if not w.startswith("{"))
    return sorted(words)


def content_key(caption: str) -> tuple[str, ...]:
    """(colour, shape) or, when the caption names it, (colour, shape, background).

    Captions with equal keys describe the same content, whatever their wording.
    """
    words = caption.split()
    colour = shape = background = None
    for word, following in zip(words, [*words[1:], ""], strict=True):
        if word in COLOURS and following == "background":
            background = word
        elif word in COLOURS:
            colour = word
        elif word in SHAPES:
            shape = word
    return (colour, shape) if background is None else (colour, shape, background)


def _random_content(rng: np.random.Generator) -> tuple[str, str, str]:
    colours = list(COLOURS)
    colour = colours[rng.integers(len(colours))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    background = [c for c in colours if c != colour][rng.integers(len(colours) - 1)]
    return colour, shape, background


def _random_scene(rng: np.random.Generator, colour: str, shape: str, background: str) -> Scene:
    size_px = float(rng.uniform(14.0, 23.0))
    margin = size_px / 2 + 1
    return Scene(
        shape=shape,
        colour=colour,
        background=background,
        size_px=size_px,
        centre_x=float(rng.uniform(margin, IMAGE_SIZE - margin)),
        centre_y=float(rng.uniform(margin, IMAGE_SIZE - margin)),
        angle_deg=float(rng.uniform(-12.0, 12.0)),
    )


def _caption(rng: np.random.Generator, scene: Scene, templates: tuple[str, ...]) -> str:
    template = templates[rng.integers(len(templates))]
    words = template.format(colour=scene.colour, shape=scene.shape, background=scene.background)
    words = words.split()
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words)


def _polygon(cx: float, cy: float, radius: float, sides: int, start_deg: float) -> list:
    angles = np.deg2rad(start_deg + np.arange(sides) * 360.0 / sides)
    return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]
