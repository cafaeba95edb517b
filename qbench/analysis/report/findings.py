"""Findings a reader must not miss, in words: cells whose model gave non-finite outputs in evaluation, and a base
that is not all the checkpoint's (weights transformers initialised or dropped, allowed by the suite)."""

from __future__ import annotations

from typing import Any

import pandas as pd

# record count (quality.<phase>.<key>) -> (what was not finite, the record field holding how many there were)
NONFINITE_COUNTS = {
    "nonfinite_image_embeddings": ("image embeddings", "data.eval_images"),
    "nonfinite_text_embeddings": ("caption embeddings", "data.eval_captions"),
    "nonfinite_logits": ("scored positions' logits", "eval.scored_tokens"),
    "nonfinite_losses": ("scored tokens' losses", "eval.scored_tokens"),
}
CONSEQUENCE = {
    "clip": "a non-finite score never counts as a match, so recall counts those queries as misses",
    "causal_lm": "a non-finite loss makes perplexity and bits per byte infinite",
}
PHASE_WORDS = {"eval_before": "before fine-tuning", "eval_after": "after fine-tuning"}


def _count(row: pd.Series, key: str) -> int:
    value = row.get(key)
    try:
        return 0 if value is None or pd.isna(value) else int(value)
    except (TypeError, ValueError):
        return 0


def _of(row: pd.Series, total_key: str) -> str:
    total = _count(row, total_key)
    return f" of {total:,}" if total else ""


def nonfinite_findings(frame: pd.DataFrame) -> list[str]:
    """One sentence per cell whose evaluation met NaN or infinite model outputs (`quality.<phase>.nonfinite_*`),
    saying how many, in which phase, and what that does to its metrics; empty when there were none."""
    if frame.empty:
        return []
    found = []
    for _, row in frame.iterrows():
        parts = []
        for phase, words in PHASE_WORDS.items():
            counted = [
                f"{_count(row, f'quality.{phase}.{key}'):,}{_of(row, total)} {what}"
                for key, (what, total) in NONFINITE_COUNTS.items()
                if _count(row, f"quality.{phase}.{key}") > 0
            ]
            if counted:
                parts.append(f"{', '.join(counted)} {words}")
        if parts:
            cell: Any = row.get("cell_id") or row.get("precision")
            consequence = CONSEQUENCE.get(str(row.get("task")), "its quality figures are not those of a working model")
            found.append(
                f"{cell}: the model's outputs were NaN or infinite in evaluation — {'; '.join(parts)}. "
                f"The format broke the model on these inputs: {consequence}."
            )
    return found


# record field (names, comma-separated) -> what it means for the figures
LOAD_REPORT_FINDINGS = {
    "model.missing_weights": ("not in the checkpoint's weights: transformers initialised them at random "
                              "(model.allow_missing_weights), so every figure is of that partly random model, not of the checkpoint"),
    "model.unexpected_weights": ("in the checkpoint's weights but not in the model: transformers dropped them "
                                 "(model.allow_unexpected_weights)"),
}


def load_report_findings(frame: pd.DataFrame) -> list[str]:
    """One sentence per kind of weight the cells' base did not take from the checkpoint, naming them and the
    cells (`model.missing_weights`, `model.unexpected_weights`); empty when every cell loaded the checkpoint whole."""
    found = []
    for column, meaning in LOAD_REPORT_FINDINGS.items():
        if column not in frame.columns:
            continue
        named = frame[frame[column].notna() & (frame[column].astype(str) != "")]
        for names, cells in named.groupby(column):
            ids = ", ".join(str(c) for c in cells.get("cell_id", cells.get("precision", pd.Series(dtype=str))))
            found.append(f"{str(names).replace(',', ', ')} — {meaning} (cells: {ids}).")
    return found
