"""What each record field is — how the gate judges it, which direction is better, its unit — and how a report
names and scales it, all read from the record model's metadata (qbench.contract.record).

Reports and `qbench compare` ask here alone, so a new task's metrics work as soon as the model declares them.
The columns compare derives (`ratio.<speed field>`: one precision's figure over the baseline precision's,
within one run) take their direction from the field they are a ratio of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from qbench.contract import record, schema

# the gate's classes (qbench.contract.record.Gate), and speed-ratio for the ratios compare derives
Kind = Literal["exact", "quality", "health", "memory", "speed", "speed-ratio", "informational", "interval"]
Direction = Literal["higher", "lower"]

# derived columns: a speed metric of one precision over the baseline precision's, within one run
RATIO_PREFIX = "ratio."


@dataclass(frozen=True)
class FieldSpec:
    """How to read one record field.

    kind:      exact — must match between runs (bytes, bits, counts); quality — task metrics, compared
               within a tolerance; health — counts of non-finite model outputs in evaluation, which
               must not rise (no noise allowance); memory — peaks, compared within a relative
               tolerance; speed — absolute times and rates, which move from machine to machine and
               are only compared as ratios; speed-ratio — a speed metric of one precision over the
               baseline precision's, in one run; informational — measured and shown, never gated;
               interval — a bound or standard error of a quality metric (`interval.<phase>.<metric>.low|high|se`),
               never gated itself
    direction: which way is better (`None`: neither, e.g. a parameter count)
    unit:      what the stored number is in; the renderers scale it (bytes -> MiB, fraction -> %)
    """

    kind: Kind
    direction: Direction | None
    unit: str


# the one number per axis the report plots; the first column a frame has is used
HEADLINE_QUALITY = (
    "quality.eval_after.mean_recall@1",
    "quality.eval_after.perplexity",
    "quality.eval_after.bits_per_byte",
    "train.final_loss",
    # a suite with train.steps = 0 measures the base before fine-tuning only
    "quality.eval_before.mean_recall@1",
    "quality.eval_before.perplexity",
)
# on CUDA torch's allocator (tensors only) or NVML; on a CPU the process tree's PSS (shared pages once), else its RSS
HEADLINE_PEAK_MEMORY = (
    "memory.train.torch_allocated_peak_bytes",
    "memory.train.nvml_process_peak_bytes",
    "memory.all_phases.pss_peak_bytes",  # on a CPU: the process tree with shared pages counted once (DataLoader workers)
    "memory.all_phases.rss_peak_bytes",  # records made before PSS was measured
)
# how a report names each memory source
SOURCE_LABELS = dict(schema.MEMORY_SOURCES)
HEADLINE_THROUGHPUT = ("speed.train_samples_per_s", "speed.train_tokens_per_s")
HEADLINE_WEIGHTS = "weights.load.base_bytes"

INTERVAL_PREFIX = "interval."
INTERVAL_PARTS = ("low", "high", "se")

# how a label names the evaluation phases (the keys say eval_before / eval_after)
PHASE_WORDS = {"eval_before": "before", "eval_after": "after"}


def interval_metric(name: str) -> str | None:
    """`interval.eval_after.mean_recall@1.low` -> `quality.eval_after.mean_recall@1`; None for any other name."""
    if not name.startswith(INTERVAL_PREFIX):
        return None
    body, _, part = name.removeprefix(INTERVAL_PREFIX).rpartition(".")
    return f"quality.{body}" if body and part in INTERVAL_PARTS else None


def interval_columns(metric: str) -> dict[str, str]:
    """`quality.eval_after.perplexity` -> {"low": "interval.eval_after.perplexity.low", "high": ..., "se": ...}."""
    body = metric.removeprefix("quality.")
    return {part: f"{INTERVAL_PREFIX}{body}.{part}" for part in INTERVAL_PARTS}


def spec_for(name: str) -> FieldSpec | None:
    """How the gate and the report read a record field (or a ratio compare derives), from the record model's
    metadata; None for fields that only describe (identity, settings, environment, text).

    An interval bound or standard error gets kind "interval" (never gated) in its metric's unit, so it
    scales like the metric (recall as %)."""
    if name.startswith(RATIO_PREFIX):
        base = spec_for(name.removeprefix(RATIO_PREFIX))
        return FieldSpec("speed-ratio", base.direction, "ratio") if base is not None and base.kind == "speed" else None
    info = record.key_info(name)
    figure = info.figure if info is not None else None
    if figure is None:
        return None
    if figure.gate == "interval":
        metric = interval_metric(name)
        spec = spec_for(metric) if metric else None
        return FieldSpec("interval", None, spec.unit) if spec is not None else None
    return FieldSpec(figure.gate, figure.better, figure.unit)


def ratio_column(name: str) -> str:
    return RATIO_PREFIX + name


def cpu_time_field(name: str) -> str | None:
    """The CPU-time twin of a throughput field (`speed.train_samples_per_s` -> `speed.train_samples_per_cpu_s`:
    the same work over the process's CPU seconds), or None for a field that has none."""
    if name.startswith("speed.") and name.endswith("_per_s") and not name.endswith("_per_cpu_s"):
        return name.removesuffix("_per_s") + "_per_cpu_s"
    return None


def first_present(frame: Any, candidates: tuple[str, ...]) -> str | None:
    """The first of `candidates` that is a column of `frame` with at least one value (CPU records hold None for CUDA counters)."""
    return next((c for c in candidates if c in frame.columns and frame[c].notna().any()), None)


# names people know these by; other fields get a name made from their key
LABELS = {
    "weights.load.base_bytes": "base weights MiB",
    "memory.all_phases.pss_peak_bytes": "peak PSS MiB",
    "memory.all_phases.rss_peak_bytes": "peak RSS MiB",
    "memory.train.torch_allocated_peak_bytes": "train torch peak allocated MiB",
    "memory.train.nvml_process_peak_bytes": "train NVML process peak MiB",
    "optimizer.state_bytes": "optimizer state MiB",
    "speed.train_samples_per_s": "train samples/s",
    "speed.train_tokens_per_s": "train tokens/s",
}


def memory_source(column: str) -> str | None:
    """The source of a memory peak column: `memory.train.rss_peak_bytes` and `memory.all_phases.rss_peak_bytes`
    both give `rss_peak_bytes`; None for other columns."""
    parts = column.split(".")
    if len(parts) == 3 and parts[0] == "memory" and parts[2] in SOURCE_LABELS and parts[1] in (*schema.PHASES, schema.ALL_PHASES):
        return parts[2]
    return None


def phase_columns(columns: Any, source: str) -> list[str]:
    """The per-phase columns of a memory source among `columns`, in the order the phases run."""
    present = set(columns)
    return [f"memory.{phase}.{source}" for phase in schema.PHASES if f"memory.{phase}.{source}" in present]


def memory_source_label(column: str) -> str:
    """`memory.all_phases.rss_peak_bytes` -> "RSS", `memory.train.torch_allocated_peak_bytes` -> "torch allocated, train"."""
    source = memory_source(column)
    if source is None:
        return label(column)
    phase = column.split(".")[1]
    return SOURCE_LABELS[source] + (f", {phase}" if phase in schema.PHASES else "")


def process_baseline_of(column: str) -> str | None:
    """The record key of a memory column's process baseline (its source read before the model was loaded)."""
    source = memory_source(column)
    return schema.process_baseline_key(source) if source else None


def label(name: str) -> str:
    """A short human name for a field: `quality.eval_after.mean_recall@1` -> `after mean recall@1`."""
    if name in LABELS:
        return LABELS[name]
    if name.startswith(RATIO_PREFIX):
        return label(name.removeprefix(RATIO_PREFIX)) + " / baseline's"
    spec = spec_for(name)
    parts = name.split(".")
    if parts[0] in ("quality", "params", "speed", "time", "train") and len(parts) > 1:
        parts = parts[1:]
    shown = " ".join(PHASE_WORDS.get(part, part) for part in parts).replace("_", " ")
    if spec is not None and spec.unit == "bytes":
        shown = shown.removesuffix(" bytes") + " MiB"
    return shown


def quality_name(column: str, short: bool = False) -> str:
    """`quality.eval_after.mean_recall@1` -> "mean recall@1 after fine-tuning" ("mean recall@1 after" when
    `short`); other fields by their label."""
    parts = column.split(".")
    if len(parts) == 3 and parts[0] == "quality":
        word = PHASE_WORDS.get(parts[1], parts[1])
        phase = word if short else (f"{word} fine-tuning" if parts[1] in PHASE_WORDS else word)
        return f"{parts[2].replace('_', ' ')} {phase}"
    return label(column)


def headed(name: str, unit: str) -> str:
    """A column header with its unit: "mean recall@1 after (%)"; the unit is left out where the name says it."""
    return name if not unit or unit in name else f"{name} ({unit})"


def scale(name: str) -> tuple[float, str]:
    """(factor, unit) to show a stored value in readable units: bytes as MiB, fractions as %."""
    spec = spec_for(name)
    if spec is None:
        return 1.0, ""
    if spec.unit == "bytes":
        return 1 / (1024 * 1024), "MiB"
    if spec.unit == "fraction":
        return 100.0, "%"
    return 1.0, spec.unit
