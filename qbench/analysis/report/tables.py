"""The report's tables from a DataFrame of records: per precision, quantization damage, memory, provenance."""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

import pandas as pd

from qbench.analysis import stats
from qbench.contract import fields, schema

MB = 1024 * 1024
MISSING = "—"

# the one quality number per task the damage table puts before fine-tuning next to the baseline's
HEADLINE = {
    "clip": ("quality.eval_after.mean_recall@1", "Δ mean R@1 vs {base} (points)", 100),
    "causal_lm": ("quality.eval_after.perplexity", "Δ ppl vs {base}", 1),
}


def format_value(value: Any, digits: int = 2, signed: bool = False) -> str:
    """A table cell as every renderer shows it: floats to `digits` decimals, never "-0.00" (a value that
    rounds to zero is "0.00"), missing (None, NaN) as "—", infinities as "∞"; `signed` adds "+" to positives."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return str(bool(value)).lower()
    if isinstance(value, numbers.Integral):
        return f"{int(value):+d}" if signed else str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return MISSING
        if math.isinf(value):
            return ("+∞" if signed else "∞") if value > 0 else "-∞"
        shown = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
        if float(shown) == 0:  # "-0.00" and "+0.00" both say a sign the value does not have
            shown = f"{0:.{digits}f}"
        return shown
    if isinstance(value, str):
        return value
    return MISSING if pd.isna(value) else str(value)


def with_interval(value: Any, low: Any, high: Any, digits: int = 2, signed: bool = False) -> str:
    """"31.88 [24.38, 39.38]": a value and its interval; the value alone where the interval is missing."""
    shown = format_value(value, digits, signed)
    if shown == MISSING or any(v is None or pd.isna(v) for v in (low, high)):
        return shown
    return f"{shown} [{format_value(low, digits, signed)}, {format_value(high, digits, signed)}]"


LOW, HIGH = " low", " high"  # a numeric table's interval columns beside the figure they bound


def display(table: pd.DataFrame, digits: int | dict[str, int] = 2, interval: str | None = None) -> pd.DataFrame:
    """`table` with every cell a display string (format_value): what the terminal, Markdown and HTML all show.

    A column `X` with columns `X low` and `X high` beside it becomes one column "X [low, high]"; a
    column whose name starts with "Δ" (a difference) shows its sign.
    """
    shown = pd.DataFrame(index=table.index)
    for column in table.columns:
        if column.endswith((LOW, HIGH)) and column.rsplit(" ", 1)[0] in table.columns:
            continue
        places = digits.get(column, 2) if isinstance(digits, dict) else digits
        signed = str(column).startswith("Δ")
        values = table[column]
        if f"{column}{LOW}" in table.columns and f"{column}{HIGH}" in table.columns:
            lows, highs = table[f"{column}{LOW}"], table[f"{column}{HIGH}"]
            shown[f"{column} [{interval or stats.confidence_label()}]"] = [
                with_interval(v, lo, hi, places, signed) for v, lo, hi in zip(values, lows, highs, strict=True)
            ]
        else:
            shown[column] = [format_value(v, places, signed) for v in values]
    return shown


def markdown(table: pd.DataFrame, digits: int | dict[str, int] = 2, interval: str | None = None) -> str:
    """A table as GitHub Markdown with the cells exactly as `display` writes them (no "nan", no "-0.00")."""
    shown = display(table, digits, interval)
    return shown.to_markdown(disable_numparse=True, colalign=("left", *("right",) * len(shown.columns)))


def ok_means(frame: pd.DataFrame, by: str = stats.ARM) -> pd.DataFrame:
    """Mean over seeds of the ok cells, one row per arm (`stats.arms`: a precision, or a precision with
    the other axes the grid varies), in the frame's arm order; `by="precision"` for figures that depend
    on the precision alone (weight bytes)."""
    if frame.empty or "status" not in frame.columns:
        return pd.DataFrame()
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    if by == "precision":
        return ok.groupby("precision").mean(numeric_only=True).reindex(stats.precision_order(ok))
    labels = stats.arms(frame)  # labelled over every cell, so a failed cell's axis value still names the arms
    means = ok.groupby(labels[ok.index]).mean(numeric_only=True)
    means = means.reindex([arm for arm in stats.arm_order(frame) if arm in means.index])
    means.index.name = stats.arm_index_name(frame)
    return means


def failures(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "status" not in frame.columns:
        return pd.DataFrame()
    bad = frame[frame["status"] != "ok"]
    return bad[["cell_id", "status", "error"]] if not bad.empty else pd.DataFrame()


def quantization_damage(frame: pd.DataFrame) -> pd.DataFrame:
    """Per precision: weight error vs the checkpoint, and the task metric of the base *before* any
    fine-tuning next to the baseline precision's (the damage quantization alone does), the difference
    with its interval (`Δ ... low` / `high`) and what it says."""
    means = ok_means(frame)
    if means.empty:
        return pd.DataFrame()
    table = pd.DataFrame(index=means.index)
    for column, label in (("weights.load.error.rel_mean", "weight error, mean (%)"), ("weights.load.error.rel_max", "weight error, max (%)")):
        if column in means.columns:
            table[label] = means[column] * 100
    task, baseline = frame["task"].iloc[0], stats.baseline_precision(frame)
    if task in HEADLINE:
        before = HEADLINE[task][0].replace(".eval_after.", ".eval_before.", 1)
        factor, unit = fields.scale(before)
        metric = fields.quality_name(before, short=True).removesuffix(" before")
        if before in means.columns:
            table[fields.headed(f"{metric} before, this base", unit)] = means[before] * factor
            compared = stats.compare_quality(frame, before)
            if compared is not None:
                table[fields.headed(f"{metric} before, {baseline} base", unit)] = baseline_values(compared.table, "mean") * factor
                head = fields.headed(f"Δ {metric} vs {baseline} before training", "points" if unit == "%" else unit)
                table[head] = compared.table["delta"] * factor
                table[head + LOW] = compared.table["delta_low"] * factor
                table[head + HIGH] = compared.table["delta_high"] * factor
                table[f"before training vs {baseline}"] = compared.table["verdict"]
    return table if len(table.columns) else pd.DataFrame()


def baseline_values(compared: pd.DataFrame, column: str) -> pd.Series:
    """For each arm of a comparison table (`stats.compare_quality(...).table`), its baseline arm's `column`."""
    return pd.Series(compared[column].reindex(compared["baseline_arm"].fillna("")).to_numpy(), index=compared.index)


def memory_table(frame: pd.DataFrame, phases: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Peak MiB per precision for every (phase, source) the records measured, after the process baseline of
    each source ("before load": what the process held before the model was loaded); sources never
    measured are left out."""
    means = ok_means(frame)
    if means.empty:
        return pd.DataFrame()
    columns = {}
    found = {c.split(".")[1] for c in means.columns if c.startswith("memory.") and c.endswith(".sampled_s")}
    ordered = [p for p in schema.PHASES if p in found] + sorted(found - set(schema.PHASES))
    for source, label in fields.SOURCE_LABELS.items():
        baseline = schema.process_baseline_key(source)
        if baseline in means.columns and means[baseline].notna().any():
            columns[f"before load {label}"] = means[baseline] / MB
    for phase in phases or tuple(ordered):
        for source, label in fields.SOURCE_LABELS.items():
            column = f"memory.{phase}.{source}"
            if column in means.columns and means[column].notna().any():
                columns[f"{phase} {label}"] = means[column] / MB
    return pd.DataFrame(columns, index=means.index) if columns else pd.DataFrame()


# (key within a phase, key of the peak over all phases, shown name)
PEAK_SOURCES = tuple((key, schema.overall_peak_key(key), f"{label} MiB") for key, label in schema.MEMORY_SOURCES.items())


def peak_memory_table(frame: pd.DataFrame, phase: str | None = None) -> pd.DataFrame:
    """Peak MiB per precision from each source, over every phase (or in one `phase`); every source is a
    column, and one never measured shows as missing, not as zero."""
    means = ok_means(frame)
    if means.empty:
        return pd.DataFrame()
    table = pd.DataFrame(index=means.index)
    for phase_key, overall_key, label in PEAK_SOURCES:
        column = overall_key if phase is None else f"memory.{phase}.{phase_key}"
        table[label] = means[column] / MB if column in means.columns else float("nan")
    if "weights.load.base_bytes" in means.columns:
        table["base weights MiB"] = means["weights.load.base_bytes"] / MB
    return table


PROVENANCE_COLUMNS = ("run_id", "suite", "env.device", "env.device_name", "env.hostname", "env.git_commit", "env.torch_version",
                      "env.bitsandbytes_version")


def _status(frame: pd.DataFrame, order: list[str]) -> pd.Series:
    grouped = frame.groupby(stats.arms(frame), sort=False)["status"]
    return grouped.agg(lambda s: ",".join(sorted(set(s)))).reindex(order)


def precision_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The one per-arm table (per precision in a suite without other axes; mean over ok cells), numeric, with
    units in the headers: status, seeds,
    base weights, peak memory from the source that means something on this device with the process
    baseline before the model and the increase over it, throughput, the headline quality before and
    after (after with its interval: `... low` / `... high`) and the final train loss. Every renderer
    (terminal, summary.md, report.md, HTML) shows this table; `display` formats it."""
    if frame.empty:
        return pd.DataFrame()
    order = stats.arm_order(frame)
    table = pd.DataFrame(index=pd.Index(order, name=stats.arm_index_name(frame)))
    table["status"] = _status(frame, order)
    table["seeds"] = frame.groupby(stats.arms(frame), sort=False)["seed"].nunique().reindex(order) if "seed" in frame.columns else 1
    memory = fields.first_present(frame, fields.HEADLINE_PEAK_MEMORY)
    process = fields.process_baseline_of(memory) if memory else None
    throughput = fields.first_present(frame, fields.HEADLINE_THROUGHPUT)
    throughput_cpu = fields.cpu_time_field(throughput) if throughput else None
    if throughput_cpu not in frame.columns or frame[throughput_cpu].isna().all():
        throughput_cpu = None
    wanted = [c for c in ("weights.load.base_bytes", "weights.load.bits_per_quantized_param", memory, process, throughput,
                          throughput_cpu, "speed.step_time_p50_s", "train.final_loss") if c]
    agg = stats.aggregate(frame, wanted)
    mean = agg.mean
    if "weights.load.base_bytes" in mean.columns:
        table["base weights (MiB)"] = mean["weights.load.base_bytes"] / MB
    if "weights.load.bits_per_quantized_param" in mean.columns and mean["weights.load.bits_per_quantized_param"].notna().any():
        table["bits per quantized weight"] = mean["weights.load.bits_per_quantized_param"]
    if memory:
        source = fields.memory_source_label(memory)
        table[f"peak memory (MiB, {source})"] = mean[memory] / MB
        if process in mean.columns and mean[process].notna().any():
            table["before model load (MiB)"] = mean[process] / MB
            table["increase over it (MiB)"] = (mean[memory] - mean[process]) / MB
    if throughput:
        table[fields.label(throughput)] = mean[throughput]
        # how many cell processes each speed figure is the mean of (shown, not tested: see qbench gate)
        table["timed cells"] = agg.count[throughput]
    if throughput_cpu:  # what a busy machine moves least: the same work over the process's CPU seconds
        table[fields.label(throughput_cpu)] = mean[throughput_cpu]
    if "speed.step_time_p50_s" in mean.columns:
        table["step time p50 (s)"] = mean["speed.step_time_p50_s"]
    quality = fields.first_present(frame, fields.HEADLINE_QUALITY)
    if quality:
        factor, unit = fields.scale(quality)
        before = quality.replace(".eval_after.", ".eval_before.", 1)
        if before != quality and before in frame.columns:
            table[fields.headed(fields.quality_name(before, short=True), unit)] = stats.quality_intervals(frame, before)["mean"].reindex(order) * factor
        intervals = stats.quality_intervals(frame, quality).reindex(order)
        head = fields.headed(fields.quality_name(quality, short=True), unit)
        table[head] = intervals["mean"] * factor
        table[head + LOW] = intervals["low"] * factor
        table[head + HIGH] = intervals["high"] * factor
    if "train.final_loss" in mean.columns and quality != "train.final_loss":
        table["final train loss"] = mean["train.final_loss"]
    return table


def quality_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every quality figure (rows: metric and phase, unit in the name; columns: precisions, or arms) as display strings
    "mean [low, high]" with the interval of `stats.quality_intervals`."""
    columns = [c for c in frame.columns if c.startswith("quality.") and getattr(fields.spec_for(c), "kind", None) == "quality"]
    if frame.empty or not columns:
        return pd.DataFrame()
    phase_rank = {"eval_before": 0, "eval_after": 1}

    def natural(column: str) -> tuple:  # i2t recall@5 before i2t recall@10; before before after
        _, phase, name = column.split(".", 2)
        return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)) + (phase_rank.get(phase, 2), phase)

    columns.sort(key=natural)
    order = stats.arm_order(frame)
    rows = {}
    for column in columns:
        intervals = stats.quality_intervals(frame, column).reindex(order)
        if intervals["mean"].isna().all():
            continue
        factor, unit = fields.scale(column)
        name = fields.headed(fields.quality_name(column, short=True), unit)
        rows[name] = [with_interval(m * factor, lo * factor, hi * factor) for m, lo, hi in
                      zip(intervals["mean"], intervals["low"], intervals["high"], strict=True)]
    table = pd.DataFrame.from_dict(rows, orient="index", columns=order)
    table.index.name = f"metric [{stats.confidence_label(frame)}]"
    return table


def relative_table(frame: pd.DataFrame) -> pd.DataFrame:
    """`stats.relative_to_baseline` (numeric, the report's conventions)."""
    return stats.relative_to_baseline(frame)


def provenance_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run directory merged into the report: where and with what it was measured."""
    columns = [c for c in PROVENANCE_COLUMNS if c in frame.columns]
    if not columns or "run_id" not in columns:
        return pd.DataFrame()
    runs = frame.groupby("run_id", sort=True)
    table = runs[[c for c in columns if c != "run_id"]].first()
    table["cells"] = runs.size()
    table["ok"] = runs["status"].agg(lambda s: int((s == "ok").sum()))
    return table


TIME_LABELS = {
    "process_start": "start + imports", "data": "data", "load": "load", "readback": "read-back", "prepare": "LoRA",
    "eval_before": "eval before", "train": "train", "eval_after": "eval after", "adapter_save": "adapter save",
}


def time_split_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Where a cell's wall time went (s): mean per precision of each part (schema.TIME_PARTS), the rest
    (`other`: launch, environment, sampler start, record checkpoints, exit) and the wall time they sum to."""
    means = ok_means(frame)
    if means.empty or "time.cell.wall_s" not in means.columns:
        return pd.DataFrame()
    table = pd.DataFrame(index=pd.Index(means.index, name="precision"))
    for part in schema.TIME_PARTS:
        column = schema.time_key(part)
        if column in means.columns:
            table[f"{TIME_LABELS.get(part, part)} (s)"] = means[column]
    table["other (s)"] = means["time.other.wall_s"] if "time.other.wall_s" in means.columns else float("nan")
    table["wall (s)"] = means["time.cell.wall_s"]
    return table


def contended_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The cells whose training waited for a core (`speed.contended`), with how much CPU they had and why:
    their wall-clock speed measured the machine's load more than the format."""
    if frame.empty or "speed.contended" not in frame.columns:
        return pd.DataFrame()
    flagged = frame[frame["speed.contended"].map(lambda v: v is True)]
    if flagged.empty:
        return pd.DataFrame()
    shown = pd.DataFrame(index=pd.Index(flagged.get("cell_id", flagged.index), name="cell"))
    if "cpu.train.share" in flagged.columns:
        shown["had the CPU (% of the time it wanted it)"] = (flagged["cpu.train.share"].astype(float) * 100).to_numpy()
    if "cpu.train.others_busy_cores" in flagged.columns:
        shown["cores others kept busy"] = flagged["cpu.train.others_busy_cores"].astype(float).to_numpy()
    return shown


def cast_error_note(frame: pd.DataFrame) -> str:
    """What the weight error of an unquantized base is (its checkpoint rounded to the dtype it computes in, no
    quantization), when the damage table shows one; "" otherwise."""
    if "weights.load.quantized_params" not in frame.columns or "weights.load.error.rel_mean" not in frame.columns:
        return ""
    ok = stats.ok_rows(frame)
    dense = ok[(pd.to_numeric(ok["weights.load.quantized_params"], errors="coerce") == 0)
               & (pd.to_numeric(ok["weights.load.error.rel_mean"], errors="coerce") > 0)]
    if dense.empty:
        return ""
    parts = []
    for precision, rows in dense.groupby("precision", sort=False):
        dtype = next((str(rows[c].dropna().iloc[0]) for c in ("precision.dense_dtype", "config.compute_dtype")
                      if c in rows.columns and rows[c].notna().any()), "its dtype")
        parts.append(f"{precision}'s {100 * pd.to_numeric(rows['weights.load.error.rel_mean']).mean():.2f} % is its checkpoint's "
                     f"weights rounded to {dtype}, the dtype it computes in")
    return f"Weight error of an unquantized base: {'; '.join(parts)}; no quantization."
