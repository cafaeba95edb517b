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

import math
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


# -- what fits: the peak of a cell, predicted before it runs (qbench fit) ---------------------------------------------
#
# The figure predicted is the one a fit judges (qbench.cell.budget): the peak of the bytes the cell's tensors hold
# above its process baseline, over its phases. Each phase's peak is the sum of what is exact and what is not:
#
#   load         the checkpoint's tensors as read, plus the base in its precision (a quantized base: plus the
#                transients of quantizing one linear, LOAD_QUANTIZE_TRANSIENT times its dequantized bytes)
#   train        the base, the LoRA adapters, the optimizer's state, and one step's activations and gradients
#   eval         the base, the LoRA adapters, and one evaluation batch's activations
#
# The base's bytes are counted from the model's shapes and each format's layout, the adapters from the LoRA
# modules, the optimizer state from its registry entry (bitsandbytes' 8-bit layout), and the activations by
# running the task's own step on the meta device (qbench.cell.estimate), sampled along the searched axis and
# interpolated. After each trial the arm's exact parts are replaced by the record's (weights.load.base_bytes,
# optimizer.state_bytes), what the process held after loading and attaching LoRA beyond them is added (the
# prepare phase's peak less base and adapters), its load and evaluation peaks are the measured ones, and the
# activations are scaled by the ratio of what was measured to what the meta device gave (`ArmModel.learn`).

LOAD_QUANTIZE_TRANSIENT = 8
BNB_8BIT_BLOCK = 256  # bitsandbytes' 8-bit optimizer state: one float32 absmax per 256 values
BNB_QMAP_BYTES = 256 * 4


def optimizer_state_bytes(optimizer: str, elements: list[int], min_8bit_size: int = 4096) -> int:
    """Bytes of `optimizer`'s state (qbench.contract.optimizers) for trainable tensors of `elements` values each
    (float32 LoRA parameters): torch AdamW keeps two float32 moments and a float32 step per tensor; bitsandbytes'
    8-bit optimizers keep each moment as one byte per value with a float32 absmax per block of 256 (tensors
    below `min_8bit_size` values keep float32 moments) and one quantization map per moment for all tensors."""
    from qbench.contract import optimizers

    spec = optimizers.get(optimizer)
    moments = 1 if spec.class_name.startswith("Lion") else 2
    if spec.library == "torch":
        return sum(moments * 4 * n + 4 for n in elements)
    if spec.state_bits == 32:
        return sum(moments * 4 * n for n in elements)
    total = moments * BNB_QMAP_BYTES if any(n >= min_8bit_size for n in elements) else 0
    for n in elements:
        total += moments * (n + math.ceil(n / BNB_8BIT_BLOCK) * 4) if n >= min_8bit_size else moments * 4 * n
    return total


@dataclass(frozen=True)
class Prediction:
    """The predicted peak of each phase (bytes above the process baseline) and the largest of them."""

    load: int
    train: int
    eval: int | None  # None: the suite does not evaluate

    @property
    def peak(self) -> int:
        return max(v for v in (self.load, self.train, self.eval) if v is not None)

    @property
    def phase(self) -> str:
        return max(((v, k) for k, v in (("load", self.load), ("train", self.train), ("eval", self.eval)) if v is not None))[1]


@dataclass
class Curve:
    """Activation bytes at sampled values of the searched axis, interpolated linearly between them (and
    extrapolated from the last two beyond)."""

    values: list[int]
    bytes: list[int]

    def at(self, value: float) -> float:
        xs, ys = self.values, self.bytes
        if len(xs) == 1:
            return ys[0] * value / xs[0] if xs[0] else ys[0]
        index = min(max(1, next((i for i, x in enumerate(xs) if x >= value), len(xs) - 1)), len(xs) - 1)
        x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
        return y0 + (y1 - y0) * (value - x0) / (x1 - x0)


@dataclass
class ArmModel:
    """One arm's prediction along one axis, and what its trials taught it."""

    base_bytes: int
    adapter_bytes: int
    optimizer_bytes: int
    load_bytes: int
    train: Curve
    eval: Curve | None
    evaluates: bool
    train_scale: float = 1.0
    eval_scale: float = 1.0
    held_extra: int = 0  # learned: what the process's tensors held after loading and LoRA beyond base and adapters
    load_measured: int | None = None
    exact_from: str = "estimate"  # or "record": the base and optimizer bytes were replaced by a trial's exact ones

    def predict(self, value: int) -> Prediction:
        static = self.base_bytes + self.adapter_bytes + self.held_extra
        load = self.load_measured if self.load_measured is not None else self.load_bytes
        train = static + self.optimizer_bytes + self.train_scale * self.train.at(value)
        evaluation = static + self.eval_scale * self.eval.at(value) if self.evaluates and self.eval is not None else None
        return Prediction(int(load), int(train), None if evaluation is None else int(evaluation))

    def exact_parts(self) -> int:
        """What no value of the axis can go below: the base, the adapters and the optimizer's state."""
        return self.base_bytes + self.adapter_bytes + self.optimizer_bytes

    def learn(self, value: int, record: dict[str, Any], phase_key: str) -> None:
        """Take a trial's exact bytes and its measured phase peaks (`memory.<phase>.<phase_key>`) into the model."""
        # the base as it trains (after the suite's k-bit preparation, which may cast it), else as loaded
        trained = record.get("weights.prepare.base_bytes", record.get("weights.load.base_bytes"))
        if trained is not None:
            self.base_bytes = int(trained)
            self.exact_from = "record"
        if record.get("optimizer.state_bytes") is not None:
            self.optimizer_bytes = int(record["optimizer.state_bytes"])
        measured = {phase: record.get(f"memory.{phase}.{phase_key}")
                    for phase in ("load", "prepare", "train", "eval_before", "eval_after")}
        if measured["load"] is not None:
            self.load_measured = int(measured["load"])
        if measured["prepare"] is not None:  # the base as loaded and the adapters attached, as the process holds them
            self.held_extra = max(0, int(measured["prepare"]) - self.base_bytes - self.adapter_bytes)
        static = self.base_bytes + self.adapter_bytes + self.held_extra
        if measured["train"] is not None and self.train.at(value) > 0:
            self.train_scale = max(0.0, (measured["train"] - static - self.optimizer_bytes) / self.train.at(value))
        evaluated = [v for k, v in measured.items() if k.startswith("eval") and v is not None]
        if evaluated and self.eval is not None and self.eval.at(value) > 0:
            self.eval_scale = max(0.0, (max(evaluated) - static) / self.eval.at(value))


def sample_values(low: int, high: int, count: int = 7) -> list[int]:
    """`count` values from `low` to `high`, spaced evenly on a log scale (both ends included), each once."""
    if high <= low:
        return [low]
    ratio = (high / low) ** (1 / (count - 1))
    return sorted({low, high, *(int(round(low * ratio**i)) for i in range(1, count - 1))})


def run_estimate_child(server: Any, request: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
    """Ask qbench.cell.estimate (forked from `server`, or as `python -m` when None); its JSON answer.
    RuntimeError with the child's error when it fails."""
    from qbench.runner.launch import Target, run_json_child

    return run_json_child(server, Target("qbench.cell.estimate", "qbench.cell.estimate:main"), request, "the estimate",
                          timeout_s=timeout_s, error_key=True)
