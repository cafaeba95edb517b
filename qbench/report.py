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

PHASE_ORDER = ("data", "load", "prepare", "eval_before", "train", "eval_after")
MEMORY_SOURCES = {
    "nvml_process_peak_bytes": "NVML process",
    "nvml_device_peak_bytes": "NVML device",
    "torch_max_allocated_bytes": "torch allocated",
    "torch_max_reserved_bytes": "torch reserved",
    "rss_peak_bytes": "RSS",
}


def _ok_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of the ok cells, one row per precision, in the frame's precision order."""
    if frame.empty or "status" not in frame.columns:
        return pd.DataFrame()
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    from qbench.precisions import REGISTRY

    known = list(REGISTRY)
    order = sorted(set(ok["precision"]), key=lambda p: (known.index(p) if p in known else len(known), p))
    return ok.groupby("precision").mean(numeric_only=True).reindex(order)


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
                table[f"Δ vs {baseline} before training"] = (means[before] - means.loc[baseline, before]) * scale
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
    ordered = [p for p in PHASE_ORDER if p in found] + sorted(found - set(PHASE_ORDER))
    for phase in phases or tuple(ordered):
        for key, label in MEMORY_SOURCES.items():
            column = f"memory.{phase}.{key}"
            if column in means.columns and means[column].notna().any():
                columns[f"{phase} {label}"] = means[column] / MB
    return pd.DataFrame(columns, index=pd.Index(means.index, name="precision")) if columns else pd.DataFrame()


# (key within a phase, key of the peak over all phases, shown name)
PEAK_SOURCES = (
    ("nvml_process_peak_bytes", "memory.peak_nvml_process_bytes", "NVML process MiB"),
    ("nvml_device_peak_bytes", "memory.peak_nvml_device_bytes", "NVML device MiB"),
    ("torch_max_allocated_bytes", "memory.peak_torch_max_allocated_bytes", "torch allocated MiB"),
    ("torch_max_reserved_bytes", "memory.peak_torch_max_reserved_bytes", "torch reserved MiB"),
    ("rss_peak_bytes", "memory.peak_rss_bytes", "RSS MiB"),
)


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
