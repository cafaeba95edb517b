"""A throwaway tiny CLIP checkpoint and image-caption TSV data, built in a tmp folder.

The measurement tests use it so they need neither the builtin checkpoint nor the builtin data.
"""

from __future__ import annotations

from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "bar")


def _draw(shape: str, colour: tuple[int, int, int], shift: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (32, 32), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    box = (6 + shift, 6 + shift, 24 + shift, 24 + shift)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle((4 + shift, 13, 28 - shift, 19), fill=colour)
    return image


def build_data(folder: Path) -> Path:
    """images/*.png, train.tsv and eval.tsv (every colour x shape, two positions each) under `folder`."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"train": [], "eval": []}
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for split, shift in (("train", 0), ("train", 2), ("eval", 1)):
                name = f"{colour}-{shape}-{shift}.png"
                _draw(shape, rgb, shift).save(images / name)
                lines[split].append(f"{name}\ta {colour} {shape}")
    for split, rows in lines.items():
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def build_checkpoint(
    folder: Path, hidden: int = 64, *, words: list[str] | None = None, heads: int = 4, image_size: int = 32, patch_size: int = 8
) -> Path:
    """A random two-layer CLIPModel (float32 safetensors, MLPs twice `hidden`) with a word-level
    tokenizer over `words` (ids 0-3 are PAD, UNK, BOS, EOS: EOS is not 2, see zoo/clip.py) and an image processor."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    words = words or ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", *COLOURS, *SHAPES]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        model_max_length=16,
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(words), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=heads, max_position_embeddings=16, eos_token_id=3, bos_token_id=2, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=heads,
            image_size=image_size, patch_size=patch_size,
        ),
        projection_dim=hidden,
    )
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    CLIPModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    crop = {"height": image_size, "width": image_size}
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop).save_pretrained(folder)
    return folder


def suite_text(
    checkpoint: Path,
    data: Path,
    precisions: list[str],
    steps: int = 4,
    name: str = "tmpclip",
    *,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj"),
    dropout: float | None = None,
    recall_k: tuple[int, ...] | None = (1, 5),
    extra: str = "",
) -> str:
    """A small clip suite over a tmp checkpoint and TSV data (absolute paths); None leaves qbench's default."""
    listed = ", ".join(f'"{p}"' for p in precisions)
    listed_targets = ", ".join(f'"{t}"' for t in targets)
    lora = (f"dropout = {dropout}\n" if dropout is not None else "") + f"target_modules = [{listed_targets}]"
    evaluation = "batch_size = 64" + (f"\nrecall_k = [{', '.join(map(str, recall_k))}]" if recall_k else "")
    return f"""
name = "{name}"
task = "clip"
[model]
id = "{checkpoint}"
[data]
kind = "tsv"
train = "{data / 'train.tsv'}"
eval = "{data / 'eval.tsv'}"
image_root = "{data / 'images'}"
[lora]
r = 4
alpha = 8
{lora}
[train]
steps = {steps}
batch_size = 8
lr = 1e-3
max_length = 16
untimed_steps = 1
[eval]
{evaluation}
[matrix]
precisions = [{listed}]
{extra}"""
