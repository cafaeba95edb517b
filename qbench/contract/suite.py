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

from qbench.contract import fields, grid, inits, optimizers, precisions, sizes
from qbench.contract.grid import Cell
from qbench.contract.renames import renamed
from qbench.contract.tasks import FIT_AXES, TASKS

# what a tolerance cannot name: fields the gate never judges (no figure, an interval, an informational figure)
UNGATED = (None, "interval", "informational")

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
    allow_missing_weights: tuple[str, ...] = Field(
        (), description="parameter names (fnmatch patterns) that may be missing from the checkpoint's weights: "
                        "transformers initialises them at random, and every record and report names them")
    allow_unexpected_weights: tuple[str, ...] = Field(
        (), description="checkpoint tensor names (fnmatch patterns) the model may have no place for (transformers drops them)")


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
    # how A, B (and, for some, the base) are set before training: a name of qbench.contract.inits
    init: str = Field(inits.DEFAULT, description="LoRA initialisation (matrix.lora_inits varies it): " + ", ".join(inits.REGISTRY))
    use_dora: bool = Field(False, description="DoRA: a trained magnitude per output row (QDoRA on a 4-bit base)")

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        return _known_inits((value,))[0]

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
    contrastive_batch: Literal["micro_batch", "step"] | None = Field(
        None, description="clip: the pairs each query is contrasted with. micro_batch (the default): its own micro-batch, "
                          "batch_size - 1 negatives, as plain gradient accumulation gives; step: every micro-batch of the "
                          "optimizer step, batch_size x grad_accum - 1 negatives (features of all micro-batches cached and "
                          "the loss recomputed over them, open_clip's --accum-freq)")

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


# the merges eval.after_merge can ask for (qbench.cell.merge): into a dequantized compute-dtype copy of the base, and
# into the arm's own precision again (what peft's merge_and_unload gives on a quantized base)
MERGES = ("dequantized", "requantized")


class QuantizationSpec(_Section):
    """Settings of the quantized arms' formats that a user tunes (matrix.llm_int8_threshold varies them)."""

    llm_int8_threshold: float = Field(
        precisions.LLM_INT8_THRESHOLD, ge=0, le=1e4,
        description="int8 arms: LLM.int8's outlier threshold; input columns with a value above it are multiplied in "
                    "16-bit (bitsandbytes' default 6.0; 0 keeps no outlier column apart)",
    )


class EvalSpec(_Section):
    batch_size: int = Field(64, ge=1)
    recall_k: tuple[Annotated[int, Field(ge=1)], ...] = Field((1, 5, 10), description="clip: k of recall@k")
    window: int | None = Field(None, ge=2, description="causal_lm: perplexity window in tokens; default: the model's context")
    max_windows: int | None = Field(
        None, ge=1, description="perplexity on at most this many windows, spread evenly over the held-out text"
    )
    protocol: Literal["disjoint", "rolling"] = Field(
        "disjoint", description="causal_lm: how the held-out text is cut into windows. disjoint: windows of eval.window "
                                "tokens side by side, each token after the first scored once with the context of its "
                                "own window; rolling: lm-evaluation-harness's loglikelihood_rolling (the tokenizer's BOS "
                                "in front, every token scored, the last window filled with preceding context)")
    before: bool = True
    after_merge: tuple[Literal[MERGES], ...] = Field(  # type: ignore[valid-type]
        (), description="evaluate the adapter merged into the base too: 'dequantized' (a compute-dtype copy of the "
        "dequantized base), 'requantized' (merged and stored in the arm's precision again); true: both")

    @field_validator("after_merge", mode="before")
    @classmethod
    def _merges(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return MERGES if value else ()
        if isinstance(value, tuple) and len(set(value)) != len(value):
            raise ValueError("a merge is listed twice")
        return value

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


class OutputSpec(_Section):
    """What a run keeps besides its records."""

    keep_adapters: bool = Field(False, description="save each cell's trained adapter under RUN/adapters/<cell> (peft's layout)")


def _known_inits(value: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [name for name in value if name not in inits.REGISTRY]
    if unknown:
        named = ", ".join(f"{name!r}{_did_you_mean(name, inits.REGISTRY)}" for name in unknown)
        raise ValueError(f"unknown LoRA init(s) {named}; known: {', '.join(inits.REGISTRY)}")
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
    lora_inits: tuple[str, ...] | None = Field(None, description="LoRA initialisations (lora.init)")
    use_dora: tuple[bool, ...] | None = Field(None, description="lora.use_dora values")
    llm_int8_threshold: tuple[Annotated[float, Field(ge=0, le=1e4)], ...] | None = Field(
        None, description="quantization.llm_int8_threshold values, for the int8 arms only (each an arm of its own)")
    exclude: tuple[dict[str, Any], ...] = Field((), description="combinations left out, e.g. {precision = 'bf16', optimizer = 'adamw8bit'}")

    @field_validator("precisions")
    @classmethod
    def _known_precisions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [p for p in value if p not in precisions.REGISTRY]
        if unknown:
            hints = [_did_you_mean(p, precisions.REGISTRY) for p in unknown]
            named = ", ".join(f"{p!r}{hint}" for p, hint in zip(unknown, hints, strict=True))
            threshold = ("; LLM.int8's outlier threshold is quantization.llm_int8_threshold, and matrix.llm_int8_threshold "
                         "lists several") if any(p.startswith("int8") for p in unknown) else ""
            raise ValueError(f"unknown precision(s) {named}; known: {', '.join(precisions.REGISTRY)}{threshold}")
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

    @field_validator("optimizers", "lora_r", "batch_size", "max_length", "gradient_checkpointing", "lora_inits", "use_dora",
                     "llm_int8_threshold")
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
        if info.field_name == "lora_inits":
            _known_inits(value)
        return value

    @field_validator("batch_size", "max_length")
    @classmethod
    def _axis_within_limits(cls, value: tuple[int, ...] | None, info: Any) -> tuple[int, ...] | None:
        return value if value is None else _at_most(f"train.{info.field_name}", value)

    @field_validator("exclude", mode="before")
    @classmethod
    def _numbers_of_float_axes(cls, value: Any) -> Any:
        """`{llm_int8_threshold = 0}` means 0.0: a whole number names a value of a float axis."""
        floats = {axis.name for axis in grid.AXES if axis.kind is float}

        def as_float(item: Any) -> Any:
            if isinstance(item, tuple):
                return tuple(as_float(v) for v in item)
            return float(item) if isinstance(item, int) and not isinstance(item, bool) else item

        if not isinstance(value, tuple):
            return value
        return tuple({k: as_float(v) if k in floats else v for k, v in e.items()} if isinstance(e, dict) else e for e in value)

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
            if not any(ch in pattern for ch in "*?[") and getattr(fields.spec_for(pattern), "kind", None) in UNGATED:
                new = renamed(pattern)
                hint = f" (schema 3 calls it {new!r})" if new != pattern and fields.spec_for(new) is not None else ""
                raise ValueError(f"{pattern!r} is not a metric qbench compares{hint} (see qbench.contract.record)")
        return value

    @field_validator("speed_ratios")
    @classmethod
    def _speed_fields(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        wrong = [name for name in value if getattr(fields.spec_for(name), "kind", None) != "speed"]
        if wrong:
            raise ValueError(f"not speed fields: {', '.join(wrong)} (e.g. speed.train_samples_per_s)")
        return value


class FitSpec(_Section):
    """`[fit]`: what `qbench fit` searches (docs/fit.md). For each arm (a precision, and each value of the
    matrix's other axes), the largest value of each axis in `axes` that trains within `budget`: a trial is
    one fresh cell of `steps` optimizer steps (evaluation included when the suite evaluates), and a value
    fits when the trial's peak is at most (1 - margin) x budget. The suite's cells (`qbench run`) record the
    same peak and whether it is within the budget.
    """

    budget: str | int | None = Field(
        None, description=f"memory one cell may use above its process baseline: bytes, or a size ({sizes.ACCEPTED}); "
        "`qbench fit --budget` overrides it"
    )
    axes: tuple[str, ...] = Field((), description="the settings searched: batch_size and/or max_length")
    batch_size: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(
        None, description="[smallest, largest] train.batch_size tried (default: 1, or 2 for clip, to what the "
        "lower bound says could fit)"
    )
    max_length: tuple[Annotated[int, Field(ge=2)], ...] | None = Field(
        None, description="[smallest, largest] train.max_length tried (default: 8 to the model's limit)"
    )
    margin: float = Field(0.0, ge=0, lt=0.5, description="share of the budget kept free: a value fits when its peak "
                          "is at most (1 - margin) x budget")
    steps: int = Field(5, ge=3, le=1_000, description="optimizer steps of each trial (at least 3)")
    quality: bool = Field(True, description="also run each arm once at the suite's own settings, for its quality")

    @field_validator("budget")
    @classmethod
    def _a_size(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            sizes.parse_size(value)  # SizeError is a ValueError: reported as this key's problem
        return value

    @field_validator("axes")
    @classmethod
    def _known_axes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = sorted({axis for axes in FIT_AXES.values() for axis in axes})
        unknown = [axis for axis in value if axis not in known]
        if unknown:
            named = ", ".join(f"{axis!r}{_did_you_mean(axis, known)}" for axis in unknown)
            raise ValueError(f"{named}: not a setting fit searches; it searches {' and '.join(known)}")
        if len(set(value)) != len(value):
            raise ValueError("an axis is listed twice")
        return value

    @field_validator("batch_size", "max_length")
    @classmethod
    def _a_range(cls, value: tuple[int, ...] | None, info: Any) -> tuple[int, ...] | None:
        if value is None:
            return value
        if len(value) != 2 or value[0] > value[1]:
            raise ValueError("a range is [smallest, largest], the smallest first")
        return _at_most(f"train.{info.field_name}", value)

    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget is None else sizes.parse_size(self.budget)


class Suite(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=100, description="also a folder name: OUT/<name>/<run-id>")
    task: Literal[tuple(TASKS)]  # type: ignore[valid-type]  # the task registry's names
    description: str = ""
    compute_dtype: Literal[("auto", *precisions.DTYPE_NAMES)] = Field(  # type: ignore[valid-type]
        "auto", description="auto: the dtype whose training step of the suite's model measured fastest on this device "
        "among those that computed it correctly (float32, bfloat16, float16; a more exact one unless the other is "
        "clearly faster), measured once per machine and kept in the user cache"
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
    quantization: QuantizationSpec = QuantizationSpec()
    matrix: MatrixSpec = MatrixSpec()
    output: OutputSpec = OutputSpec()
    compare: CompareSpec = Field(default_factory=CompareSpec, description="tolerances for `qbench compare`")
    fit: FitSpec | None = Field(None, description="what `qbench fit` searches; its cells also record their peak "
                                "against the budget")

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
    problems += ignored_setting_problems(suite)
    int8_arms = [p for p in suite.matrix.precisions if precisions.REGISTRY[p].kind == "int8"]
    for key, given in (("quantization.llm_int8_threshold", "llm_int8_threshold" in suite.quantization.model_fields_set),
                       ("matrix.llm_int8_threshold", suite.matrix.llm_int8_threshold is not None)):
        if given and not int8_arms:
            problems.append(f"{key}: LLM.int8's outlier threshold is a setting of int8 arms, and matrix.precisions has none "
                            f"({', '.join(suite.matrix.precisions)}); add int8 or leave the key out")
    values = grid.values(suite)
    batch_key = "matrix.batch_size" if suite.matrix.batch_size is not None else "train.batch_size"
    if suite.task == "clip" and min(values["batch_size"]) < 2:
        problems.append(f"{batch_key}: a contrastive batch of 1 has no negatives, so its loss is 0 and nothing trains; use 2 or more")
    problems += lora_problems(suite)
    problems += fit_problems(suite, suite.fit.axes if suite.fit else ())
    if suite.matrix.lora_r is not None and suite.lora.alpha / min(values["lora_r"]) > LORA_MAX_SCALE:
        problems.append(
            f"matrix.lora_r: lora.alpha / {min(values['lora_r'])} = {suite.lora.alpha / min(values['lora_r']):g} scales the "
            f"adapter's output; at most {LORA_MAX_SCALE:,} (see lora.alpha)"
        )
    return problems


def fit_problems(suite: Suite, axes: tuple[str, ...], where: str = "fit.axes", searching: bool = False) -> list[str]:
    """Why `axes` cannot be searched in this suite, one line each: an axis its task does not have, a range for
    an axis not searched; and, when `searching` (qbench fit, not qbench run), an axis the matrix lists too (a
    searched value and a listed one cannot both set it)."""
    problems = []
    searchable = FIT_AXES[suite.task]
    for axis in axes:
        if axis not in searchable:
            problems.append(f"{where}: {axis!r} is not a setting fit can search for task {suite.task} "
                            f"(it searches {' and '.join(searchable)})")
        elif searching and getattr(suite.matrix, axis) is not None:
            problems.append(f"{where}: {axis} is searched, so matrix.{axis} cannot list values too; leave matrix.{axis} "
                            f"out (the other matrix axes still give one search each)")
    if suite.fit is not None and where == "fit.axes":
        for axis in FIT_AXES[suite.task]:
            if getattr(suite.fit, axis) is not None and axis not in axes:
                problems.append(f"fit.{axis}: a range for an axis fit.axes does not name ({', '.join(axes) or 'none'})")
        if suite.task == "clip" and suite.fit.batch_size is not None and suite.fit.batch_size[0] < 2:
            problems.append("fit.batch_size: a contrastive batch of 1 has no negatives (nothing trains); start at 2")
    return problems


# (precision kind, device type) where peft's DoRA cannot train in this stack: on a CPU bitsandbytes multiplies
# LLM.int8 weights with MatMul8bitFp, which loses the row scales after an evaluation pass (peft 0.21, bitsandbytes
# 0.50: AttributeError on the next training pass)
DORA_UNSUPPORTED = {("int8", "cpu"): "peft's DoRA on bitsandbytes' LLM.int8 layers fails on a CPU (the first training "
                                     "pass after an evaluation raises in bitsandbytes' int8 matmul)"}


def lora_problems(suite: Suite, device: str | None = None) -> list[str]:
    """Cells whose LoRA init or DoRA cannot run with their precision or task (and, given `device`, on it): one line
    per setting and reason."""
    problems: list[str] = []
    init_key = "matrix.lora_inits" if suite.matrix.lora_inits is not None else "lora.init"
    dora_key = "matrix.use_dora" if suite.matrix.use_dora is not None else "lora.use_dora"
    for cell in grid.cells(suite):
        values = cell.values()
        init = inits.get(values["lora_init"])
        found = [f"{init_key}: {init.name!r} cannot run here: {why}" for why in inits.problems(init, cell.precision, suite.task, device)]
        kind = precisions.get(cell.precision).kind
        why = DORA_UNSUPPORTED.get((kind, device.split(":")[0] if device else ""))
        if values["use_dora"] and why:
            found.append(f"{dora_key}: DoRA with precision {cell.precision!r}: {why}")
        for line in found:
            line += " (leave it out, or drop those cells with matrix.exclude)"
            if line not in problems:
                problems.append(line)
    return problems


def ignored_setting_problems(suite: Suite) -> list[str]:
    """Settings given in the suite that nothing would apply: each would be silently dropped, and the records would
    say a setting ran that did not. One line each, before any cell."""
    problems = []
    data, train, given = suite.data, suite.train, suite.data.model_fields_set
    if suite.task != "clip" and train.contrastive_batch is not None:
        problems.append(f"train.contrastive_batch: a setting of contrastive (clip) training; {suite.task} has no negatives")
    if suite.task == "clip" and "protocol" in suite.eval.model_fields_set:
        problems.append("eval.protocol: a perplexity window protocol; only causal_lm suites have one (clip measures recall@k)")
    if suite.task == "clip" and suite.eval.max_windows is not None:
        problems.append("eval.max_windows: caps the windows of a perplexity; only causal_lm suites have them (clip ranks "
                        "every held-out image and caption)")
    if suite.task == "causal_lm" and data.num_workers:
        problems.append("data.num_workers: causal_lm draws its training windows from the tokenized text in the cell's own "
                        "process; no DataLoader workers would start (leave the key out)")
    if data.kind != "builtin" and "name" in given:
        problems.append(f"data.name: names a builtin dataset, and data.kind is {data.kind!r} (its files are data.train and "
                        "data.eval)")
    if data.kind == "builtin":
        problems += [f"data.{key}: data.kind = 'builtin' reads builtin:{data.name}; this file would not be read"
                     for key in ("train", "eval", "image_root") if key in given]
    if data.kind == "text" and "image_root" in given:
        problems.append("data.image_root: text data has no images (image_root is for kind tsv)")
    if train.scheduler == "constant" and train.warmup_steps:
        problems.append(f"train.warmup_steps: the 'constant' scheduler has no warm-up (transformers ignores "
                        f"num_warmup_steps for it), so {train.warmup_steps} warm-up step(s) would not happen; use "
                        "scheduler = 'constant_with_warmup', or leave warmup_steps out")
    if train.scheduler == "polynomial" and train.lr <= POLYNOMIAL_LR_END:
        problems.append(f"train.lr: the 'polynomial' scheduler decays to {POLYNOMIAL_LR_END:g} and needs a larger lr "
                        "(transformers refuses it in every cell)")
    return problems


# transformers' get_polynomial_decay_schedule_with_warmup's default end learning rate
POLYNOMIAL_LR_END = 1e-7


def _did_you_mean(word: str, known: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _closest_key_hint(location: tuple[Any, ...], model: type[BaseModel]) -> str:
    """' (did you mean X?)' for a misspelt key, found among the valid keys at that location, else a key of that
    name in another table (`llm_int8_threshold` at the top level: quantization.llm_int8_threshold)."""
    top = model
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    hint = _did_you_mean(location[-1], model.model_fields)
    if hint:
        return hint
    elsewhere = [f"{name}.{location[-1]}" for name, field in top.model_fields.items()
                 if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
                 and str(location[-1]) in field.annotation.model_fields and (name,) != tuple(location[:-1])]
    return f" (did you mean {elsewhere[0]!r}?)" if elsewhere else ""


# keys people look for under another name or in another table: where qbench keeps what they ask for
ELSEWHERE = {
    "merge": "eval.after_merge", "merged": "eval.after_merge", "after_merge": "eval.after_merge",
    "merge_and_unload": "eval.after_merge", "keep_adapter": "output.keep_adapters", "keep_adapters": "output.keep_adapters",
    "save_adapter": "output.keep_adapters", "init_lora_weights": "lora.init", "dora": "lora.use_dora",
    "use_dora": "lora.use_dora", "init": "lora.init",
}


def _elsewhere_hint(location: tuple[Any, ...]) -> str:
    """' (qbench sets that with eval.after_merge)' for a key qbench keeps under another name or table."""
    found = ELSEWHERE.get(str(location[-1]))
    return f" (qbench sets that with {found})" if found and found != key_name(location) else ""


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
            hint = _closest_key_hint(location, Suite) or _elsewhere_hint(location)
            problems.append(f"{key}: unknown key{hint}")
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
