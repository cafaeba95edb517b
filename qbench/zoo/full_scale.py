"""Full-size architectures with random weights, written as local checkpoint folders (no download).

`python -m qbench.zoo.full_scale DIR` writes a CLIP with the exact configuration of
`openai/clip-vit-base-patch32` (151 M parameters) and random weights, plus a small word-level
tokenizer and the real image processor settings, so that qbench can be proven on the user's
architecture at full size where the hub cannot be reached. The weights are random: memory, bytes
and speed are those of the real model; quality numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qbench.zoo.folders import run_writing

# openai/clip-vit-base-patch32's config.json, written out (text eos_token_id 2 is the hub file's
# legacy value: transformers then pools at the highest token id, which the tokenizer below gives
# its end-of-text token, as the real BPE tokenizer does)
CLIP_VIT_B32_CONFIG: dict[str, Any] = {
    "projection_dim": 512,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 32,
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
}

START_TOKEN, END_TOKEN, UNKNOWN_TOKEN = "<|startoftext|>", "<|endoftext|>", "[UNK]"
DEFAULT_WORDS = (
    "a", "an", "the", "photo", "picture", "of", "on", "with", "and", "in",
    "red", "green", "blue", "yellow", "white", "black", "purple", "orange", "gray", "pink",
    "square", "circle", "triangle", "stripe", "dot", "cross", "background", "small", "large", "bright", "dark",
)


def word_tokenizer(words: tuple[str, ...], vocab_size: int, model_max_length: int) -> Any:
    """A lower-casing word-level tokenizer with CLIP's special-token layout: start/end of text at the
    two highest ids (end of text is also the pad token), words from 0 up."""
    from qbench.zoo.tokenizers import word_level

    vocab = {word: index for index, word in enumerate(dict.fromkeys(w.lower() for w in words))}
    vocab[UNKNOWN_TOKEN] = len(vocab)
    if len(vocab) > vocab_size - 2:
        raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size}")
    start_id, end_id = vocab_size - 2, vocab_size - 1
    vocab[START_TOKEN], vocab[END_TOKEN] = start_id, end_id
    return word_level(vocab, bos=START_TOKEN, eos=END_TOKEN, pad=END_TOKEN, unk=UNKNOWN_TOKEN, model_max_length=model_max_length)


def write_random_clip(
    folder: Path | str,
    config: dict[str, Any] = CLIP_VIT_B32_CONFIG,
    words: tuple[str, ...] = DEFAULT_WORDS,
    seed: int = 0,
    dtype: str = "bfloat16",
) -> Path:
    """Write a CLIPModel with `config` and random weights (stored in `dtype`), a word-level tokenizer
    and a CLIPImageProcessor for its image size into `folder`; returns the folder."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip_config = CLIPConfig(**config)
    torch.manual_seed(seed)
    model = CLIPModel(clip_config).to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    text = clip_config.text_config
    word_tokenizer(words, text.vocab_size, text.max_position_embeddings).save_pretrained(folder)
    size = clip_config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qbench.zoo.full_scale",
        description="Write openai/clip-vit-base-patch32's architecture with random weights into FOLDER.",
    )
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_writing("python -m qbench.zoo.full_scale", args.folder, lambda: write_random_clip(args.folder, seed=args.seed))


if __name__ == "__main__":
    sys.exit(main())
