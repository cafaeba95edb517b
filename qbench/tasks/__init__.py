"""Tasks (child process): each supplies model class, batches, loss and evaluation to the shared loop.

The registry maps a suite's `task` to "module:Class", imported only when a cell asks for it (as
lm-evaluation-harness's MODEL_MAPPING does), so the members never import their users.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qbench.suite.spec import LoadedSuite, Suite
    from qbench.tasks.batch import Task

TASKS = {
    "clip": "qbench.tasks.clip:ClipTask",
    "causal_lm": "qbench.tasks.causal_lm:CausalLMTask",
}


def task_class(name: str) -> Any:
    """The class registered for task `name`; KeyError naming the known tasks otherwise."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    module, _, attribute = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def get_task(suite: Suite, loaded_suite: LoadedSuite, model_path: str, device: str) -> Task:
    """The task object a suite asks for."""
    return task_class(suite.task)(suite, loaded_suite, model_path, device)
