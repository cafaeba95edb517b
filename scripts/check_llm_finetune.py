"""Check that the builtin tiny Llama is fit for the benchmark: held-out perplexity must clearly
drop after a short LoRA fine-tune on the pydoc fine-tune text.

    python scripts/check_llm_finetune.py [--checkpoint DIR] [--seeds 0 1 2] [--quantization nf4]

Standalone on purpose (it does not use qbench's runner or training loop) so the checkpoint can be
judged on its own. Perplexity protocol: the eval text is one token stream cut into non-overlapping
windows of the model's context length; window k reads tokens [kL, kL+L) and is scored on the next
tokens [kL+1, kL+L+1), so every token after the first is scored exactly once, the last window
being shorter.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time
from dataclasses import asdict, dataclass

from qbench.zoo.llama import DEFAULT_OUT_DIR

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class FineTuneSettings:
    """The recommended LoRA fine-tune for the tiny Llama on the pydoc train text."""

    steps: int = 100
    batch_size: int = 8
    sequence_length: int = 128
    learning_rate: float = 5e-3
    warmup_steps: int = 10
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    eval_batch_size: int = 32


@dataclass(frozen=True)
class SeedResult:
    seed: int
    perplexity_before: float
    perplexity_after: float
    final_train_loss: float
    train_s: float
    train_cpu_s: float

    @property
    def change(self) -> float:
        return self.perplexity_after / self.perplexity_before - 1.0


def perplexity(model, token_ids, context_length: int, batch_size: int = 32) -> float:
    """Token perplexity over non-overlapping windows, every token after the first scored once."""
    import torch

    total_nll = 0.0
    scored = 0
    starts = list(range(0, token_ids.numel() - 1, context_length))
    device = next(model.parameters()).device
    with torch.no_grad():
        for first in range(0, len(starts), batch_size):
            windows = starts[first : first + batch_size]
            lengths = {min(context_length, token_ids.numel() - 1 - start) for start in windows}
            # Full windows are batched; the one shorter tail window runs on its own.
            for length in sorted(lengths, reverse=True):
                group = [start for start in windows if min(context_length, token_ids.numel() - 1 - start) == length]
                inputs = torch.stack([token_ids[start : start + length] for start in group]).to(device)
                targets = torch.stack([token_ids[start + 1 : start + length + 1] for start in group]).to(device)
                logits = model(input_ids=inputs).logits.float()
                total_nll += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                ).item()
                scored += targets.numel()
    return math.exp(total_nll / scored)


def load_model(checkpoint: pathlib.Path, quantization: str):
    import torch
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quantization_config = None
    if quantization == "int8":
        quantization_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    elif quantization in ("nf4", "fp4"):
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=torch.bfloat16
        )
    return LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, quantization_config=quantization_config)


def run_seed(checkpoint: pathlib.Path, seed: int, settings: FineTuneSettings, quantization: str) -> SeedResult:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, get_scheduler

    from qbench.cell.data.text import builtin_corpus

    corpus = builtin_corpus("pydoc")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    train_ids = torch.tensor(tokenizer(corpus.train)["input_ids"], dtype=torch.long)
    eval_ids = torch.tensor(tokenizer(corpus.eval)["input_ids"], dtype=torch.long)

    model = load_model(checkpoint, quantization).eval()
    context_length = model.config.max_position_embeddings
    before = perplexity(model, eval_ids, context_length, settings.eval_batch_size)
    # Fine-tune a freshly loaded copy: with bitsandbytes 0.50 on a CPU with AVX512-BF16, a no-grad
    # forward in eval mode repacks Linear4bit weights for an inference kernel that has no
    # backward, and every later training step then gets wrong gradients (loss climbs).
    del model
    model = load_model(checkpoint, quantization)

    torch.manual_seed(seed)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        bias="none",
        target_modules=list(LORA_TARGETS),
    )
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = get_scheduler(
        settings.scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=settings.steps,
    )
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(settings.sequence_length + 1)
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    started_cpu = time.process_time()
    for _ in range(settings.steps):
        starts = torch.randint(
            0, train_ids.numel() - settings.sequence_length - 1, (settings.batch_size, 1), generator=generator
        )
        window = train_ids[starts + offsets]
        logits = model(input_ids=window[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - started
    train_cpu_s = time.process_time() - started_cpu
    model.eval()
    after = perplexity(model, eval_ids, context_length, settings.eval_batch_size)
    tail = losses[-10:]
    return SeedResult(seed, before, after, sum(tail) / len(tail), train_s, train_cpu_s)


def main(argv: list[str] | None = None) -> int:
    import torch

    defaults = FineTuneSettings()
    parser = argparse.ArgumentParser(
        prog="python scripts/check_llm_finetune.py", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--checkpoint", type=pathlib.Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quantization", choices=["none", "int8", "nf4", "fp4"], default="none")
    parser.add_argument("--min-drop", type=float, default=0.03, help="required relative perplexity drop")
    # One thread: at this size a second one gains little, and on a shared CPU OpenMP threads
    # waiting for each other made bf16 steps several times slower.
    parser.add_argument("--threads", type=int, default=1)
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    settings = FineTuneSettings(**{name: getattr(args, name) for name in asdict(defaults)})
    torch.set_num_threads(args.threads)

    print(f"settings: {settings}")
    results = [run_seed(args.checkpoint, seed, settings, args.quantization) for seed in args.seeds]
    for result in results:
        print(
            f"seed {result.seed}: perplexity {result.perplexity_before:.3f} -> {result.perplexity_after:.3f}"
            f" ({100 * result.change:+.1f}%), final train loss {result.final_train_loss:.3f},"
            f" train {result.train_s:.1f} s wall / {result.train_cpu_s:.1f} s CPU"
        )
    worst = max(result.change for result in results)
    ok = worst <= -args.min_drop
    print(f"{'OK' if ok else 'FAIL'}: worst change {100 * worst:+.1f}% (required <= {-100 * args.min_drop:.1f}%)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
