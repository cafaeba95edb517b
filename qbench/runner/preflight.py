"""Checks a suite against the world before any cell starts: data files, model, LoRA targets, lengths, sizes."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbench.cell.data.lines import DataError
from qbench.contract import grid, inits, lengths, precisions
from qbench.contract.files import not_a_file
from qbench.contract.fingerprint import SPLITS, DataFingerprint, FileHashes
from qbench.contract.suite import LoadedSuite, Suite, SuiteError, lora_problems
from qbench.contract.tasks import BUILTIN_DATASETS
from qbench.machine import limits
from qbench.runner import estimate

# module classes peft can put a LoRA adapter on (bitsandbytes' Linear8bitLt/Linear4bit replace Linear later)
LORA_WRAPPABLE = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")
PEFT_SPECIAL_TARGETS = ("all-linear",)


@dataclass
class _Data:
    """What the data checks found that the model checks need, and the data's fingerprint."""

    train_examples: int | None = None  # clip: training captions (one batch takes batch_size of them)
    train_source: str = ""
    texts: dict[str, str] = field(default_factory=dict)  # causal_lm: suite key -> text
    hashes: dict[str, FileHashes] = field(default_factory=lambda: {split: FileHashes() for split in SPLITS})
    method: str = ""

    def fingerprint(self) -> DataFingerprint:
        files = sum(len(h.data_file) + len(h.images) for h in self.hashes.values()) if "file" in self.method else 0
        return DataFingerprint.of(self.method, self.hashes, files)


@dataclass(frozen=True)
class Checked:
    """What the checks found that the run keeps: the fingerprint of its data (None: the data checks found problems)."""

    data: DataFingerprint | None = None


def _path_problem(key: str, path: Any, wanted: str = "file") -> str | None:
    """`data.<key>: ...` when the path the suite names is not there, or is something else than a `wanted`
    ("file" or "folder"): a FIFO, a device, a link that loops, ..."""
    odd = not_a_file(path, wanted)
    if odd:
        return f"data.{key}: {path} {odd}"
    return None if os.path.lexists(path) else f"data.{key}: {wanted} not found: {path}"


def _check_data(loaded: LoadedSuite) -> tuple[list[str], _Data]:
    suite, data = loaded.suite, loaded.suite.data
    problems: list[str] = []
    found = _Data()
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
        elif suite.task == "clip":
            from qbench.cell.data import shapes
            from qbench.cell.tasks.clip import builtin_splits

            found.train_examples, found.train_source = shapes.split_size("shifted-train"), f"builtin dataset {data.name!r}"
            for split, made in zip(SPLITS, builtin_splits(data.name), strict=True):
                found.hashes[split].add_data_file(f"data.{split}", shapes.content_bytes(made))
            found.method = f"sha256 of the generated builtin set {data.name!r} (pixels and captions)"
        else:
            from qbench.cell.data.text import builtin_corpus

            corpus = builtin_corpus(data.name)
            found.texts = {"data.train": corpus.train, "data.eval": corpus.eval}
            for split in SPLITS:
                found.hashes[split].add_data_file(f"data.{split}", found.texts[f"data.{split}"])
            found.method = f"sha256 of the builtin corpus {data.name!r} (its text)"
        return problems, found
    if (data.kind == "tsv") != (suite.task == "clip"):
        problems.append(f"data.kind: {data.kind!r} data does not fit task {suite.task!r} (clip reads tsv, causal_lm reads text)")
        return problems, found
    problems += [problem for key in SPLITS if (problem := _path_problem(key, loaded.resolve(getattr(data, key))))]
    if data.kind == "tsv":
        root = loaded.resolve(data.image_root)
        problem = _path_problem("image_root", root, "folder")
        if problem:
            problems.append(problem)
        if problems:
            return problems, found
        from qbench.cell.data.tsv import load_tsv

        found.method = "sha256 of the annotation files and of every image file, as the checks read them"
        for key in SPLITS:
            try:
                split = load_tsv(loaded.resolve(getattr(data, key)), root, decode_images=True, hashes=found.hashes[key],
                                 key=f"data.{key}")
            except DataError as error:
                problems += [f"data.{key}: {line}" for line in error.problems]
            else:
                if key == "train":
                    found.train_examples, found.train_source = len(split.captions), f"data.train ({data.train})"
        return problems, found
    if problems:
        return problems, found
    from qbench.cell.data.text import load_text_file

    found.method = "sha256 of the text files, as the checks read them"
    for key in SPLITS:
        try:
            found.texts[f"data.{key}"] = load_text_file(loaded.resolve(getattr(data, key)), hashes=found.hashes[key],
                                                        key=f"data.{key}")
        except DataError as error:
            problems += [f"data.{key}: {line}" for line in error.problems]
    return problems, found


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


def _batch_problems(suite: Suite, found: _Data) -> list[str]:
    """A training batch (any of the grid's) larger than the training split: the loader drops the incomplete
    last batch, so no step runs."""
    examples, batch = found.train_examples, max(grid.values(suite)["batch_size"])
    if examples is None or batch <= examples or not suite.train.steps:
        return []
    key = lengths.setting_key(suite, "batch_size")
    return [
        f"{key}: {batch:,} is more than the {examples:,} training caption(s) of {found.train_source}: each "
        f"step takes a full batch, so no step could run; lower {key} or add data"
    ]


def _variants(suite: Suite) -> list[Suite]:
    """The suite as each of the grid's (batch size, max length) combinations runs it: what sizes one cell."""
    values = grid.values(suite)
    return [
        suite.model_copy(update={"train": suite.train.model_copy(update={"batch_size": batch, "max_length": length})})
        for batch in values["batch_size"] for length in values["max_length"]
    ]


def _meta_model(model_path: str, suite: Suite) -> tuple[Any, dict[str, str], int, type]:
    """(config, module name -> class name, parameter count, model class) of the model, built on the meta device
    (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, revision=suite.model.revision, trust_remote_code=suite.model.trust_remote_code)
    from qbench.cell.tasks import auto_class

    with init_empty_weights():
        model = auto_class(suite.task).from_config(config, trust_remote_code=suite.model.trust_remote_code)
    parameters = sum(p.numel() for p in model.parameters())
    return config, {name: type(module).__name__ for name, module in model.named_modules()}, parameters, type(model)


def load_report_problems(folder: Any, model_class: type, config: Any, suite: Suite) -> list[str]:
    """What transformers' load report of the checkpoint's weights (read from their headers, nothing loaded) says
    the suite does not allow: parameters it would initialise at random, tensors it would drop, shapes that differ;
    and allowed missing weights of layers a quantized arm quantizes (they cannot run). Empty when the weights
    cannot be read yet (the cell reads the report of its real load and stops the same way)."""
    from qbench.cell import models

    try:
        report = models.checkpoint_load_report(model_class, config, folder, suite.model)
    except Exception:  # a model class that cannot take meta tensors, a pre-quantized checkpoint: each cell reads the
        return []      # report of its real load and stops the same way, so no run is refused on a guess
    if report is None:
        return []
    problems = report.problems(suite.model, folder, config)
    if problems or not report.missing:
        return problems
    quantized = [p for p in suite.matrix.precisions if precisions.get(p).quantized]
    if not quantized:
        return []
    from accelerate import init_empty_weights

    from qbench.cell.measure.weights import _is_kept_dense, _kept_dense

    with init_empty_weights():
        model = model_class(config)
    kept, linears = _kept_dense(model), {n for n, m in model.named_modules() if type(m).__name__ == "Linear"}
    stuck = [n for n in report.missing if n.rpartition(".")[0] in linears and not _is_kept_dense(n.rpartition(".")[0], kept)]
    if not stuck:
        return []
    return [f"model.allow_missing_weights: {', '.join(stuck[:5])} would be quantized by the {', '.join(quantized)} arm(s), "
            "but transformers initialises a missing weight after bitsandbytes quantized the others, so the layer cannot "
            "run; fix the checkpoint, or measure dense arms only"]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


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


# module classes peft cannot give a DoRA adapter (peft 0.21: "MultiheadAttention does not support DoRA (yet)")
DORA_UNWRAPPABLE = ("MultiheadAttention",)


def lora_world_problems(suite: Suite, device: str | None, module_types: dict[str, str] | None = None,
                        config: Any = None) -> list[str]:
    """The LoRA init and DoRA against this device and model, one line each: an init or DoRA that cannot run on the
    device the cells will use (`auto` asked of a child process only when a setting depends on it), DoRA on a target
    peft cannot give one, an init that decomposes the full-precision weights of a checkpoint stored quantized."""
    values = grid.values(suite)
    chosen = [inits.get(name) for name in values["lora_init"]]
    device_bound = any(init.devices for init in chosen) or (True in values["use_dora"] and any(
        precisions.get(p).kind == "int8" for p in values["precision"]))
    if device == "auto" and device_bound:
        from qbench.runner.runner import resolve_device

        device = resolve_device(device)
    problems = lora_problems(suite, device if device != "auto" else None)
    dora_key = "matrix.use_dora" if suite.matrix.use_dora is not None else "lora.use_dora"
    if module_types and True in values["use_dora"]:
        for target in suite.lora.target_modules:
            kinds = sorted({kind for name, kind in module_types.items()
                            if (name == target or name.endswith("." + target)) and kind in DORA_UNWRAPPABLE})
            if kinds:
                problems.append(f"{dora_key}: lora.target_modules {target!r} names {', '.join(kinds)} modules, which peft "
                                "cannot give a DoRA adapter; target other layers, or use_dora = false")
    stored = getattr(config, "quantization_config", None)
    decomposing = [init.name for init in chosen if init.route == "full-precision"]
    if stored is not None and decomposing:
        method = stored.get("quant_method", "quantized") if isinstance(stored, dict) else getattr(stored, "quant_method", "quantized")
        key = "matrix.lora_inits" if suite.matrix.lora_inits is not None else "lora.init"
        problems.append(f"{key}: {', '.join(map(repr, decomposing))} decomposes the checkpoint's full-precision weights, and "
                        f"{suite.model.id} is stored quantized ({method}, config.json quantization_config): give a "
                        "full-precision checkpoint of the model")
    return problems


@dataclass
class _Model:
    """What the model checks read: its config, parameter count and tokenizer."""

    path: str
    config: Any
    parameters: int
    tokenizer: Any


def _check_model(loaded: LoadedSuite) -> tuple[list[str], _Model | None]:
    from qbench.cell import models

    suite = loaded.suite
    try:
        path = models.resolve(suite.model.id, loaded.path.parent, suite.model.revision)
        models.ensure_available(path, suite.model.revision, loaded.path.parent)
    except models.ModelNotFound as error:
        return [f"model.id: {error}"], None
    except Exception as error:  # e.g. a malformed hub id: one line, never a traceback
        limits.reraise_exhausted(error)  # a limit hit is no fault of the suite's: said as what it is
        return [f"model.id: cannot find model {suite.model.id!r} ({type(error).__name__}: {error})"], None
    problems = []
    if suite.model.revision is not None and Path(path).is_dir():
        problems.append(f"model.revision: names a revision of a hub repository, and model.id is a local folder ({path}), "
                        "which is loaded as it is: the revision would not be used (leave it out)")
    folder = None
    try:
        folder = models.checkpoint_folder(path, suite.model.revision)
        problem = models.unsafe_weights_problem(folder, suite.model.safetensors_only) if folder else None
    except Exception as error:
        limits.reraise_exhausted(error)  # a limit hit is no fault of the suite's: said as what it is
        problem = f"cannot list the checkpoint's files ({type(error).__name__}: {error})"
    if problem:
        problems.append(f"model.safetensors_only: {problem}")
    try:
        config, module_types, parameters, model_class = _meta_model(path, suite)
    except Exception as error:  # a broken config.json, an unknown model type, remote code not allowed...
        limits.reraise_exhausted(error)  # a limit hit is no fault of the suite's: said as what it is
        problems.append(f"model.id: cannot build the model from {path}/config.json ({_first_line(error)})")
        return problems, None
    if folder is not None and not problem:
        problems += load_report_problems(folder, model_class, config, suite)
    problems += lora_target_problems(suite.lora.target_modules, module_types)
    problems += lora_world_problems(suite, None, module_types, config)
    try:
        tokenizer = _load_tokenizer(path, suite)
    except Exception as error:  # no tokenizer files, a broken tokenizer.json, a missing image processor...
        limits.reraise_exhausted(error)  # a limit hit is no fault of the suite's: said as what it is
        problems.append(f"model.id: cannot load the tokenizer or image processor from {path} ({_first_line(error)})")
        return problems, None
    return problems, _Model(path, config, parameters, tokenizer)


def _load_tokenizer(path: str, suite: Any) -> Any:
    """The tokenizer a cell will load (and, for clip, check that its image processor loads too)."""
    from transformers import AutoTokenizer

    spec = suite.model
    tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if suite.task == "clip":
        from transformers import AutoImageProcessor

        AutoImageProcessor.from_pretrained(path, revision=spec.revision)
    return tokenizer


# a text is tokenized from its start in pieces of this many characters per token needed, so that checking a
# corpus of gigabytes for a few thousand tokens reads only its beginning
CHARS_PER_TOKEN_TRIED = 16
TOKENS_OF_MARGIN = 8  # a cut through a word can add a token or two: ask the prefix for a few more


def count_tokens_up_to(tokenizer: Any, text: str, needed: int) -> int:
    """How many tokens `text` has (as a cell encodes it: no special tokens), or a number >= `needed` as soon
    as its beginning shows it has at least that many."""
    cut = (needed + TOKENS_OF_MARGIN) * CHARS_PER_TOKEN_TRIED
    if len(text) > cut:
        tokens = len(tokenizer(text[:cut], add_special_tokens=False)["input_ids"])
        if tokens >= needed + TOKENS_OF_MARGIN:
            return tokens
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _text_problems(suite: Any, found: _Data, tokenizer: Any, max_length: int) -> list[str]:
    """Each corpus long enough: training draws windows of max_length + 1 tokens; perplexity needs 2 tokens."""
    problems = []
    needs = {"data.train": (max_length + 1, f"one training window (max_length {max_length} + 1)"),
             "data.eval": (2, "a perplexity (one token predicted from another)")}
    for key, text in found.texts.items():
        needed, what = needs[key]
        try:
            tokens = count_tokens_up_to(tokenizer, text, needed)
        except Exception as error:  # a tokenizer that cannot encode this text
            limits.reraise_exhausted(error)  # a limit hit is no fault of the suite's: said as what it is
            problems.append(f"{key}: the model's tokenizer cannot encode the text ({_first_line(error)})")
            continue
        if tokens < needed:
            source = getattr(suite.data, key.removeprefix("data."), None) if suite.data.kind == "text" else suite.data.name
            problems.append(f"{key}: {source} has {tokens:,} token(s) for this model, fewer than the {needed:,} of {what}")
    return problems


def _model_problems(loaded: LoadedSuite, model: _Model, found: _Data, device: str | None, gpus_per_cell: int) -> list[str]:
    """Lengths against the model's limit, text corpora against its tokenizer, sizes against the device's memory."""
    suite = loaded.suite
    limit = lengths.model_limit(suite.task, model.config, getattr(model.tokenizer, "model_max_length", None))
    problems = lengths.length_problems(suite, limit)
    variants = _variants(suite)
    max_length = max(lengths.train_max_length(variant, limit)[0] for variant in variants)
    if suite.task == "causal_lm":
        problems += _text_problems(suite, found, model.tokenizer, max_length)
    if device is not None and not problems:
        window = suite.eval.window or limit.tokens
        for variant in variants:
            length = lengths.train_max_length(variant, limit)[0]
            found_now = estimate.memory_problems(variant, model.config, model.parameters, device, gpus_per_cell, length, window)
            problems += [problem for problem in found_now if problem not in problems]
    return problems


def check_suite(loaded: LoadedSuite, check_model: bool = True, device: str | None = None, gpus_per_cell: int = 1) -> Checked:
    """SuiteError listing every problem found, else what the run keeps of the checks (the data's fingerprint).

    Data files line by line (and every image decoded), the model's config, LoRA targets, tokenizer and
    safe weights, every length against the model's limit, the text corpora against its tokenizer, the
    training batch against the training split, and (with `device`: cpu or cuda) a lower bound of one
    cell's memory against the device's."""
    problems, found = _check_data(loaded)
    problems = preparation_problems(loaded) + problems
    problems += lora_world_problems(loaded.suite, device)
    problems += _batch_problems(loaded.suite, found)
    if check_model:
        model_problems, model = _check_model(loaded)
        problems += model_problems
        if model is not None:
            problems += _model_problems(loaded, model, found, device, gpus_per_cell)
    if problems:
        raise SuiteError(loaded.path, problems)
    return Checked(found.fingerprint())
