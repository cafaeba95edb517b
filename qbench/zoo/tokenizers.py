"""The word-level tokenizer both CLIP builders use: lower-cased words split on whitespace, each text
wrapped in start/end-of-text tokens (the builtin tiny CLIP and the full-scale random CLIP differ only in
their vocabulary and special tokens)."""

from __future__ import annotations

from typing import Any


def word_level(
    vocab: dict[str, int], *, bos: str, eos: str, pad: str, unk: str, model_max_length: int, pairs: bool = False,
    padding_side: str | None = None,
) -> Any:
    """A PreTrainedTokenizerFast over `vocab` (word -> id; the special tokens included) that writes
    `bos text eos` (and, with `pairs`, `bos a eos b eos` for two texts)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B:1 {eos}:1" if pairs else None,
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    options = {"padding_side": padding_side} if padding_side else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        model_max_length=model_max_length, **options,
    )
