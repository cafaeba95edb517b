"""Test helpers: real image files on disk with a TSV annotation file, and small local CLIP checkpoints."""

from __future__ import annotations

import itertools
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (235, 220, 40)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "gray": (128, 128, 128)}
SHAPES = ("square", "circle", "triangle")

# a CLIP of the real one's shape, small enough to load in a second
TINY_CLIP_CONFIG = {
    "projection_dim": 32,
    "text_config": {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 32, "patch_size": 8,
    },
}


def draw(path: Path, shape: str, colour: str, background: str, size: int = 48) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    if shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    else:
        pen.polygon([(size // 2, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, 3 * size // 4)], fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_tsv_dataset(root: Path, train_images: int = 12, eval_images: int = 6) -> dict[str, Path]:
    """PNG/JPEG files under root/images (in sub-folders) and train.tsv / eval.tsv in the user's format:
    `image_relative_path<TAB>caption`, a blank line or two, and some images with a second caption
    (as an extra tab-separated field in train, as a repeated line in eval)."""
    combos = itertools.cycle(itertools.product(SHAPES, COLOURS, BACKGROUNDS))
    images = root / "images"
    lines: dict[str, list[str]] = {"train": [], "eval": []}
    for split, count in (("train", train_images), ("eval", eval_images)):
        for index in range(count):
            shape, colour, background = next(combos)
            relative = f"{split}/{index:03d}.{'jpg' if index % 3 == 0 else 'png'}"
            draw(images / relative, shape, colour, background)
            caption = f"a {colour} {shape} on a {background} background"
            second = f"a photo of a {colour} {shape}"
            if index % 2 and split == "train":
                lines[split].append(f"{relative}\t{caption}\t{second}")
            elif index % 2:
                lines[split] += [f"{relative}\t{caption}", f"{relative}\t{second}"]
            else:
                lines[split].append(f"{relative}\t{caption}")
            if index == 2:
                lines[split].append("")
    paths = {"images": images}
    for split, split_lines in lines.items():
        paths[split] = root / f"{split}.tsv"
        paths[split].write_text("\n".join(split_lines) + "\n\n", encoding="utf-8")
    return paths


def write_tiny_clip(folder: Path) -> Path:
    from qbench.zoo.full_scale import write_random_clip

    return write_random_clip(folder, TINY_CLIP_CONFIG)


def clip_suite(
    name: str, model: Path | str, data: dict[str, Path], train: str, extra: str = "", model_extra: str = "", data_extra: str = ""
) -> str:
    """Suite text with the user's LoRA settings on a TSV set; `train` holds the [train] keys, `extra` more sections."""
    return f"""
name = "{name}"
task = "clip"
[model]
id = "{model}"
{model_extra}
[data]
kind = "tsv"
train = "{data['train']}"
eval = "{data['eval']}"
image_root = "{data['images']}"
{data_extra}
[lora]
r = 16
alpha = 32
dropout = 0.05
bias = "none"
target_modules = ["q_proj", "k_proj", "v_proj", "out_proj"]
[train]
{train}
{extra}
"""
