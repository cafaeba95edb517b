"""Self-made tiny assets for robustness tests: a random CLIP checkpoint and a TSV image-caption set.

They are built in a temporary folder, so these tests need neither the builtin zoo nor a network.
"""

from __future__ import annotations

from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "bar", "dot")
WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "on", "white", *COLOURS, *SHAPES]


def make_tiny_clip(folder: Path) -> Path:
    """A random two-layer CLIPModel (hidden 32) with a word-level tokenizer and a 16-pixel image processor."""
    from .tmp_clip import build_checkpoint

    return build_checkpoint(folder, hidden=32, words=WORDS, heads=2, image_size=16, patch_size=4)


def make_tsv_data(folder: Path, train_images: int = 24, eval_images: int = 12) -> Path:
    """images/*.png plus train.tsv and eval.tsv (`path<TAB>caption`) under `folder`."""
    from PIL import Image, ImageDraw

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    for split, count, offset in (("train", train_images, 0), ("eval", eval_images, 5)):
        lines = []
        for index in range(count):
            colour, shape = combos[(index + offset) % len(combos)]
            image = Image.new("RGB", (16, 16), "white")
            draw = ImageDraw.Draw(image)
            box = {"square": (3, 3, 12, 12), "bar": (2, 6, 13, 9), "dot": (5, 5, 10, 10)}[shape]
            draw.rectangle(box, fill=COLOURS[colour]) if shape != "dot" else draw.ellipse(box, fill=COLOURS[colour])
            name = f"{split}-{index:03d}.png"
            image.save(images / name)
            lines.append(f"{name}\ta {colour} {shape} on white")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def suite_text(model: Path, data: Path, name: str = "robust", precisions: tuple[str, ...] = ("bf16", "nf4"),
               steps: int = 3, extra: str = "") -> str:
    """A small clip suite over the tiny checkpoint and TSV data (absolute paths)."""
    from .tmp_clip import suite_text as clip_suite_text

    return clip_suite_text(model, data, list(precisions), steps, name, targets=("q_proj", "v_proj"), dropout=0.0,
                           recall_k=None, extra=extra)
