"""Tiny CLIP test assets, one builder of each: a random checkpoint, images with TSV annotation files,
and suite texts (over such a checkpoint, or over the builtin tiny CLIP and its generated data; built by
tests/helpers/suites.py, which builds every test suite).

The checkpoint is written by `qbench.zoo.full_scale.write_random_clip`, the same code a user runs to
try qbench at full scale offline, with a small configuration.
"""

from __future__ import annotations

import itertools
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (232, 215, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (10, 10, 10), "gray": (128, 128, 128)}
SHAPES = ("square", "circle", "triangle", "bar")
# the LoRA of the reference experiment (suites/clip-vit-b32.toml), for tests that run a user's setup
USER_LORA = 'r = 16\nalpha = 32\ndropout = 0.05\nbias = "none"\ntarget_modules = ["q_proj", "k_proj", "v_proj", "out_proj"]'
WORDS = ("a", "an", "photo", "of", "on", "background", *COLOURS, *BACKGROUNDS, *SHAPES)


def checkpoint(
    folder: Path, *, hidden: int = 32, heads: int = 2, image_size: int = 16, patch_size: int = 4, text_positions: int = 16
) -> Path:
    """A random two-layer CLIPModel (float32 safetensors, MLPs twice `hidden`, 64-word vocabulary) with a
    word-level tokenizer over WORDS and an image processor for `image_size`; returns the folder."""
    from qbench.zoo.full_scale import write_random_clip

    config = {
        "projection_dim": hidden,
        "text_config": {
            "vocab_size": 64, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
            "num_attention_heads": heads, "max_position_embeddings": text_positions,
            # eos 2 is CLIP's legacy value: transformers then pools at the highest id, the tokenizer's end of text
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        },
        "vision_config": {
            "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2, "num_attention_heads": heads,
            "image_size": image_size, "patch_size": patch_size,
        },
    }
    return write_random_clip(folder, config, WORDS, seed=0, dtype="float32")


def draw(shape: str, colour: str, background: str = "white", size: int = 32, shift: int = 0):
    """A PIL image: one coloured shape on a plain background, moved right and down by `shift` pixels."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    low, high = size // 4 + shift, 3 * size // 4 + shift
    fill = COLOURS[colour]
    if shape == "square":
        pen.rectangle((low, low, high, high), fill=fill)
    elif shape == "circle":
        pen.ellipse((low, low, high, high), fill=fill)
    elif shape == "triangle":
        pen.polygon([((low + high) // 2, low), (low, high), (high, high)], fill=fill)
    else:  # bar
        pen.rectangle((size // 8 + shift, size // 2 - 2, 7 * size // 8 - shift, size // 2 + 2), fill=fill)
    return image


def images_tsv(folder: Path, train_images: int = 12, eval_images: int = 6, *, size: int = 32,
               user_format: bool = False) -> dict[str, Path]:
    """Images under folder/images and folder/train.tsv, folder/eval.tsv (`image_relative_path<TAB>caption`);
    returns {"images", "train", "eval"}. Each image shows a shape, colour and background that its caption
    names, cycling through every combination; eval images are shifted from the training ones.

    With `user_format`, the files look like a user's: images in sub-folders, every third a JPEG, a blank line
    or two, and every odd image a second caption on a repeated line (in train right after the first, with a
    spreadsheet's trailing tab; in eval as well).
    """
    images = folder / "images"
    combos = itertools.cycle(itertools.product(SHAPES, COLOURS, BACKGROUNDS))
    lines: dict[str, list[str]] = {"train": [], "eval": []}
    for split, count, shift in (("train", train_images, 0), ("eval", eval_images, 1)):
        for index in range(count):
            shape, colour, background = next(combos)
            suffix = "jpg" if user_format and index % 3 == 0 else "png"
            relative = f"{split}/{index:03d}.{suffix}" if user_format else f"{split}-{index:03d}.png"
            (images / relative).parent.mkdir(parents=True, exist_ok=True)
            draw(shape, colour, background, size, shift).save(images / relative)
            caption = f"a {colour} {shape} on a {background} background"
            if user_format and index % 2:
                second = f"a photo of a {colour} {shape}"
                lines[split] += [f"{relative}\t{caption}\t" if split == "train" else f"{relative}\t{caption}", f"{relative}\t{second}"]
            else:
                lines[split].append(f"{relative}\t{caption}")
            if user_format and index == 2:
                lines[split].append("")
    paths = {"images": images}
    for split, split_lines in lines.items():
        paths[split] = folder / f"{split}.tsv"
        paths[split].write_text("\n".join(split_lines) + ("\n\n" if user_format else "\n"), encoding="utf-8")
    return paths


def suite(
    model: Path | str = "builtin:tiny-clip",
    data: dict[str, Path] | Path | None = None,
    precisions: tuple[str, ...] | None = ("bf16", "nf4"),
    *,
    name: str = "tiny",
    settings: str = "",
    steps: int | None = 3,
    train: str = "batch_size = 8\nlr = 1e-3\nmax_length = 16\nuntimed_steps = 1",
    lora: str = 'r = 4\nalpha = 8\ndropout = 0.0\ntarget_modules = ["q_proj", "v_proj"]',
    evaluation: str | None = "batch_size = 64",
    matrix: str = "",
    model_extra: str = "",
    data_extra: str = "",
    extra: str = "",
) -> str:
    """Suite text for a clip suite (tests/helpers/suites.py's builder): over `data` (images_tsv's paths, or the
    folder it wrote; absolute paths) or, without it, the builtin generated `shapes` set. Every section's body
    can be replaced; `settings` adds top-level keys; `steps` None leaves the steps to `train`; `evaluation` or
    `precisions` None leaves out [eval] or [matrix] (for `extra` to give them); `matrix` adds axes; `extra`
    appends sections."""
    from .suites import text

    if isinstance(data, Path):
        data = {"train": data / "train.tsv", "eval": data / "eval.tsv", "images": data / "images"}
    if data is None:
        data_section = 'kind = "builtin"\nname = "shapes"'
    else:
        data_section = (f'kind = "tsv"\ntrain = "{data["train"]}"\neval = "{data["eval"]}"\n'
                        f'image_root = "{data["images"]}"')
    return text(
        "clip", model, data_section, precisions, name=name, settings=settings, steps=steps, train=train, lora=lora,
        evaluation=evaluation, matrix=matrix, model_extra=model_extra, data_extra=data_extra, extra=extra,
    )


def assert_recall_is_an_exact_share(record: dict, phase: str) -> None:
    """recall@k of `phase` both ways is hits / queries of the record's own eval split (images for
    image->text, captions for text->image), and the mean is their mean: a broken evaluation rarely is."""
    import math

    for direction, queries in (("i2t", record["data.eval_images"]), ("t2i", record["data.eval_captions"])):
        value = record[f"quality.{phase}.{direction}_recall@1"]
        assert math.isclose(value * queries, round(value * queries), abs_tol=1e-9), (direction, value, queries)
    mean = (record[f"quality.{phase}.i2t_recall@1"] + record[f"quality.{phase}.t2i_recall@1"]) / 2
    assert math.isclose(record[f"quality.{phase}.mean_recall@1"], mean, abs_tol=1e-12)
