"""Tasks (child process): each supplies model class, batches, loss and evaluation to the shared loop.

The registry maps a suite's `task` to "module:Class", imported only when a cell asks for it (as
lm-evaluation-harness's MODEL_MAPPING does), so the members never import their users, and the parent
can name and check tasks without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qbench.cell.tasks.batch import Task
    from qbench.contract.suite import LoadedSuite

from qbench.contract.tasks import AUTO_CLASSES, TASKS


def task_class(name: str) -> Any:
    """The class registered for task `name`; KeyError naming the known tasks otherwise."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    module, _, attribute = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def auto_class(name: str) -> Any:
    """The transformers Auto class for task `name`'s models."""
    import transformers

    return getattr(transformers, AUTO_CLASSES[name])


def get_task(loaded_suite: LoadedSuite, model_path: str, device: str) -> Task:
    """The task object a suite asks for."""
    return task_class(loaded_suite.suite.task)(loaded_suite, model_path, device)
