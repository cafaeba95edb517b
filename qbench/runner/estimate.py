"""A lower bound on the memory one cell needs, from the model's config and the suite's sizes, set against
the memory of the device the cells will run on: a suite that cannot fit is refused before any cell.

Only tensors a step cannot do without are counted, so the bound never refuses what could run:

- the base's weights at 4 bits per parameter (the smallest format; 16-bit arms need four times that);
- CLIP: the image batch as float32 pixel values (batch x 3 x size x size x 4 bytes, what the image
  processor returns) and its patch embeddings in the compute dtype;
- causal LM: the logits of a batch (batch x length x vocabulary, in the compute dtype) and the float32
  log-probabilities the loss takes of them (qbench.cell.tasks.causal_lm.summed_nll).

A real step needs several times more (activations kept for the backward pass, attention, optimizer
state); a suite that passes may still run out of memory, and that cell is then recorded as failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qbench.contract.lengths import setting_key

GIB = 1024**3
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
WEIGHT_BYTES_PER_PARAMETER = 0.5  # 4-bit codes, the least any precision of the registry stores


@dataclass
class Need:
    """Bytes one phase of a cell needs at least, by part, and the suite keys that size it."""

    phase: str
    keys: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{what} {size / GIB:,.1f} GiB" for what, size in self.parts.items())


def _compute_bytes(suite: Any) -> int:
    return DTYPE_BYTES.get(suite.compute_dtype, 2)


def needs(suite: Any, config: Any, parameters: int, max_length: int, eval_window: int | None = None) -> list[Need]:
    """Lower bounds for a training step and an evaluation batch of the suite on the model `config`
    (`max_length`: tokens per training sequence; `eval_window`: the causal LM's perplexity window)."""
    weights = int(parameters * WEIGHT_BYTES_PER_PARAMETER)
    compute = _compute_bytes(suite)
    train, evaluate = suite.train, suite.eval
    if suite.task == "clip":
        vision = getattr(config, "vision_config", None)
        size, patch = getattr(vision, "image_size", 0) or 0, getattr(vision, "patch_size", 0) or 0
        hidden = getattr(vision, "hidden_size", 0) or 0
        patches = (size // patch) ** 2 + 1 if patch else 0

        def images(batch: int) -> dict[str, int]:
            return {
                f"pixel values {batch}x3x{size}x{size} float32": batch * 3 * size * size * 4,
                f"patch embeddings {batch}x{patches}x{hidden}": batch * patches * hidden * compute,
            }

        return [
            Need("train", setting_key(suite, "batch_size"), {"weights at 4 bits": weights, **images(train.batch_size)}),
            Need("eval", "eval.batch_size", {"weights at 4 bits": weights, **images(evaluate.batch_size)}),
        ]
    vocab = getattr(config, "vocab_size", 0) or 0

    def logits(batch: int, length: int) -> dict[str, int]:
        cells = batch * length * vocab
        return {f"logits {batch}x{length}x{vocab}": cells * compute, "their float32 log-probabilities": cells * 4}

    window = evaluate.window or eval_window or 0
    keys = f"{setting_key(suite, 'batch_size')} x {setting_key(suite, 'max_length')}"
    found = [Need("train", keys, {"weights at 4 bits": weights, **logits(train.batch_size, max_length)})]
    if window:
        found.append(Need("eval", "eval.batch_size x eval.window", {"weights at 4 bits": weights, **logits(evaluate.batch_size, window)}))
    return found


def _ram() -> tuple[int, str]:
    import psutil

    return psutil.virtual_memory().total, "RAM of this machine"


def device_memory(device: str, gpus_per_cell: int = 1) -> tuple[int, str] | None:
    """(bytes, what) one cell can use at most on `device` (cpu: the machine's RAM; cuda: the largest GPUs'
    memory as NVML reports it, without starting CUDA; auto: cuda's when NVML sees a GPU, else cpu's), or
    None when it cannot be read."""
    if device == "cpu":
        return _ram()
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            totals = sorted(
                (pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total for i in range(pynvml.nvmlDeviceGetCount())),
                reverse=True,
            )
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver: on cuda the check is skipped (the cell finds out)
        totals = []
    if not totals:
        return _ram() if device == "auto" else None
    count = max(1, min(gpus_per_cell, len(totals)))
    return sum(totals[:count]), f"memory of {'the largest GPU' if count == 1 else f'the {count} largest GPUs'} (NVML)"


def _train_fix(suite: Any, batch_key: str) -> str:
    """What to change when one training batch does not fit. For a causal LM train.grad_accum keeps the effective
    batch; a contrastive loss compares each query with the pairs of its batch only, so for CLIP a smaller batch is
    another objective unless train.contrastive_batch = "step" keeps every micro-batch's pairs."""
    if suite.task != "clip":
        return f"lower {batch_key} (train.grad_accum keeps the effective batch)"
    if suite.train.contrastive_batch == "step":
        return (f"lower {batch_key} and raise train.grad_accum as much (train.contrastive_batch = \"step\" keeps the "
                "step's pairs as each query's negatives)")
    return (f"lower {batch_key}: for this contrastive (clip) loss that also cuts each query's negatives "
            f"({batch_key} - 1), which train.grad_accum alone does not give back, so quality moves with it; to keep "
            "them, raise train.grad_accum as much and set train.contrastive_batch = \"step\"")


def memory_problems(suite: Any, config: Any, parameters: int, device: str, gpus_per_cell: int = 1,
                    max_length: int = 64, eval_window: int | None = None) -> list[str]:
    """One line per phase whose lower bound exceeds the device's memory, naming the suite keys that size it."""
    available = device_memory(device, gpus_per_cell)
    if available is None:
        return []
    limit, what = available
    problems = []
    for need in needs(suite, config, parameters, max_length, eval_window):
        if need.total > limit:
            fix = _train_fix(suite, need.keys.split(" x ")[0]) if need.phase == "train" else "lower eval.batch_size"
            problems.append(
                f"{need.keys}: one {need.phase} batch needs at least {need.total / GIB:,.1f} GiB ({need.describe()}), "
                f"more than the {limit / GIB:,.1f} GiB {what}; {fix}"
            )
    return problems
