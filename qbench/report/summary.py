"""A run's own outputs: results.csv (every field of every record) and summary.md (what a person reads first)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qbench.report.explain import weight_bytes_explanation
from qbench.report.tables import HEADLINE, SUMMARY_COLUMNS, failures, memory_table, ok_means, quantization_damage
from qbench.results import stats


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per precision (mean over seeds): the figures a person compares, in readable units."""
    if frame.empty:
        return pd.DataFrame()
    order = stats.precision_order(frame)
    grouped = frame.groupby("precision", sort=False)
    table = pd.DataFrame(index=pd.Index(order, name="precision"))
    table["status"] = grouped["status"].agg(lambda s: ",".join(sorted(set(s)))).reindex(order)
    table["seeds"] = grouped["seed"].nunique().reindex(order)
    means = ok_means(frame)  # empty when no cell is ok: then only status and seeds are shown
    for column, label, scale in SUMMARY_COLUMNS:
        if column in means.columns:
            table[label] = means[column] * scale
    task = frame["task"].iloc[0]
    baseline = frame["baseline_precision"].iloc[0]
    if task in HEADLINE:
        column, label, scale = HEADLINE[task]
        if column in means.columns and baseline in means.index:
            table[label.format(base=baseline)] = stats.delta_to(means[column], means.loc[baseline, column]) * scale
    return table


def write_run_outputs(run_dir: Path, frame: pd.DataFrame) -> dict[str, Path]:
    """results.csv (every field of every record) and summary.md (the summary table) in `run_dir`."""
    run_dir = Path(run_dir)
    paths = {"csv": run_dir / "results.csv", "summary": run_dir / "summary.md"}
    frame.to_csv(paths["csv"], index=False)
    table = summary_table(frame)
    lines = [f"# {frame['suite'].iloc[0]} — run {run_dir.name}", ""] if not frame.empty else []
    lines += [table.to_markdown(floatfmt=".2f"), ""]
    damage = quantization_damage(frame)
    if not damage.empty:
        lines += ["## Quantization damage before fine-tuning", "", damage.to_markdown(floatfmt=".3g"), ""]
    explanation = weight_bytes_explanation(frame)
    if explanation:
        lines += ["## Why a 4-bit base is not 4x smaller", "", explanation, ""]
    memory = memory_table(frame)
    if not memory.empty:
        lines += ["## Peak memory per phase (MiB)", "", memory.to_markdown(floatfmt=".1f"), ""]
    bad = failures(frame)
    if not bad.empty:
        lines += ["## Cells that did not finish", "", bad.to_markdown(index=False), ""]
    paths["summary"].write_text("\n".join(lines), encoding="utf-8")
    return paths
