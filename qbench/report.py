"""DataFrame of records -> the tables people read (terminal, CSV, Markdown)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

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
]

# the one quality number per task the summary compares against the baseline precision
HEADLINE = {
    "clip": ("quality.after.mean_recall@1", "Δ mean R@1 vs {base} (points)", 100),
    "causal_lm": ("quality.after.perplexity", "Δ ppl vs {base}", 1),
}


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per precision (mean over seeds): the figures a person compares, in readable units."""
    if frame.empty:
        return pd.DataFrame()
    order = list(dict.fromkeys(frame["precision"]))
    grouped = frame.groupby("precision", sort=False)
    table = pd.DataFrame(index=pd.Index(order, name="precision"))
    table["status"] = grouped["status"].agg(lambda s: ",".join(sorted(set(s)))).reindex(order)
    table["seeds"] = grouped["seed"].nunique().reindex(order)
    ok = frame[frame["status"] == "ok"]
    ok_means = ok.groupby("precision").mean(numeric_only=True).reindex(order) if not ok.empty else None
    for column, label, scale in SUMMARY_COLUMNS:
        if column in frame.columns and ok_means is not None and column in ok_means.columns:
            table[label] = ok_means[column] * scale
    task = frame["task"].iloc[0]
    baseline = frame["baseline_precision"].iloc[0]
    if task in HEADLINE and ok_means is not None:
        column, label, scale = HEADLINE[task]
        if column in ok_means.columns and baseline in ok_means.index:
            table[label.format(base=baseline)] = (ok_means[column] - ok_means.loc[baseline, column]) * scale
    return table


def failures(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "status" not in frame.columns:
        return pd.DataFrame()
    bad = frame[frame["status"] != "ok"]
    return bad[["cell_id", "status", "error"]] if not bad.empty else pd.DataFrame()


def write_run_outputs(run_dir: Path, frame: pd.DataFrame) -> dict[str, Path]:
    """results.csv (every field of every record) and summary.md (the summary table) in `run_dir`."""
    run_dir = Path(run_dir)
    paths = {"csv": run_dir / "results.csv", "summary": run_dir / "summary.md"}
    frame.to_csv(paths["csv"], index=False)
    table = summary_table(frame)
    lines = [f"# {frame['suite'].iloc[0]} — run {run_dir.name}", ""] if not frame.empty else []
    lines += [table.to_markdown(floatfmt=".2f"), ""]
    bad = failures(frame)
    if not bad.empty:
        lines += ["## Cells that did not finish", "", bad.to_markdown(index=False), ""]
    paths["summary"].write_text("\n".join(lines), encoding="utf-8")
    return paths


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return "—" if pd.isna(value) else f"{value:.2f}"
    return str(value)
