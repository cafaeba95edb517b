"""The work a run does once for all its cells: data generated, images preprocessed, text tokenized,
tokenizers read, versions and git commit looked up.

Each piece is memoized per process under a key that names everything it depends on. The fork server
calls `warm()` before it forks any cell, so every cell finds the pieces built (and shares their pages,
read-only, with its siblings); a cell started as a plain subprocess builds them itself, with the same
code and the same result. Nothing here depends on the precision or the seed of a cell.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from qbench.machine.memo import built, memo  # noqa: F401  (re-exported: what the tasks build once per process)


def warm(suite_text: str, suite_path: str, device: str = "cpu") -> dict[str, Any]:
    """Do what every cell of this suite would do before loading its model, and keep what is memoized:
    the environment facts, the model's tokenizer and processors, the data. Returns what was built."""
    from qbench.cell import models
    from qbench.cell.tasks import get_task
    from qbench.contract.suite import LoadedSuite, parse
    from qbench.machine import environment

    loaded = LoadedSuite(parse(suite_text, suite_path), Path(suite_path),
                         hashlib.sha256(suite_text.encode("utf-8")).hexdigest(), suite_text)
    suite = loaded.suite
    environment.run_facts()
    model_path = models.resolve(suite.model.id, loaded.path.parent, suite.model.revision)
    task = get_task(loaded, model_path, device)
    task.prepare_data()
    _warm_weight_conversions(model_path)
    return {"built": built()}


def _warm_weight_conversions(model_path: str) -> None:
    """transformers compiles about a thousand regular expressions the first time a process loads a model (its
    table of checkpoint key conversions); build that table here once. Best effort: a transformers
    without it loses nothing."""
    try:
        from transformers import AutoConfig
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping(AutoConfig.from_pretrained(model_path).model_type)
    except Exception:
        pass
