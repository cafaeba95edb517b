"""TOML suite file -> validated configuration -> the matrix of cells."""

from __future__ import annotations

import difflib
import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qbench.results import fields
from qbench.suite import precisions
from qbench.tasks import TASKS


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


class TrainSpec(_Section):
    steps: int = Field(ge=0, description="optimizer steps; 0 measures the quantized base alone (no train phase)")
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: str = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_length: int = Field(64, ge=2, description="tokens per text (CLIP) or per training sequence (LM)")
    untimed_steps: int = Field(2, ge=0, description="warm-up steps left out of the speed figures")
    prepare: Literal["none", "peft-kbit"] = Field("none", description="k-bit preparation, applied to every arm")
    gradient_checkpointing: bool = False

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
        return self


class EvalSpec(_Section):
    batch_size: int = Field(64, ge=1)
    recall_k: tuple[Annotated[int, Field(ge=1)], ...] = (1, 5, 10)
    window: int | None = Field(None, ge=2, description="perplexity window in tokens; default: the model's context")
    max_windows: int | None = Field(
        None, ge=1, description="perplexity on at most this many windows, spread evenly over the held-out text"
    )
    before: bool = True


class MatrixSpec(_Section):
    precisions: tuple[str, ...] = Field(precisions.DEFAULT_MATRIX, min_length=1)
    seeds: tuple[Annotated[int, Field(ge=0, le=2**32 - 1)], ...] = (0,)

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
        return value


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
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
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
class Cell:
    """One run of the fine-tune: the suite fixes everything but the precision and the seed."""

    precision: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.precision}-seed{self.seed}"


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
        path = Path(relative).expanduser()
        return path if path.is_absolute() else (self.path.parent / path)

    def cells(self, only: tuple[str, ...] | None = None, seeds: tuple[int, ...] | None = None) -> list[Cell]:
        chosen = [p for p in self.suite.matrix.precisions if only is None or p in only]
        return [Cell(p, s) for s in (seeds or self.suite.matrix.seeds) for p in chosen]


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
        key = ".".join(str(part) for part in location) or "(top level)"
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
        return Suite.model_validate(_tuples(raw))
    except ValidationError as error:
        raise SuiteError(path, _problems(error)) from None
    except RecursionError:
        raise SuiteError(path, ["values nested too deeply"]) from None


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
    """Read and validate a suite file (structure only; see `qbench.suite.preflight` for files and models)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as error:  # ValueError: a path with a NUL byte
        raise SuiteError(path, [f"cannot read the suite file: {getattr(error, 'strerror', None) or error}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SuiteError(path, [f"the suite file is not UTF-8 text (byte {error.start})"]) from None
    return LoadedSuite(parse(text, path), path.resolve(), hashlib.sha256(data).hexdigest(), text)
