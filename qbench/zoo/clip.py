"""Build the builtin tiny CLIP: a word-level tokenizer, a small CLIPModel pretrained on "shapes".

The checkpoint is an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, preprocessor_config.json), so every task loads it exactly as it would load
a model from the hub. Rebuild it with

    python -m qbench.zoo.clip [--out DIR] [--seed N]

Pretraining sees only the "pretrain" split of qbench.cell.data.shapes (captions name the shape and its
colour, never the background), so the model is good at shapes and colours and blind to the
background: the shift that the LoRA fine-tune on "shifted-train" has to learn.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

from qbench.zoo.folders import run_writing

DEFAULT_OUT_DIR = pathlib.Path(__file__).parent / "checkpoints" / "tiny-clip"

# Special tokens come first. EOS must not have id 2: transformers' CLIP text encoder falls back to
# a legacy rule for eos_token_id == 2 and pools at the largest token id instead of at EOS.
PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
# Words the generator does not use today, so captions of a richer dataset still tokenize.
SPARE_WORDS = tuple(
    "black pink gray brown star hexagon heart oval big large tiny left right top bottom centre with and "
    "two one under above".split()
)
MAX_TEXT_TOKENS = 16

TEXT_HIDDEN, TEXT_LAYERS = 64, 2
VISION_HIDDEN, VISION_LAYERS, PATCH_SIZE = 64, 3, 8
# MLPs 16x wider than the hidden size: double quantization adds a fixed ~1 KiB per layer (a 256-entry
# float32 code table and an offset) and saves 3 bytes per 64 values, so it only stores fewer bytes
# than plain 4-bit for layers above ~22k values. With 64x1024 MLPs nf4-dq < nf4 holds for the whole
# base, as it does for real models; with 64x256 MLPs it would not.
TEXT_MLP = VISION_MLP = 16 * 64
ATTENTION_HEADS, PROJECTION_DIM = 4, 64

PRETRAIN_STEPS = 2500
PRETRAIN_BATCH = 128
PRETRAIN_LR = 1e-3
PRETRAIN_WARMUP_STEPS = 100
PRETRAIN_WEIGHT_DECAY = 0.05
PRETRAIN_THREADS = 1


def build(out_dir: pathlib.Path, seed: int = 0) -> None:
    """Pretrain the tiny CLIP from ``seed`` and write the checkpoint folder ``out_dir``."""
    import torch

    torch.manual_seed(seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    caller_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    # One thread, as the committed checkpoint was built: float sums split over another number of
    # threads round differently, and the rebuild is meant to be byte-identical on any machine.
    torch.set_num_threads(PRETRAIN_THREADS)
    try:
        _build(pathlib.Path(out_dir), seed)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(caller_threads)


def _build(out_dir: pathlib.Path, seed: int) -> None:
    import torch

    from qbench.cell.data import shapes

    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = make_tokenizer(shapes.vocabulary())
    image_processor = make_image_processor(shapes.IMAGE_SIZE)
    model = make_model(tokenizer, shapes.IMAGE_SIZE)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny-clip: {n_params:,} parameters; generating the pretrain split (seed {seed})")

    split = shapes.make_split("pretrain", seed)
    pixels = image_processor(images=split.images, return_tensors="pt")["pixel_values"]
    pixels = pixels[torch.tensor(split.caption_image)]
    text = tokenizer(
        split.captions, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt"
    )
    keys = [shapes.content_key(c) for c in split.captions]
    key_ids = torch.tensor([sorted(set(keys)).index(k) for k in keys])
    _pretrain(model, pixels, text["input_ids"], text["attention_mask"], key_ids, seed)

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    print(f"tiny-clip: wrote {out_dir}")


def make_tokenizer(words: list[str]):
    """A word-level tokenizer over ``words`` + SPARE_WORDS that wraps text as [BOS] ... [EOS]."""
    from qbench.zoo.tokenizers import word_level

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(words) | set(SPARE_WORDS)):
        vocab.setdefault(word, len(vocab))
    return word_level(vocab, bos=BOS_TOKEN, eos=EOS_TOKEN, pad=PAD_TOKEN, unk=UNK_TOKEN, model_max_length=MAX_TEXT_TOKENS,
                      pairs=True, padding_side="right")


def make_image_processor(image_size: int):
    """A CLIP image processor for image_size x image_size inputs (resize and crop are no-ops)."""
    import transformers

    # Without torchvision, transformers 5 provides the PIL backend; both save the same config.
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None)
    if processor_class is None:
        processor_class = transformers.CLIPImageProcessor
    return processor_class(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def make_model(tokenizer, image_size: int):
    """A randomly initialised tiny CLIPModel whose special token ids match ``tokenizer``."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_MLP,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=ATTENTION_HEADS,
        max_position_embeddings=MAX_TEXT_TOKENS,
        projection_dim=PROJECTION_DIM,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_MLP,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=ATTENTION_HEADS,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        projection_dim=PROJECTION_DIM,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=PROJECTION_DIM,
    )
    return CLIPModel(config)


def _pretrain(model, pixels, input_ids, attention_mask, key_ids, seed: int) -> None:
    """Contrastive pretraining where every pair with the same content counts as a positive."""
    import torch
    import torch.nn.functional as F
    from transformers import get_scheduler

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=PRETRAIN_WEIGHT_DECAY)
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=PRETRAIN_WARMUP_STEPS, num_training_steps=PRETRAIN_STEPS
    )
    model.train()
    started = time.perf_counter()
    n = len(key_ids)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    for step in range(1, PRETRAIN_STEPS + 1):
        if cursor + PRETRAIN_BATCH > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        batch = order[cursor : cursor + PRETRAIN_BATCH]
        cursor += PRETRAIN_BATCH
        out = model(input_ids=input_ids[batch], attention_mask=attention_mask[batch], pixel_values=pixels[batch])
        same = (key_ids[batch, None] == key_ids[None, batch]).float()
        targets = same / same.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(out.logits_per_image, targets) + F.cross_entropy(out.logits_per_text, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == 1:
            elapsed = time.perf_counter() - started
            print(
                f"  step {step:5d}/{PRETRAIN_STEPS}  loss {loss.item():.4f}  "
                f"scale {model.logit_scale.exp().item():6.2f}  {elapsed:6.1f}s"
            )
    model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_writing("python -m qbench.zoo.clip", args.out, lambda: build(args.out, args.seed))


if __name__ == "__main__":
    sys.exit(main())
