"""Data loaders (child process, and the parent's preflight): the TSV format, generated image sets, text corpora.

BUILTIN_DATASETS names the builtin sets and the task each serves (no heavy imports: the parent lists them).
"""

BUILTIN_DATASETS: dict[str, tuple[str, str]] = {
    "shapes": ("clip", "generated coloured shapes; fine-tunes on a shift the tiny CLIP base never saw (qbench.data.shapes)"),
    "pydoc": ("causal_lm", "Python's own reference documentation (pydoc_data.topics), split by topic into pretrain / "
              "fine-tune / held-out parts (qbench.data.text)"),
}


def builtin_names(task: str) -> list[str]:
    """The builtin datasets of one task."""
    return [name for name, (for_task, _) in BUILTIN_DATASETS.items() if for_task == task]
