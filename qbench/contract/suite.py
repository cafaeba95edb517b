"""TOML suite file -> validated configuration -> the matrix of cells."""

from __future__ import annotations

import difflib
import hashlib
import itertools
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qbench.contract import fields, grid, optimizers, precisions
from qbench.contract.grid import Cell
from qbench.contract.tasks import TASKS

# Upper bounds, each with its reason: past them a value is a typo, not a benchmark. Without them
# `steps = 10**23` trained until killed and `batch_size = 10**9` grew one cell to 23 GB (torch builds a
# batch's index list in memory) until the kernel's OOM killer stopped it. Sizes that pass can still be too
# large for the machine: the checks before the run compare an estimate with its memory (suite.estimate).
LIMITS: dict[str, tuple[float, str]] = {
    "train.steps": (1_000_000, "a million optimizer steps is a training run of its own, not an arm of a comparison"),
    "train.batch_size": (65_536, "torch builds each batch's index list in memory, and no device holds a larger batch of one cell"),
    "train.grad_accum": (4_096, "more micro-batches per step than that only make a step take hours"),
    "train.max_length": (1_048_576, "no model qbench can load takes longer sequences (2**20 tokens)"),
    "train.lr": (1.0, "AdamW moves each weight by about lr per step: at 1 or more a fine-tune diverges at once"),
    "train.weight_decay": (1.0, "decoupled weight decay shrinks each weight by lr x weight_decay per step; above 1 it is a typo"),
    "eval.batch_size": (65_536, "no device holds a larger evaluation batch"),
    "eval.window": (1_048_576, "no model qbench can load takes longer sequences (2**20 tokens)"),
    "eval.recall_k": (1_000_000, "recall@k over more candidates than that is not an evaluation qbench runs in one cell"),
    "matrix.seeds": (1_000, "each seed is one cell per precision, each its own process"),
}
LORA_MAX_SCALE = 1_024  # lora.alpha / lora.r


def _at_most(key: str, value: Any) -> Any:
    """`value` when within LIMITS[key] (for a tuple: its length for seeds, else its largest entry), else
    ValueError saying the limit and why."""
    limit, reason = LIMITS[key]
    if key == "matrix.seeds":
        if len(value) > limit:
            raise ValueError(f"no more than {limit:,} seeds: {reason}")
        return value
    largest = max(value, default=0) if isinstance(value, tuple) else value
    if largest > limit:
        raise ValueError(f"at most {limit:,}: {reason}" if isinstance(limit, int) else f"at most {limit:g}: {reason}")
    return value


class SuiteError(Exception):
    """A suite file that cannot be run; `problems` holds one line per problem, naming file and key."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))


class _Section(BaseModel):
    # strict: `steps = true` or `lr = "1e-3"` is a mistake to report, not a value to coerce (parse() turns
    # TOML arrays into tuples first, so strict tuple fields still accept them); inf and nan are no setting
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelSpec(_Section):
    id: str = Field(description="builtin:NAME, a Hugging Face hub id, or a local checkpoint folder")
    revision: str | None = None
    trust_remote_code: bool = False
    safetensors_only: bool = True
    device_map: Literal["single", "auto"] = "single"


class DataSpec(_Section):
    kind: Literal["builtin", "tsv", "text"] = "builtin"
    name: str | None = Field(None, description="builtin dataset name")
    train: str | None = Field(None, description="annotation/text file for fine-tuning (kind tsv/text)")
    eval: str | None = Field(None, description="held-out annotation/text file (kind tsv/text)")
    image_root: str | None = Field(None, description="folder the TSV image paths are relative to")
    num_workers: int = Field(0, ge=0, le=64)

    @model_validator(mode="after")
    def _fields_for_kind(self) -> DataSpec:
        if self.kind == "builtin" and not self.name:
            raise ValueError("data.kind = 'builtin' needs data.name")
        if self.kind in ("tsv", "text") and not (self.train and self.eval):
            raise ValueError(f"data.kind = {self.kind!r} needs data.train and data.eval")
        if self.kind == "tsv" and not self.image_root:
            raise ValueError("data.kind = 'tsv' needs data.image_root")
        return self


class LoraSpec(_Section):
    r: int = Field(16, ge=1, le=4096)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: tuple[str, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _scale_in_range(self) -> LoraSpec:
        if self.alpha / self.r > LORA_MAX_SCALE:
            raise ValueError(
                f"lora.alpha / lora.r = {self.alpha / self.r:g} scales the adapter's output; at most {LORA_MAX_SCALE:,}: common "
                "settings are 1 to 4, and past this one optimizer step moves the adapter's output by more than its input"
            )
        return self


class TrainSpec(_Section):
    steps: int = Field(ge=0, description="optimizer steps; 0 measures the quantized base alone (no train phase)")
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: str = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_length: int | None = Field(
        None, ge=2, description="tokens per text (CLIP) or per training sequence (LM); default 64, or the model's limit when lower"
    )
    untimed_steps: int = Field(2, ge=0, description="warm-up steps left out of the speed figures")
    prepare: Literal["none", "peft-kbit"] = Field("none", description="k-bit preparation, applied to every arm")
    gradient_checkpointing: bool = False
    optimizer: str = Field(optimizers.DEFAULT, description="a name of qbench.contract.optimizers (matrix.optimizers varies it)")

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        return _known_optimizers((value,))[0]

    @field_validator("steps", "batch_size", "grad_accum", "max_length", "lr", "weight_decay")
    @classmethod
    def _within_limits(cls, value: Any, info: Any) -> Any:
        return value if value is None else _at_most(f"train.{info.field_name}", value)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        known = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
        if value not in known:
            raise ValueError(f"unknown scheduler {value!r}; known: {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _timed_steps_left(self) -> TrainSpec:
        if self.steps and self.untimed_steps >= self.steps:
            raise ValueError(f"untimed_steps ({self.untimed_steps}) must be below steps ({self.steps})")
        if self.steps and self.warmup_steps and self.warmup_steps >= self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps}): otherwise no step runs at the "
                "scheduled learning rate"
            )
        return self


class EvalSpec(_Section):
    batch_size: int = Field(64, ge=1)
    recall_k: tuple[Annotated[int, Field(ge=1)], ...] = Field((1, 5, 10), description="clip: k of recall@k")
    window: int | None = Field(None, ge=2, description="causal_lm: perplexity window in tokens; default: the model's context")
    max_windows: int | None = Field(
        None, ge=1, description="perplexity on at most this many windows, spread evenly over the held-out text"
    )
    before: bool = True

    @field_validator("batch_size", "window", "recall_k")
    @classmethod
    def _within_limits(cls, value: Any, info: Any) -> Any:
        return value if value is None else _at_most(f"eval.{info.field_name}", value)

    @field_validator("recall_k")
    @classmethod
    def _some_distinct_k(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("no k: give at least one (e.g. [1, 5, 10]); without one a clip cell measures no quality")
        if len(set(value)) != len(value):
            raise ValueError("a k is listed twice")
        return value


def _known_optimizers(value: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [name for name in value if name not in optimizers.REGISTRY]
    if unknown:
        named = ", ".join(f"{name!r}{_did_you_mean(name, optimizers.REGISTRY)}" for name in unknown)
        raise ValueError(f"unknown optimizer(s) {named}; known: {', '.join(optimizers.REGISTRY)}")
    return value


class MatrixSpec(_Section):
    """The grid: a list of values per axis (qbench.contract.grid); every cell is one combination of them.

    An axis left out takes the suite's one setting (train.optimizer, lora.r, train.batch_size, ...).
    `exclude` drops combinations: each entry is a table of axis name -> value (or list of values),
    and drops every cell that has all of them.
    """

    precisions: tuple[str, ...] = Field(precisions.DEFAULT_MATRIX, min_length=1)
    seeds: tuple[Annotated[int, Field(ge=0, le=2**32 - 1)], ...] = (0,)
    optimizers: tuple[str, ...] | None = Field(None, description="optimizer names (train.optimizer if not given)")
    lora_r: tuple[Annotated[int, Field(ge=1, le=4096)], ...] | None = Field(None, description="LoRA ranks (lora.r)")
    batch_size: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(None, description="train.batch_size values")
    max_length: tuple[Annotated[int, Field(ge=2)], ...] | None = Field(None, description="train.max_length values")
    gradient_checkpointing: tuple[bool, ...] | None = Field(None, description="train.gradient_checkpointing values")
    exclude: tuple[dict[str, Any], ...] = Field((), description="combinations left out, e.g. {precision = 'bf16', optimizer = 'adamw8bit'}")

    @field_validator("precisions")
    @classmethod
    def _known_precisions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [p for p in value if p not in precisions.REGISTRY]
        if unknown:
            hints = [_did_you_mean(p, precisions.REGISTRY) for p in unknown]
            named = ", ".join(f"{p!r}{hint}" for p, hint in zip(unknown, hints, strict=True))
            raise ValueError(f"unknown precision(s) {named}; known: {', '.join(precisions.REGISTRY)}")
        if len(set(value)) != len(value):
            raise ValueError("precisions are listed twice")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("no seeds: give at least one")
        if len(set(value)) != len(value):
            raise ValueError("seeds are listed twice (each seed is one cell per precision)")
        return _at_most("matrix.seeds", value)

    @field_validator("optimizers", "lora_r", "batch_size", "max_length", "gradient_checkpointing")
    @classmethod
    def _axis_values(cls, value: tuple[Any, ...] | None, info: Any) -> tuple[Any, ...] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("an empty axis: give at least one value, or leave the key out to use the suite's setting")
        if len(set(value)) != len(value):
            raise ValueError("a value is listed twice")
        if info.field_name == "optimizers":
            _known_optimizers(value)
        return value

    @field_validator("batch_size", "max_length")
    @classmethod
    def _axis_within_limits(cls, value: tuple[int, ...] | None, info: Any) -> tuple[int, ...] | None:
        return value if value is None else _at_most(f"train.{info.field_name}", value)

    @model_validator(mode="after")
    def _exclusions(self) -> MatrixSpec:
        declared = {axis.name: getattr(self, axis.matrix_key) for axis in grid.AXES if getattr(self, axis.matrix_key)}
        points = [dict(zip(declared, combination, strict=True)) for combination in itertools.product(*declared.values())]
        for index, exclusion in enumerate(self.exclude):
            where = f"exclude[{index}]"
            if not exclusion:
                raise ValueError(f"{where}: an empty table would drop every cell; name at least one axis")
            for name, wanted in exclusion.items():
                axis = next((a for a in grid.AXES if name == a.name), None)
                if axis is None:
                    hint = _did_you_mean(name, [a.name for a in grid.AXES])
                    raise ValueError(f"{where}: unknown axis {name!r}{hint}; axes: {', '.join(a.name for a in grid.AXES)}")
                if name not in declared:
                    raise ValueError(f"{where}: {name} is not listed in the matrix (matrix.{axis.matrix_key})")
                for value in wanted if isinstance(wanted, tuple) else (wanted,):
                    if not any(value == v and type(value) is type(v) for v in declared[name]):
                        raise ValueError(f"{where}.{name}: {value!r} is not a value of matrix.{axis.matrix_key} "
                                         f"({', '.join(map(repr, declared[name]))})")
            if not any(grid.matches(point, exclusion) for point in points):
                raise ValueError(f"{where} matches no cell of the matrix")
        if self.exclude and all(any(grid.matches(p, e) for e in self.exclude) for p in points):
            raise ValueError("exclude drops every cell of the matrix")
        return self


class ToleranceSpec(_Section):
    """How far a metric may move the worse way before `qbench compare` calls it a regression.

    The allowed change is the larger of `abs` (in the metric's stored unit: recall as a fraction,
    bytes as bytes) and `rel` times the baseline value; `ignore` leaves the metric out of the verdict.
    """

    abs: float | None = Field(None, ge=0)
    rel: float | None = Field(None, ge=0)
    ignore: bool = False

    @model_validator(mode="after")
    def _says_something(self) -> ToleranceSpec:
        if self.abs is None and self.rel is None and not self.ignore:
            raise ValueError("a tolerance needs abs, rel or ignore = true")
        return self


class CompareSpec(_Section):
    """Settings of `qbench compare` for this suite, over qbench's defaults (see qbench.compare)."""

    tolerances: dict[str, ToleranceSpec] = Field(
        default_factory=dict, description="field name or pattern (fnmatch, e.g. 'quality.*recall@1') -> tolerance"
    )
    speed_ratios: tuple[str, ...] = Field(
        ("speed.train_samples_per_s",), description="speed fields compared as ratio to the baseline precision in one run"
    )
    noise_sigmas: float = Field(3.0, ge=0, description="with several seeds, allow this many standard errors of noise")

    @field_validator("tolerances")
    @classmethod
    def _patterns_name_metrics(cls, value: dict[str, ToleranceSpec]) -> dict[str, ToleranceSpec]:
        for pattern in value:
            if not pattern.strip():
                raise ValueError("an empty field pattern")
            if not any(ch in pattern for ch in "*?[") and getattr(fields.spec_for(pattern), "kind", "interval") == "interval":
                raise ValueError(f"{pattern!r} is not a metric qbench compares (see qbench.fields.FIELDS)")
        return value

    @field_validator("speed_ratios")
    @classmethod
    def _speed_fields(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        wrong = [name for name in value if getattr(fields.spec_for(name), "kind", None) != "speed"]
        if wrong:
            raise ValueError(f"not speed fields: {', '.join(wrong)} (e.g. speed.train_samples_per_s)")
        return value


class Suite(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=100, description="also a folder name: OUT/<name>/<run-id>")
    task: Literal[tuple(TASKS)]  # type: ignore[valid-type]  # the task registry's names
    description: str = ""
    compute_dtype: Literal[("auto", *precisions.DTYPE_NAMES)] = Field(  # type: ignore[valid-type]
        "auto", description="auto: bf16 where the device computes it natively, else fp16 on a GPU, fp32 on a CPU"
    )
    baseline: str = Field(precisions.DENSE, description="the precision the others are compared with; default: the "
                          "matrix's dense arm (`dense` when listed, else the first of bf16 / fp16 / fp32 listed)")
    threads: int | None = Field(
        None, ge=1, le=1024, description="torch threads per cell; default: the cores, divided among cells run side by side"
    )
    model: ModelSpec
    data: DataSpec
    lora: LoraSpec
    train: TrainSpec
    eval: EvalSpec = EvalSpec()
    matrix: MatrixSpec = MatrixSpec()
    compare: CompareSpec = Field(default_factory=CompareSpec, description="tolerances for `qbench compare`")

    @model_validator(mode="after")
    def _something_measured(self) -> Suite:
        if self.train.steps == 0 and not self.eval.before:
            raise ValueError("train.steps = 0 measures the quantized base only before fine-tuning: set eval.before = true")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        # the name becomes a folder under --out and results/baselines: "." or ".." would put runs outside
        # --out and let `baseline refresh` replace results/baselines/.. (everything under results/)
        if value.startswith("."):
            raise ValueError(f"{value!r} is not a valid suite name (it becomes a folder name, and may not start with '.')")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_baseline(cls, data: Any) -> Any:
        """No `baseline` key: the matrix's dense arm, so a matrix of bf16 and 4-bit arms still has its baseline."""
        if not isinstance(data, dict) or "baseline" in data:
            return data
        matrix = data.get("matrix")
        listed = matrix.get("precisions", precisions.DEFAULT_MATRIX) if isinstance(matrix, dict) else precisions.DEFAULT_MATRIX
        if not isinstance(listed, (list, tuple)):
            return data
        dense = [p for p in listed if isinstance(p, str) and p in precisions.REGISTRY and precisions.REGISTRY[p].kind == "dense"]
        if dense:
            return {**data, "baseline": precisions.DENSE if precisions.DENSE in dense else dense[0]}
        return data

    @field_validator("baseline")
    @classmethod
    def _baseline_in_registry(cls, value: str) -> str:
        if value not in precisions.REGISTRY:
            raise ValueError(f"{value!r} is not a known precision{_did_you_mean(value, precisions.REGISTRY)}")
        return value


@dataclass(frozen=True)
class LoadedSuite:
    """A validated suite with the file it came from (relative paths resolve against its folder)."""

    suite: Suite
    path: Path
    sha256: str
    text: str | None = None  # the text that was validated: cells get this, not whatever the file holds later

    def source_text(self) -> str:
        return self.text if self.text is not None else self.path.read_text(encoding="utf-8")

    def resolve(self, relative: str) -> Path:
        """A path the suite names, relative to the suite's folder, as this process finds it on disk."""
        from qbench.contract.files import disk_name

        path = Path(disk_name(relative)).expanduser()
        return path if path.is_absolute() else (self.path.parent / path)

    def cells(self, only: tuple[str, ...] | None = None, seeds: tuple[int, ...] | None = None,
              where: dict[str, tuple[Any, ...]] | None = None) -> list[Cell]:
        """The grid's cells (qbench.contract.grid.cells): `only` keeps those precisions, `seeds` replaces
        matrix.seeds, `where` keeps the cells whose axes have one of the given values."""
        conditions = dict(where or {})
        if only is not None:
            conditions["precision"] = tuple(p for p in only if p in conditions.get("precision", only))
        return grid.cells(self.suite, seeds, conditions)

    def for_cell(self, cell: Cell) -> LoadedSuite:
        """The suite as `cell` runs it (its axis values in the settings they override), from the same file."""
        return replace(self, suite=grid.at(self.suite, cell))


def combination_problems(suite: Suite) -> list[str]:
    """Settings that are each valid but cannot give what the suite asks for together, one line each."""
    problems = []
    if suite.baseline not in suite.matrix.precisions:
        default = "" if "baseline" in suite.model_fields_set else " (the default)"
        problems.append(
            f"baseline: {suite.baseline!r}{default} is not in matrix.precisions ({', '.join(suite.matrix.precisions)}): "
            "every ratio and delta is taken against the baseline, so add it to the matrix or name one of its "
            "precisions (--only may still leave it out of one run)"
        )
    if suite.task == "clip" and suite.eval.window is not None:
        problems.append("eval.window: a perplexity window; only causal_lm suites have one (clip measures recall@k)")
    if suite.task == "causal_lm" and "recall_k" in suite.eval.model_fields_set:
        problems.append("eval.recall_k: only clip suites measure recall@k (causal_lm measures perplexity)")
    values = grid.values(suite)
    batch_key = "matrix.batch_size" if suite.matrix.batch_size is not None else "train.batch_size"
    if suite.task == "clip" and min(values["batch_size"]) < 2:
        problems.append(f"{batch_key}: a contrastive batch of 1 has no negatives, so its loss is 0 and nothing trains; use 2 or more")
    if suite.matrix.lora_r is not None and suite.lora.alpha / min(values["lora_r"]) > LORA_MAX_SCALE:
        problems.append(
            f"matrix.lora_r: lora.alpha / {min(values['lora_r'])} = {suite.lora.alpha / min(values['lora_r']):g} scales the "
            f"adapter's output; at most {LORA_MAX_SCALE:,} (see lora.alpha)"
        )
    return problems


def _did_you_mean(word: str, known: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _closest_key_hint(location: tuple[Any, ...], model: type[BaseModel]) -> str:
    """' (did you mean X?)' for a misspelt key, found among the valid keys at that location."""
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    return _did_you_mean(location[-1], model.model_fields)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key_name(location: tuple[Any, ...]) -> str:
    """A dotted key as it is shown in a message: a part that is not a bare TOML key (`A-Za-z0-9_-`) is
    shown as its repr, so a key holding a newline, a dot or a terminal control character stays one line
    and cannot colour or move the terminal (`train.'stepz\\n[model]'`)."""
    parts = [str(part) if isinstance(part, int) or _PLAIN_KEY.fullmatch(str(part)) else repr(str(part)) for part in location]
    return ".".join(parts) or "(top level)"


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tuples(value: Any) -> Any:
    """TOML arrays as tuples (the strict models take tuples); tables stay dicts."""
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value


def _problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        location = tuple(item["loc"])
        key = key_name(location)
        if item["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key{_closest_key_hint(location, Suite)}")
        elif item["type"] == "missing":
            problems.append(f"{key}: required key is missing")
        elif item["type"] == "value_error" and isinstance(item.get("input"), dict):
            # a check across several keys of a section: the message names them, the whole table is noise
            problems.append(f"{key}: {item['msg'].removeprefix('Value error, ')}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {message} (got {_shown(item.get('input'))})")
    return problems


def parse(text: str, path: Path | str = "<suite>") -> Suite:
    """Validate suite TOML text; SuiteError with one line per problem otherwise."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SuiteError(path, [f"TOML syntax error: {error}"]) from None
    except RecursionError:
        raise SuiteError(path, ["TOML syntax error: arrays or tables nested too deeply"]) from None
    try:
        suite = Suite.model_validate(_tuples(raw))
    except ValidationError as error:
        raise SuiteError(path, _problems(error)) from None
    except RecursionError:
        raise SuiteError(path, ["values nested too deeply"]) from None
    problems = combination_problems(suite)
    if problems:
        raise SuiteError(path, problems)
    return suite


def parse_compare(text: str, path: Path | str = "<suite>") -> CompareSpec:
    """Only the `[compare]` table of suite text, validated on its own (a run's stored suite may be older)."""
    try:
        raw = tomllib.loads(text).get("compare", {})
        return CompareSpec.model_validate(_tuples(raw))
    except tomllib.TOMLDecodeError as error:
        raise SuiteError(path, [f"TOML syntax error: {error}"]) from None
    except ValidationError as error:
        raise SuiteError(path, [f"compare.{p}" for p in _problems(error)]) from None


def load(path: Path | str) -> LoadedSuite:
    """Read and validate a suite file (structure only; see `qbench.runner.preflight` for files and models)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as error:  # ValueError: a path with a NUL byte
        raise SuiteError(path, [f"cannot read the suite file: {getattr(error, 'strerror', None) or error}"]) from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a byte order mark (Windows editors) is no TOML
    except UnicodeDecodeError as error:
        raise SuiteError(path, [f"the suite file is not UTF-8 text (byte {error.start})"]) from None
    return LoadedSuite(parse(text, path), path.resolve(), hashlib.sha256(data).hexdigest(), text)
