"""Checks a suite against the world before any cell starts: model, data files, LoRA targets."""

from __future__ import annotations

import difflib
from pathlib import Path

from qbench.data import BUILTIN_DATASETS
from qbench.suite import precisions
from qbench.suite.spec import LoadedSuite, Suite, SuiteError

# module classes peft can put a LoRA adapter on (bitsandbytes' Linear8bitLt/Linear4bit replace Linear later)
LORA_WRAPPABLE = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")
PEFT_SPECIAL_TARGETS = ("all-linear",)


def _check_data(loaded: LoadedSuite) -> list[str]:
    suite, data = loaded.suite, loaded.suite.data
    problems = []
    if data.kind == "builtin":
        known = {name: task for name, (task, _) in BUILTIN_DATASETS.items()}
        if data.name not in known:
            hint = difflib.get_close_matches(str(data.name), list(known), n=1)
            problems.append(
                f"data.name: unknown builtin dataset {data.name!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                f"builtin: {', '.join(known)}"
            )
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
                load_tsv(loaded.resolve(getattr(data, key)), root, decode_images=True)
            except DataError as error:
                problems += [f"data.{key}: {line}" for line in str(error).splitlines()]
    return problems


def preparation_problems(loaded: LoadedSuite) -> list[str]:
    """A dense 16-bit arm cannot keep its format under peft's k-bit preparation, which casts every 16-bit
    parameter that is not 4-bit to float32: the "bf16" arm would train a float32 base under its bf16 label
    (and set the speed ratios of every other arm). Known from the registry alone, so refused before any cell."""
    suite = loaded.suite
    if suite.train.prepare != "peft-kbit":
        return []
    # `dense` is stored in the compute dtype: 16-bit when set so (with "auto", the cell's read-back catches it)
    cast = [p for p in suite.matrix.precisions
            if precisions.get(p).kind == "dense" and (precisions.get(p).dense_dtype or suite.compute_dtype) in ("bfloat16", "float16")]
    if not cast:
        return []
    return [
        f'train.prepare: "peft-kbit" runs peft\'s prepare_model_for_kbit_training, which casts every 16-bit parameter '
        f"that is not 4-bit to float32: the {', '.join(cast)} arm(s) would train a float32 base under a 16-bit label; "
        'use train.prepare = "none", or fp32 as the dense arm (matrix.precisions and baseline)'
    ]


def _module_types(model_path: str, suite: Suite) -> dict[str, str]:
    """Module name -> class name of the model, built on the meta device (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, revision=suite.model.revision, trust_remote_code=suite.model.trust_remote_code)
    from qbench.tasks import auto_class

    with init_empty_weights():
        model = auto_class(suite.task).from_config(config, trust_remote_code=suite.model.trust_remote_code)
    return {name: type(module).__name__ for name, module in model.named_modules()}


def lora_target_problems(targets: tuple[str, ...], module_types: dict[str, str]) -> list[str]:
    """Each target must name (as peft matches a list: the whole name or its last dotted parts) a module LoRA can wrap."""
    wrappable = sorted({n.rsplit(".", 1)[-1] for n, t in module_types.items() if n and t in LORA_WRAPPABLE})
    problems = []
    for target in targets:
        if target in PEFT_SPECIAL_TARGETS:
            continue
        matched = [n for n in module_types if n == target or n.endswith("." + target)]
        if not matched:
            hint = difflib.get_close_matches(target, wrappable, n=1)
            problems.append(
                f"lora.target_modules: {target!r} is not a module of the model"
                f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; layers LoRA can wrap: {', '.join(wrappable[:16])}"
            )
        elif not any(module_types[n] in LORA_WRAPPABLE for n in matched):
            kinds = sorted({module_types[n] for n in matched})
            problems.append(
                f"lora.target_modules: {target!r} names {', '.join(kinds)} modules, which LoRA cannot wrap; "
                f"layers LoRA can wrap: {', '.join(wrappable[:16])}"
            )
    return problems


def _weights_folder(path: str, revision: str | None) -> Path | None:
    """The folder holding the checkpoint's files: the local folder, or the hub cache snapshot if cached."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json", revision=revision)
    return Path(cached).parent if isinstance(cached, str) else None


def _check_model(loaded: LoadedSuite) -> list[str]:
    from qbench.cell import models

    suite = loaded.suite
    try:
        path = models.resolve(suite.model.id, loaded.path.parent, suite.model.revision)
        models.ensure_available(path, suite.model.revision, loaded.path.parent)
    except models.ModelNotFound as error:
        return [f"model.id: {error}"]
    except Exception as error:  # e.g. a malformed hub id: one line, never a traceback
        return [f"model.id: cannot find model {suite.model.id!r} ({type(error).__name__}: {error})"]
    problems = []
    try:
        folder = _weights_folder(path, suite.model.revision)
        problem = models.unsafe_weights_problem(folder, suite.model.safetensors_only) if folder else None
    except Exception as error:
        problem = f"cannot list the checkpoint's files ({type(error).__name__}: {error})"
    if problem:
        problems.append(f"model.safetensors_only: {problem}")
    try:
        module_types = _module_types(path, suite)
    except Exception as error:  # a broken config.json, an unknown model type, remote code not allowed...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        problems.append(f"model.id: cannot build the model from {path}/config.json ({type(error).__name__}: {first_line})")
    else:
        problems += lora_target_problems(suite.lora.target_modules, module_types)
    return problems


def check_suite(loaded: LoadedSuite, check_model: bool = True) -> None:
    """SuiteError listing every problem found, or return quietly."""
    problems = preparation_problems(loaded) + _check_data(loaded)
    if check_model:
        problems += _check_model(loaded)
    if problems:
        raise SuiteError(loaded.path, problems)
