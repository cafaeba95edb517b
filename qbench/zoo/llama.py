"""Build the builtin tiny Llama: a byte-level BPE tokenizer and a small LlamaForCausalLM, both
trained from scratch on the pretrain part of the builtin pydoc corpus.

    python -m qbench.zoo.llama [--out DIR] [--seed N]

writes a normal Hugging Face checkpoint folder (``config.json``, ``model.safetensors`` in float32,
``tokenizer.json``, ``tokenizer_config.json``) loadable with ``LlamaForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained``. The default folder, ``qbench/zoo/checkpoints/tiny-llama``,
is committed so tests and suites never need to build it.

The model keeps Llama's module names (``q_proj`` ... ``down_proj``) and every linear dimension a
multiple of 64, the bitsandbytes 4-bit block size. Input and output embeddings are tied: the
checkpoint stays small and bitsandbytes leaves the shared matrix unquantized either way.

The tokenizer adds no special tokens when encoding: a corpus is one token stream, cut into
windows by the caller. ``<s>`` / ``</s>`` / ``<pad>`` exist (ids 0, 1, 2) for callers that want them.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
from dataclasses import asdict, dataclass

from qbench.zoo.folders import run_writing

DEFAULT_OUT_DIR = pathlib.Path(__file__).parent / "checkpoints" / "tiny-llama"
CORPUS_NAME = "pydoc"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class ModelShape:
    """The architecture of the tiny Llama; every linear dimension a multiple of 64."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    context_length: int = 128

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size"):
            if getattr(self, name) % 64:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of 64")
        head_dim = self.hidden_size // self.num_attention_heads
        if (head_dim * self.num_key_value_heads) % 64:
            raise ValueError("k_proj / v_proj output size must be a multiple of 64")


@dataclass(frozen=True)
class PretrainSettings:
    """How the tiny Llama is pretrained (next-token loss on random windows of the pretrain text)."""

    steps: int = 500
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 25
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    # One thread: this model's matmuls are too small to gain from two, and on a shared CPU
    # OpenMP threads waiting for each other made a step several times slower.
    num_threads: int = 1


def build(
    out_dir: pathlib.Path,
    seed: int = 0,
    shape: ModelShape = ModelShape(),
    settings: PretrainSettings = PretrainSettings(),
) -> None:
    """Train the tokenizer and the model on the pretrain text and save both into ``out_dir``."""
    import torch

    from qbench.cell.data.text import builtin_corpus, pretrain_text

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = pretrain_text(CORPUS_NAME)

    tokenizer = train_tokenizer(text, shape.vocab_size)
    token_ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)

    caller_threads = torch.get_num_threads()
    torch.set_num_threads(settings.num_threads)
    try:
        torch.manual_seed(seed)
        model = _new_model(shape, tokenizer)
        final_loss = _pretrain(model, token_ids, shape.context_length, settings, seed)
    finally:
        torch.set_num_threads(caller_threads)

    model.config.qbench = {
        "built_by": "python -m qbench.zoo.llama",
        "seed": seed,
        "corpus": builtin_corpus(CORPUS_NAME).source,
        "pretrain_tokens": int(token_ids.numel()),
        "pretrain": asdict(settings),
        "final_train_loss": round(final_loss, 4),
    }
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``text``, wrapped for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_paragraphs(text), trainer=trainer)
    bos, eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        clean_up_tokenization_spaces=False,
    )


def _paragraphs(text: str):
    # The trainer counts words within each item; paragraphs are natural, small items.
    for paragraph in text.split("\n\n"):
        yield paragraph + "\n\n"


def _new_model(shape: ModelShape, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.context_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _pretrain(model, token_ids, context_length: int, settings: PretrainSettings, seed: int) -> float:
    """Next-token loss on random windows; returns the mean loss of the last 20 steps."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate,
        betas=(0.9, 0.95),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(settings))
    offsets = torch.arange(context_length)
    last_losses: list[float] = []
    model.train()
    for _ in range(settings.steps):
        starts = torch.randint(0, token_ids.numel() - context_length, (settings.batch_size, 1), generator=generator)
        batch = token_ids[starts + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        last_losses = (last_losses + [loss.item()])[-20:]
    model.eval()
    return sum(last_losses) / len(last_losses)


def _warmup_cosine(settings: PretrainSettings):
    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qbench.zoo.llama", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT_DIR, help="checkpoint folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_writing("python -m qbench.zoo.llama", args.out, lambda: build(args.out, seed=args.seed))


if __name__ == "__main__":
    sys.exit(main())
