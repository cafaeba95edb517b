"""The task and builtin-dataset registries, by name only: a suite's `task` -> "module:Class" of the cell's task,
imported only when a cell asks for it (as lm-evaluation-harness's MODEL_MAPPING does), so that the parent can name
and check tasks and datasets without importing torch."""

from __future__ import annotations

TASKS = {
    "clip": "qbench.cell.tasks.clip:ClipTask",
    "causal_lm": "qbench.cell.tasks.causal_lm:CausalLMTask",
}
# the transformers Auto class that builds each task's model from a config (preflight does, on the meta device)
AUTO_CLASSES = {
    "clip": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
}

# the train settings `qbench fit` can search, per task: how many samples a step takes, and how many tokens each
# sequence has (clip: the captions' tokens; causal_lm: the training windows)
FIT_AXES = {
    "clip": ("batch_size", "max_length"),
    "causal_lm": ("batch_size", "max_length"),
}

BUILTIN_DATASETS: dict[str, tuple[str, str]] = {
    "shapes": ("clip", "generated coloured shapes; fine-tunes on a shift the tiny CLIP base never saw (qbench.cell.data.shapes)"),
    "pydoc": ("causal_lm", "Python's own reference documentation (pydoc_data.topics), split by topic into pretrain / "
              "fine-tune / held-out parts (qbench.cell.data.text)"),
}


def builtin_names(task: str) -> list[str]:
    """The builtin datasets of one task."""
    return [name for name, (for_task, _) in BUILTIN_DATASETS.items() if for_task == task]
