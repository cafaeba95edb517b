"""DataFrame of records -> the tables people read (terminal, CSV, Markdown)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from qbench.results import fields, schema
from qbench.results import stats as tables

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


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per precision (mean over seeds): the figures a person compares, in readable units."""
    if frame.empty:
        return pd.DataFrame()
    order = tables.precision_order(frame)
    grouped = frame.groupby("precision", sort=False)
    table = pd.DataFrame(index=pd.Index(order, name="precision"))
    table["status"] = grouped["status"].agg(lambda s: ",".join(sorted(set(s)))).reindex(order)
    table["seeds"] = grouped["seed"].nunique().reindex(order)
    ok_means = _ok_means(frame)  # empty when no cell is ok: then only status and seeds are shown
    for column, label, scale in SUMMARY_COLUMNS:
        if column in ok_means.columns:
            table[label] = ok_means[column] * scale
    task = frame["task"].iloc[0]
    baseline = frame["baseline_precision"].iloc[0]
    if task in HEADLINE:
        column, label, scale = HEADLINE[task]
        if column in ok_means.columns and baseline in ok_means.index:
            table[label.format(base=baseline)] = tables.delta_to(ok_means[column], ok_means.loc[baseline, column]) * scale
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


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return "—" if pd.isna(value) else f"{value:.2f}"
    return str(value)


# ---- measurement tables: quantization damage, weight bytes, memory per phase ----



def _ok_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of the ok cells, one row per precision, in the frame's precision order."""
    if frame.empty or "status" not in frame.columns:
        return pd.DataFrame()
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    return ok.groupby("precision").mean(numeric_only=True).reindex(tables.precision_order(ok))


def quantization_damage(frame: pd.DataFrame) -> pd.DataFrame:
    """Per precision: weight error vs the checkpoint, and the task metric of the base *before* any
    fine-tuning next to the baseline precision's (the damage quantization alone does)."""
    means = _ok_means(frame)
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
                table[f"Δ vs {baseline} before training"] = tables.delta_to(means[before], means.loc[baseline, before]) * scale
    return table if len(table.columns) else pd.DataFrame()


def _kib(value: float) -> str:
    if value < 1024:
        return f"{value:,.0f} B"
    return f"{value / 1024:,.1f} KiB" if value < MB else f"{value / MB:,.2f} MiB"


def weight_bytes_explanation(frame: pd.DataFrame) -> str:
    """Markdown: for each quantized precision, why its base is not (16 / bits) times smaller, from the
    record's exact byte accounting — quantization state, and what stays unquantized."""
    means = _ok_means(frame)
    needed = ("weights.base_bytes", "weights.quantized_params", "weights.quantized_codes_bytes", "weights.quant_state_bytes")
    if means.empty or any(c not in means.columns for c in needed):
        return ""
    baseline = frame["baseline_precision"].iloc[0]
    reference = means.loc[baseline] if baseline in means.index and not means.loc[baseline, "weights.quantized_params"] else None
    paragraphs = []
    for precision, row in means.iterrows():
        quantized = row["weights.quantized_params"]
        if not quantized:
            continue
        base = row["weights.base_bytes"]
        code_bits = 8 * row["weights.quantized_codes_bytes"] / quantized
        state_bits = 8 * row["weights.quant_state_bytes"] / quantized
        if reference is not None:
            versus, dense = f"{_kib(reference['weights.base_bytes'])} for {baseline}", reference["weights.base_bytes"]
        else:
            dense = 2 * row["weights.params"] + row.get("weights.unquantized.buffer_bytes", 0)
            versus = f"an estimated {_kib(dense)} at 16 bits"
        ideal = round(16 / code_bits)
        lines = [
            f"**{precision}**: the base takes {_kib(base)} against {versus}: {dense / base:.2f}x smaller, not {ideal}x.",
            f"- Its {int(quantized):,} quantized weights take {code_bits + state_bits:.2f} bits each, not {code_bits:.0f}: "
            f"{code_bits:.0f} bits of code plus {state_bits:.2f} bits of quantization state"
            + _state_parts(row, quantized) + ".",
        ]
        unquantized = row.get("weights.unquantized_bytes")
        if unquantized:
            parts = [
                f"{label} {_kib(row[f'weights.unquantized.{kind}_bytes'])}"
                for kind, label in (
                    ("embedding", "embeddings"), ("norm", "norms"), ("dense_linear", "linears kept dense (heads, projections)"),
                    ("quantized_linear_bias", "biases"), ("conv", "convolutions"), ("other_param", "other parameters"),
                    ("buffer", "buffers"),
                )
                if row.get(f"weights.unquantized.{kind}_bytes")
            ]
            share_params = 1 - row["weights.quantized_share_of_params"]
            lines.append(
                f"- {share_params:.1%} of the parameters stay unquantized in 16 bits or wider and make up "
                f"{unquantized / base:.1%} of this base ({_kib(unquantized)}: {', '.join(parts)}); they do not shrink at all."
            )
        lines.append(
            f"- Bare {code_bits:.0f}-bit codes for every parameter would take {_kib(row['weights.params'] * code_bits / 8)} "
            f"({dense / (row['weights.params'] * code_bits / 8):.1f}x smaller)."
        )
        paragraphs.append("\n".join(lines))
    paragraphs += _double_quant_notes(means)
    return "\n\n".join(paragraphs)


def _state_parts(row: pd.Series, quantized: float) -> str:
    labels = {
        "absmax": "absmax per block", "nested_absmax": "absmax of the absmax", "code_table": "4-bit code tables",
        "nested_code_table": "8-bit code tables of double quantization", "offset": "offsets", "row_scale": "row scales",
    }
    parts = [
        f"{labels[kind]} {8 * row[f'weights.quant_state.{kind}_bytes'] / quantized:.3f}"
        for kind in labels
        if row.get(f"weights.quant_state.{kind}_bytes")
    ]
    return f" ({', '.join(parts)})" if parts else ""


def _double_quant_notes(means: pd.DataFrame) -> list[str]:
    notes = []
    for plain in ("nf4", "fp4"):
        nested = f"{plain}-dq"
        if plain in means.index and nested in means.index:
            saved = means.loc[plain, "weights.quant_state_bytes"] - means.loc[nested, "weights.quant_state_bytes"]
            if saved < 0:
                layers = means.loc[nested].get("weights.quant_state.nested_code_table_bytes", 0) / 1024
                notes.append(
                    f"**{nested}** is {_kib(-saved)} *larger* than {plain}: double quantization stores absmax in 8 bits "
                    f"instead of 32 (3 bytes saved per 64 weights) but keeps a 1 KiB table of 256 float32 values in each of "
                    f"the {layers:.0f} layers; below about 22,000 weights per layer the table costs more than it saves."
                )
    return notes


def memory_table(frame: pd.DataFrame, phases: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Peak MiB per precision for every (phase, source) the records measured; sources never measured are left out."""
    means = _ok_means(frame)
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
    means = _ok_means(frame)
    if means.empty:
        return pd.DataFrame()
    table = pd.DataFrame(index=pd.Index(means.index, name="precision"))
    for phase_key, overall_key, label in PEAK_SOURCES:
        column = overall_key if phase is None else f"memory.{phase}.{phase_key}"
        table[label] = means[column] / MB if column in means.columns else float("nan")
    if "weights.base_bytes" in means.columns:
        table["base weights MiB"] = means["weights.base_bytes"] / MB
    return table


# --- `qbench report`: several run directories -> one set of tables, plots and files -------------

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
    order = tables.precision_order(frame)
    columns = [c for c, _, _ in SUMMARY_COLUMNS if c in frame.columns]
    stats = tables.aggregate(frame, columns)
    table = pd.DataFrame(index=pd.Index(order, name="precision"))
    grouped = frame.groupby("precision", sort=False)
    table["status"] = grouped["status"].agg(lambda s: ",".join(sorted(set(s)))).reindex(order)
    table["seeds"] = grouped["seed"].nunique().reindex(order) if "seed" in frame.columns else 1
    table["cells"] = grouped.size().reindex(order)
    for column, label, scale in SUMMARY_COLUMNS:
        if column not in stats.mean.columns or stats.mean[column].isna().all():
            continue
        table[label] = [
            _mean_with_spread(stats.mean.loc[p, column], stats.std.loc[p, column], stats.count.loc[p, column], scale) for p in order
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
    baseline = tables.baseline_precision(frame) or "baseline"
    shown = {
        "Per precision (mean ± sample std over seeds)": precision_table(frame),
        f"Relative to {baseline}": tables.relative_to_baseline(frame),
        "Quantization damage before fine-tuning": quantization_damage(frame),
        "Peak memory over all phases, each source (MiB)": peak_memory_table(frame),
        "Cells that did not finish": failures(frame),
        "Runs merged into this report": provenance_table(frame),
    }
    return {title: table for title, table in shown.items() if not table.empty}


def default_report_dir(run_dirs: list[Path]) -> Path:
    """`RUN_DIR/report` for one run; for several, `report-<n>-runs` beside the first."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    return Path(run_dirs[0]).parent / f"report-{len(run_dirs)}-runs"


def _writable_for_parquet(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns as strings (None kept): records may hold a number in one cell and text in another."""
    fixed = frame.copy()
    for column in fixed.columns:
        if fixed[column].dtype == object:
            fixed[column] = fixed[column].map(lambda v: v if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
    return fixed


def _markdown(title: str, tables_shown: dict[str, pd.DataFrame], plot_files: list[tuple[str, str]]) -> str:
    lines = [f"# {title}", ""]
    for caption, file_name in plot_files:
        lines += [f"![{caption}]({file_name})", ""]
    for heading, table in tables_shown.items():
        lines += [f"## {heading}", "", table.to_markdown(floatfmt=".2f"), ""]
    return "\n".join(lines)


def write_report(frame: pd.DataFrame, out_dir: Path, title: str | None = None) -> dict[str, Path]:
    """report.csv / report.parquet (every record field, plus within-run speed ratios), summary.csv, report.md,
    plots/*.png and a self-contained report.html (plots embedded) in `out_dir`."""
    from qbench.report import page as html  # matplotlib is imported only when a report is written
    from qbench.report import plots

    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    throughput = [c for c in fields.HEADLINE_THROUGHPUT if c in frame.columns]
    flat = tables.add_speed_ratios(frame, tuple(throughput)) if throughput else frame
    suites = ", ".join(dict.fromkeys(str(s) for s in frame.get("suite", pd.Series(["?"])).dropna()))
    title = title or f"qbench report — {suites}"
    paths = {
        "csv": out_dir / "report.csv",
        "parquet": out_dir / "report.parquet",
        "summary_csv": out_dir / "summary.csv",
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
    }
    flat.to_csv(paths["csv"], index=False)
    _writable_for_parquet(flat).to_parquet(paths["parquet"], index=False)
    numeric = [c for c in flat.columns if fields.spec_for(c) is not None]
    tables.mean_and_spread(flat, numeric).to_csv(paths["summary_csv"])
    shown = report_tables(frame)
    figures = plots.all_plots(frame)
    plot_files = []
    for plot in figures:
        path = out_dir / "plots" / f"{plot.name}.png"
        path.write_bytes(plot.png)
        paths[f"plot:{plot.name}"] = path
        plot_files.append((plot.title, f"plots/{plot.name}.png"))
    paths["markdown"].write_text(_markdown(title, shown, plot_files), encoding="utf-8")
    paths["html"].write_text(html.page(title, shown, figures), encoding="utf-8")
    return paths

