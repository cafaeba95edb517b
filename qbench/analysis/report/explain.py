"""Prose from the records' exact byte accounting: why a 4-bit base is not 4x smaller, and what double
quantization saves or costs."""

from __future__ import annotations

import pandas as pd

from qbench.analysis.report.tables import MB, ok_means


def _kib(value: float) -> str:
    if value < 1024:
        return f"{value:,.0f} B"
    return f"{value / 1024:,.1f} KiB" if value < MB else f"{value / MB:,.2f} MiB"


def weight_bytes_explanation(frame: pd.DataFrame) -> str:
    """Markdown: for each quantized precision, why its base is not (16 / bits) times smaller, from the
    record's exact byte accounting — quantization state, and what stays unquantized."""
    means = ok_means(frame, by="precision")  # weight bytes depend on the precision alone
    needed = ("weights.load.base_bytes", "weights.load.quantized_params", "weights.load.quantized_codes_bytes", "weights.load.quant_state_bytes")
    if means.empty or any(c not in means.columns for c in needed):
        return ""
    baseline = frame["baseline_precision"].iloc[0]
    reference = means.loc[baseline] if baseline in means.index and not means.loc[baseline, "weights.load.quantized_params"] else None
    paragraphs = []
    for precision, row in means.iterrows():
        quantized = row["weights.load.quantized_params"]
        if not quantized:
            continue
        base = row["weights.load.base_bytes"]
        code_bits = 8 * row["weights.load.quantized_codes_bytes"] / quantized
        state_bits = 8 * row["weights.load.quant_state_bytes"] / quantized
        if reference is not None:
            versus, dense = f"{_kib(reference['weights.load.base_bytes'])} for {baseline}", reference["weights.load.base_bytes"]
        else:
            dense = 2 * row["weights.load.params"] + row.get("weights.load.unquantized.buffer_bytes", 0)
            versus = f"an estimated {_kib(dense)} at 16 bits"
        ideal = round(16 / code_bits)
        lines = [
            f"**{precision}**: the base takes {_kib(base)} against {versus}: {dense / base:.2f}x smaller, not {ideal}x.",
            f"- Its {int(quantized):,} quantized weights take {code_bits + state_bits:.2f} bits each, not {code_bits:.0f}: "
            f"{code_bits:.0f} bits of code plus {state_bits:.2f} bits of quantization state"
            + _state_parts(row, quantized) + ".",
        ]
        unquantized = row.get("weights.load.unquantized_bytes")
        if unquantized:
            parts = [
                f"{label} {_kib(row[f'weights.load.unquantized.{kind}_bytes'])}"
                for kind, label in (
                    ("embedding", "embeddings"), ("norm", "norms"), ("dense_linear", "linears kept dense (heads, projections)"),
                    ("quantized_linear_bias", "biases"), ("conv", "convolutions"), ("other_param", "other parameters"),
                    ("buffer", "buffers"),
                )
                if row.get(f"weights.load.unquantized.{kind}_bytes")
            ]
            share_params = 1 - row["weights.load.quantized_share_of_params"]
            lines.append(
                f"- {share_params:.1%} of the parameters stay unquantized in 16 bits or wider and make up "
                f"{unquantized / base:.1%} of this base ({_kib(unquantized)}: {', '.join(parts)}); they do not shrink at all."
            )
        lines.append(
            f"- Bare {code_bits:.0f}-bit codes for every parameter would take {_kib(row['weights.load.params'] * code_bits / 8)} "
            f"({dense / (row['weights.load.params'] * code_bits / 8):.1f}x smaller)."
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
        f"{labels[kind]} {8 * row[f'weights.load.quant_state.{kind}_bytes'] / quantized:.3f}"
        for kind in labels
        if row.get(f"weights.load.quant_state.{kind}_bytes")
    ]
    return f" ({', '.join(parts)})" if parts else ""


def _double_quant_notes(means: pd.DataFrame) -> list[str]:
    notes = []
    for plain in ("nf4", "fp4"):
        nested = f"{plain}-dq"
        if plain in means.index and nested in means.index:
            saved = means.loc[plain, "weights.load.quant_state_bytes"] - means.loc[nested, "weights.load.quant_state_bytes"]
            if saved < 0:
                layers = means.loc[nested].get("weights.load.quant_state.nested_code_table_bytes", 0) / 1024
                notes.append(
                    f"**{nested}** is {_kib(-saved)} *larger* than {plain}: double quantization stores absmax in 8 bits "
                    f"instead of 32 (3 bytes saved per 64 weights) but keeps a 1 KiB table of 256 float32 values in each of "
                    f"the {layers:.0f} layers; below about 22,000 weights per layer the table costs more than it saves."
                )
    return notes
