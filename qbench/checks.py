"""Checks a suite against the world before any cell starts: model, data files, LoRA targets."""

from __future__ import annotations

from typing import Any

from qbench.data.registry import BUILTIN_DATASETS
from qbench.suite import LoadedSuite, SuiteError


def _check_data(loaded: LoadedSuite) -> list[str]:
    suite, data = loaded.suite, loaded.suite.data
    problems = []
    if data.kind == "builtin":
        known = {name: task for name, (task, _) in BUILTIN_DATASETS.items()}
        if data.name not in known:
            problems.append(f"data.name: unknown builtin dataset {data.name!r}; builtin: {', '.join(known)}")
        elif known[data.name] != suite.task:
            problems.append(f"data.name: builtin dataset {data.name!r} is for task {known[data.name]!r}, not {suite.task!r}")
        return problems
    if (data.kind == "tsv") != (suite.task == "clip"):
        problems.append(f"data.kind: {data.kind!r} data does not fit task {suite.task!r} (clip reads tsv, causal_lm reads text)")
        return problems
    for key in ("train", "eval"):
        path = loaded.resolve(getattr(data, key))
        if not path.is_file():
            problems.append(f"data.{key}: file not found: {path}")
    if data.kind == "tsv":
        root = loaded.resolve(data.image_root)
        if not root.is_dir():
            problems.append(f"data.image_root: folder not found: {root}")
        if problems:
            return problems
        from qbench.data.pairs import DataError
        from qbench.data.tsv import load_tsv

        for key in ("train", "eval"):
            try:
                load_tsv(loaded.resolve(getattr(data, key)), root)
            except DataError as error:
                problems += [f"data.{key}: {line}" for line in str(error).splitlines()]
    return problems


def _module_names(model_path: str, suite: Any) -> set[str] | None:
    """Module names of the model, built on the meta device (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, revision=suite.model.revision, trust_remote_code=suite.model.trust_remote_code)
    if suite.task == "clip":
        from transformers import AutoModel as auto_class
    else:
        from transformers import AutoModelForCausalLM as auto_class
    with init_empty_weights():
        model = auto_class.from_config(config, trust_remote_code=suite.model.trust_remote_code)
    return {name for name, _ in model.named_modules()}


def check_suite(loaded: LoadedSuite, check_model: bool = True) -> None:
    """SuiteError listing every problem found, or return quietly."""
    from qbench import models

    problems = _check_data(loaded)
    suite = loaded.suite
    if check_model:
        try:
            path = models.resolve(suite.model.id, loaded.path.parent, suite.model.revision)
            models.ensure_available(path, suite.model.revision, loaded.path.parent)
        except models.ModelNotFound as error:
            problems.append(f"model.id: {error}")
        else:
            names = _module_names(path, suite)
            suffixes = {name.rsplit(".", 1)[-1] for name in names}
            missing = [t for t in suite.lora.target_modules if t not in suffixes and t not in names]
            if missing:
                problems.append(
                    f"lora.target_modules: {', '.join(missing)} not found in the model "
                    f"(linear layer names include: {', '.join(sorted(s for s in suffixes if s.endswith('proj'))[:12])})"
                )
    if problems:
        raise SuiteError(loaded.path, problems)
