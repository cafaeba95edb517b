"""The report's tables from a DataFrame of records: per precision, quantization damage, memory, provenance."""

from __future__ import annotations

from typing import Any

import pandas as pd

from qbench.results import schema, stats

MB = 1024 * 1024

# (record column, shown name, scale) in the order the summary shows them; absent columns are skipped
SUMMARY_COLUMNS = [
    ("weights.base_bytes", "base weights MiB", 1 / MB),
    ("weights.bits_per_quantized_param", "bits/quantized param", 1),
    ("memory.peak_rss_bytes", "peak RSS MiB", 1 / MB),
    ("memory.train.torch_max_allocated_bytes", "train torch peak MiB", 1 / MB),
    ("speed.train_samples_per_s", "samples/s", 1),
    ("speed.train_tokens_per_s", "tokens/s", 1),
    ("quality.before.i2t_recall@1", "i2t R@1 before", 100),
    ("quality.after.i2t_recall@1", "i2t R@1 after", 100),
    ("quality.before.t2i_recall@1", "t2i R@1 before", 100),
    ("quality.after.t2i_recall@1", "t2i R@1 after", 100),
    ("quality.before.i2t_recall@5", "i2t R@5 before", 100),
    ("quality.after.i2t_recall@5", "i2t R@5 after", 100),
    ("quality.before.t2i_recall@5", "t2i R@5 before", 100),
    ("quality.after.t2i_recall@5", "t2i R@5 after", 100),
    ("quality.before.perplexity", "ppl before", 1),
    ("quality.after.perplexity", "ppl after", 1),
    ("quality.after.bits_per_byte", "bits/byte after", 1),
    ("train.final_loss", "final loss", 1),
    ("weights.error.rel_mean", "weight error % (mean)", 100),
    ("speed.step_time_p50_s", "step p50 s", 1),
    ("speed.step_time_p90_s", "step p90 s", 1),
]

# the one quality number per task the summary compares against the baseline precision
HEADLINE = {
    "clip": ("quality.after.mean_recall@1", "Δ mean R@1 vs {base} (points)", 100),
    "causal_lm": ("quality.after.perplexity", "Δ ppl vs {base}", 1),
}


def format_value(value: Any) -> str:
    """A table cell as every renderer shows it (terminal, HTML): floats to two decimals, missing as a dash."""
    if isinstance(value, float):
        return "—" if pd.isna(value) else f"{value:.2f}"
    if value is None:
        return "—"
    return str(value)





def ok_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of the ok cells, one row per precision, in the frame's precision order."""
    if frame.empty or "status" not in frame.columns:
        return pd.DataFrame()
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    return ok.groupby("precision").mean(numeric_only=True).reindex(stats.precision_order(ok))


def failures(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "status" not in frame.columns:
        return pd.DataFrame()
    bad = frame[frame["status"] != "ok"]
    return bad[["cell_id", "status", "error"]] if not bad.empty else pd.DataFrame()


def quantization_damage(frame: pd.DataFrame) -> pd.DataFrame:
    """Per precision: weight error vs the checkpoint, and the task metric of the base *before* any
    fine-tuning next to the baseline precision's (the damage quantization alone does)."""
    means = ok_means(frame)
    if means.empty:
        return pd.DataFrame()
    table = pd.DataFrame(index=pd.Index(means.index, name="precision"))
    for column, label in (("weights.error.rel_mean", "weight error % (mean)"), ("weights.error.rel_max", "weight error % (max)")):
        if column in means.columns:
            table[label] = means[column] * 100
    task, baseline = frame["task"].iloc[0], frame["baseline_precision"].iloc[0]
    if task in HEADLINE:
        after, _, scale = HEADLINE[task]
        before = after.replace(".after.", ".before.")
        metric = before.removeprefix("quality.before.")
        if before in means.columns:
            table[f"{metric} before (this base)"] = means[before] * scale
            if baseline in means.index:
                table[f"{metric} before ({baseline} base)"] = means.loc[baseline, before] * scale
                table[f"Δ vs {baseline} before training"] = stats.delta_to(means[before], means.loc[baseline, before]) * scale
    return table if len(table.columns) else pd.DataFrame()


def memory_table(frame: pd.DataFrame, phases: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Peak MiB per precision for every (phase, source) the records measured; sources never measured are left out."""
    means = ok_means(frame)
    if means.empty:
        return pd.DataFrame()
    columns = {}
    found = {c.split(".")[1] for c in means.columns if c.startswith("memory.") and c.endswith(".seconds")}
    ordered = [p for p in schema.PHASES if p in found] + sorted(found - set(schema.PHASES))
    for phase in phases or tuple(ordered):
        for key, label in schema.MEMORY_SOURCES.items():
            column = f"memory.{phase}.{key}"
            if column in means.columns and means[column].notna().any():
                columns[f"{phase} {label}"] = means[column] / MB
    return pd.DataFrame(columns, index=pd.Index(means.index, name="precision")) if columns else pd.DataFrame()


# (key within a phase, key of the peak over all phases, shown name)
PEAK_SOURCES = tuple((key, schema.overall_peak_key(key), f"{label} MiB") for key, label in schema.MEMORY_SOURCES.items())


def peak_memory_table(frame: pd.DataFrame, phase: str | None = None) -> pd.DataFrame:
    """Peak MiB per precision from each source, over every phase (or in one `phase`); every source is a
    column, and one never measured shows as missing, not as zero."""
    means = ok_means(frame)
    if means.empty:
        return pd.DataFrame()
    table = pd.DataFrame(index=pd.Index(means.index, name="precision"))
    for phase_key, overall_key, label in PEAK_SOURCES:
        column = overall_key if phase is None else f"memory.{phase}.{phase_key}"
        table[label] = means[column] / MB if column in means.columns else float("nan")
    if "weights.base_bytes" in means.columns:
        table["base weights MiB"] = means["weights.base_bytes"] / MB
    return table



PROVENANCE_COLUMNS = ("run_id", "suite", "env.device", "env.device_name", "env.hostname", "env.git_commit", "env.torch_version", "env.bitsandbytes_version")


def _mean_with_spread(mean: float, std: float, count: int, scale: float) -> str:
    if pd.isna(mean):
        return "—"
    if count > 1 and pd.notna(std):
        return f"{mean * scale:.2f} ± {std * scale:.2f}"
    return f"{mean * scale:.2f}"


def precision_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The summary per precision as display strings: mean, and ± sample std where a precision has several seeds."""
    if frame.empty:
        return pd.DataFrame()
    order = stats.precision_order(frame)
    columns = [c for c, _, _ in SUMMARY_COLUMNS if c in frame.columns]
    agg = stats.aggregate(frame, columns)
    table = pd.DataFrame(index=pd.Index(order, name="precision"))
    grouped = frame.groupby("precision", sort=False)
    table["status"] = grouped["status"].agg(lambda s: ",".join(sorted(set(s)))).reindex(order)
    table["seeds"] = grouped["seed"].nunique().reindex(order) if "seed" in frame.columns else 1
    table["cells"] = grouped.size().reindex(order)
    for column, label, scale in SUMMARY_COLUMNS:
        if column not in agg.mean.columns or agg.mean[column].isna().all():
            continue
        table[label] = [
            _mean_with_spread(agg.mean.loc[p, column], agg.std.loc[p, column], agg.count.loc[p, column], scale) for p in order
        ]
    return table


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


def report_tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The report's tables, titled, in the order every renderer (terminal, Markdown, HTML) shows them."""
    baseline = stats.baseline_precision(frame) or "baseline"
    shown = {
        "Per precision (mean ± sample std over seeds)": precision_table(frame),
        f"Relative to {baseline}": stats.relative_to_baseline(frame),
        "Quantization damage before fine-tuning": quantization_damage(frame),
        "Peak memory over all phases, each source (MiB)": peak_memory_table(frame),
        "Cells that did not finish": failures(frame),
        "Runs merged into this report": provenance_table(frame),
    }
    return {title: table for title, table in shown.items() if not table.empty}
