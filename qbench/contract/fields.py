"""What each record field is — its kind, which direction is better, its unit — looked up by name pattern.

Reports and `qbench compare` are driven by this registry alone, so a new task's metrics (a causal
LM's perplexity, bits per byte) work as soon as their names match a pattern here.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

from qbench.contract import schema

Kind = Literal["exact", "quality", "health", "memory", "speed", "speed-ratio", "interval"]
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
               baseline precision's, in one run; interval — a bound or standard error of a quality
               metric (`interval.<phase>.<metric>.low|high|se`), never gated itself
    direction: which way is better (`None`: neither, e.g. a parameter count)
    unit:      what the stored number is in; the renderers scale it (bytes -> MiB, fraction -> %)
    """

    pattern: str
    kind: Kind
    direction: Direction | None
    unit: str

    def matches(self, name: str) -> bool:
        return fnmatchcase(name, self.pattern)


# first match wins: specific patterns before general ones
FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("weights.bits_per_quantized_param", "exact", "lower", "bits"),
    FieldSpec("weights.quantized_share_of_params", "exact", None, "fraction"),
    FieldSpec("weights.*_bytes", "exact", "lower", "bytes"),
    FieldSpec("weights.*_params", "exact", None, "count"),
    FieldSpec("params.*", "exact", None, "count"),
    # the optimizer's state after its first step: bytes by dtype, how many parameters have 8-bit moments
    FieldSpec("optimizer.*_bytes", "exact", "lower", "bytes"),
    FieldSpec("optimizer.params*", "exact", None, "count"),
    FieldSpec("optimizer.largest_param_elements", "exact", None, "count"),
    FieldSpec("optimizer.state_tensors", "exact", None, "count"),
    FieldSpec("format.*_count", "exact", None, "count"),
    # what was trained on and evaluated: a change here means the data or the eval protocol changed
    FieldSpec("data.fingerprint.files", "exact", None, "count"),
    FieldSpec("data.fingerprint.read_bytes", "exact", None, "bytes"),
    FieldSpec("data.*_images", "exact", None, "count"),
    FieldSpec("data.*_captions", "exact", None, "count"),
    FieldSpec("eval.*tokens", "exact", None, "count"),
    FieldSpec("eval.windows", "exact", None, "count"),
    FieldSpec("eval.bytes", "exact", None, "count"),
    # before the quality patterns: `nonfinite_losses` must not read as a loss
    FieldSpec("quality.*nonfinite_*", "health", "lower", "count"),
    FieldSpec("quality.*recall@*", "quality", "higher", "fraction"),
    FieldSpec("quality.*accuracy*", "quality", "higher", "fraction"),
    FieldSpec("quality.*perplexity*", "quality", "lower", "perplexity"),
    FieldSpec("quality.*bits_per_byte*", "quality", "lower", "bits/byte"),
    FieldSpec("quality.*nll*", "quality", "lower", "nats"),
    FieldSpec("quality.*loss*", "quality", "lower", "loss"),
    FieldSpec("train.*loss", "quality", "lower", "loss"),
    FieldSpec("memory.*_bytes", "memory", "lower", "bytes"),
    FieldSpec("memory.*.seconds", "speed", "lower", "s"),
    FieldSpec(RATIO_PREFIX + "speed.*_per_s", "speed-ratio", "higher", "ratio"),
    FieldSpec(RATIO_PREFIX + "speed.*_per_cpu_s", "speed-ratio", "higher", "ratio"),
    FieldSpec(RATIO_PREFIX + "speed.*_s", "speed-ratio", "lower", "ratio"),
    FieldSpec(RATIO_PREFIX + "time.*_s", "speed-ratio", "lower", "ratio"),
    FieldSpec("speed.*_per_s", "speed", "higher", "1/s"),
    FieldSpec("speed.*_per_cpu_s", "speed", "higher", "1/CPU-s"),
    FieldSpec("cpu.*_s", "speed", "lower", "s"),
    FieldSpec("speed.*_s", "speed", "lower", "s"),
    FieldSpec("time.*_s", "speed", "lower", "s"),
)

# the one number per axis the report plots; the first column a frame has is used
HEADLINE_QUALITY = (
    "quality.after.mean_recall@1",
    "quality.after.perplexity",
    "quality.after.bits_per_byte",
    "quality.after.loss",
    "train.final_loss",
    # a suite with train.steps = 0 measures the base before fine-tuning only
    "quality.before.mean_recall@1",
    "quality.before.perplexity",
)
# on CUDA torch's allocator (tensors only) or NVML; on a CPU the process tree's PSS (shared pages once), else its RSS
HEADLINE_PEAK_MEMORY = (
    "memory.train.torch_max_allocated_bytes",
    "memory.train.nvml_process_peak_bytes",
    "memory.peak_pss_bytes",  # on a CPU: the process tree with shared pages counted once (DataLoader workers)
    "memory.peak_rss_bytes",  # records made before PSS was measured
)
# how a report names each memory source
SOURCE_LABELS = dict(schema.MEMORY_SOURCES)
HEADLINE_THROUGHPUT = ("speed.train_samples_per_s", "speed.train_tokens_per_s")
HEADLINE_WEIGHTS = "weights.base_bytes"



INTERVAL_PREFIX = "interval."
INTERVAL_PARTS = ("low", "high", "se")


def interval_metric(name: str) -> str | None:
    """`interval.after.mean_recall@1.low` -> `quality.after.mean_recall@1`; None for any other name."""
    if not name.startswith(INTERVAL_PREFIX):
        return None
    body, _, part = name.removeprefix(INTERVAL_PREFIX).rpartition(".")
    return f"quality.{body}" if body and part in INTERVAL_PARTS else None


def interval_columns(metric: str) -> dict[str, str]:
    """`quality.after.perplexity` -> {"low": "interval.after.perplexity.low", "high": ..., "se": ...}."""
    body = metric.removeprefix("quality.")
    return {part: f"{INTERVAL_PREFIX}{body}.{part}" for part in INTERVAL_PARTS}


def spec_for(name: str) -> FieldSpec | None:
    """The registry entry for a field name, or None for fields that only describe (identity, config, env).

    An interval bound or standard error gets kind "interval" (never gated) in its metric's unit, so it
    scales like the metric (recall as %, bytes as MiB)."""
    metric = interval_metric(name)
    if metric is not None:
        spec = spec_for(metric)
        return FieldSpec(INTERVAL_PREFIX + "*", "interval", None, spec.unit) if spec is not None else None
    for spec in FIELDS:
        if spec.matches(name):
            return spec
    return None


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
    "weights.base_bytes": "base weights MiB",
    "memory.peak_pss_bytes": "peak PSS MiB",
    "memory.peak_rss_bytes": "peak RSS MiB",
    "memory.train.torch_max_allocated_bytes": "train torch peak allocated MiB",
    "memory.train.nvml_process_peak_bytes": "train NVML process peak MiB",
    "optimizer.state_bytes": "optimizer state MiB",
    "speed.train_samples_per_s": "train samples/s",
    "speed.train_tokens_per_s": "train tokens/s",
}


def memory_source(column: str) -> str | None:
    """The per-phase source key of a memory column: `memory.train.rss_peak_bytes` and `memory.peak_rss_bytes`
    both give `rss_peak_bytes`; None for other columns."""
    parts = column.split(".")
    if len(parts) == 3 and parts[0] == "memory" and parts[2] in SOURCE_LABELS:
        return parts[2]
    return next((source for source in SOURCE_LABELS if schema.overall_peak_key(source) == column), None)


def memory_source_label(column: str) -> str:
    """`memory.peak_rss_bytes` -> "RSS", `memory.train.torch_max_allocated_bytes` -> "torch allocated, train"."""
    source = memory_source(column)
    if source is None:
        return label(column)
    parts = column.split(".")
    return SOURCE_LABELS[source] + (f", {parts[1]}" if len(parts) == 3 else "")


def process_baseline_of(column: str) -> str | None:
    """The record key of a memory column's process baseline (its source read before the model was loaded)."""
    source = memory_source(column)
    return schema.process_baseline_key(source) if source else None


def label(name: str) -> str:
    """A short human name for a field: `quality.after.mean_recall@1` -> `after mean recall@1`."""
    if name in LABELS:
        return LABELS[name]
    spec = spec_for(name)
    parts = name.split(".")
    if name.startswith(RATIO_PREFIX):
        return label(name.removeprefix(RATIO_PREFIX)) + " / baseline's"
    if parts[0] in ("quality", "params", "speed", "time", "train") and len(parts) > 1:
        parts = parts[1:]
    shown = " ".join(parts).replace("_", " ")
    if spec is not None and spec.unit == "bytes":
        shown = shown.removesuffix(" bytes") + " MiB"
    return shown


def quality_name(column: str, short: bool = False) -> str:
    """`quality.after.mean_recall@1` -> "mean recall@1 after fine-tuning" ("mean recall@1 after" when `short`);
    other fields by their label."""
    parts = column.split(".")
    if len(parts) == 3 and parts[0] == "quality":
        phase = parts[1] if short else {"after": "after fine-tuning", "before": "before fine-tuning"}.get(parts[1], parts[1])
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
