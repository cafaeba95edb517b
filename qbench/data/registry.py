"""Names of the builtin datasets and the task each one serves (no heavy imports)."""

BUILTIN_DATASETS: dict[str, tuple[str, str]] = {
    "shapes": ("clip", "generated coloured shapes; fine-tunes on a shift the tiny CLIP base never saw (qbench.data.shapes)"),
    "pydoc": ("causal_lm", "Python's own reference documentation (pydoc_data.topics), split by topic (qbench.data.text)"),
}
