"""The suite's grid: its axes (precision, optimizer, LoRA rank, batch size, sequence length, gradient
checkpointing, LoRA init, DoRA, LLM.int8's outlier threshold, seed), the cells they span, their ids, and filters
over them (`--only`, `--where`).

Each axis is named in one place here: the `[matrix]` key that lists its values, the suite setting a
value overrides, the record column that holds it, and how a cell id names it. A cell's id names the
precision, every other axis with more than one value in the matrix, and the seed, so a suite without
the newer axes keeps its ids (`bf16-seed0`) and a grid's ids say where each cell sits
(`nf4-dq-adamw8bit-bs4-len64-seed0`).

An axis may be a setting of one kind of precision only (LLM.int8's outlier threshold): a cell of another
kind has no value on it (None), takes no part of the axis in its id, and is not repeated per value.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qbench.contract import precisions


@dataclass(frozen=True)
class Axis:
    """One dimension of the grid."""

    name: str  # in --where, matrix.exclude and Cell.axes
    matrix_key: str  # the [matrix] key listing its values
    record_key: str  # the record column holding a cell's value
    setting: tuple[str, str] | None  # (section, key) of the suite a value overrides; None: precision and seed
    id_prefix: str  # a cell id names a value as prefix + value ("r16", "bs4"); a bool as prefix or "no" + prefix
    kind: type  # str, int, float or bool
    precision_kind: str | None = None  # the precision kind (qbench.contract.precisions) it is a setting of; None: all

    def applies_to(self, precision: str) -> bool:
        """Whether a cell of `precision` has a value on this axis (an unknown name: as if it had)."""
        if self.precision_kind is None:
            return True
        known = precisions.REGISTRY.get(precision)
        return known is None or known.kind == self.precision_kind

    def id_part(self, value: Any) -> str:
        """How a cell id names `value` ("" for None or NaN, as a table holds None: a cell whose precision the axis
        does not apply to)."""
        if value is None or (isinstance(value, float) and value != value):
            return ""
        if self.kind is bool:
            return self.id_prefix if value else f"no{self.id_prefix}"
        if self.kind is float:
            return f"{self.id_prefix}{float(value):g}"
        return f"{self.id_prefix}{value}"

    def parse(self, text: str) -> Any:
        """A value as the command line writes it; ValueError when it is not one of this axis's kind."""
        text = text.strip()
        if self.kind is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"{self.name}: {text!r} is not true or false")
        if self.kind is int:
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"{self.name}: {text!r} is not an integer") from None
        if self.kind is float:
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"{self.name}: {text!r} is not a number") from None
        return text


# in id order: precision first, seed last
AXES: tuple[Axis, ...] = (
    Axis("precision", "precisions", "precision", None, "", str),
    Axis("optimizer", "optimizers", "config.train.optimizer", ("train", "optimizer"), "", str),
    Axis("lora_r", "lora_r", "config.lora.r", ("lora", "r"), "r", int),
    Axis("batch_size", "batch_size", "config.train.batch_size", ("train", "batch_size"), "bs", int),
    Axis("max_length", "max_length", "config.train.max_length", ("train", "max_length"), "len", int),
    Axis("gradient_checkpointing", "gradient_checkpointing", "config.train.gradient_checkpointing",
         ("train", "gradient_checkpointing"), "gc", bool),
    # how the adapter starts (qbench.contract.inits) and whether it is DoRA: `nf4-dq-pissa-dora-seed0`
    Axis("lora_init", "lora_inits", "config.lora.init", ("lora", "init"), "", str),
    Axis("use_dora", "use_dora", "config.lora.use_dora", ("lora", "use_dora"), "dora", bool),
    Axis("llm_int8_threshold", "llm_int8_threshold", "precision.llm_int8_threshold",
         ("quantization", "llm_int8_threshold"), "t", float, precision_kind="int8"),
    Axis("seed", "seeds", "seed", None, "seed", int),
)
BY_NAME = {axis.name: axis for axis in AXES}
SETTING_AXES = tuple(axis for axis in AXES if axis.setting is not None)  # every axis but precision and seed
RECORD_KEYS = tuple(axis.record_key for axis in AXES)


def axis_named(name: str) -> Axis:
    """The axis called `name` (or by its [matrix] key: `optimizers` for `optimizer`); ValueError naming the axes."""
    for axis in AXES:
        if name in (axis.name, axis.matrix_key):
            return axis
    close = difflib.get_close_matches(name, [a.name for a in AXES] + [a.matrix_key for a in AXES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown axis {name!r}{hint}; axes: {', '.join(a.name for a in AXES)}")


@dataclass(frozen=True)
class Cell:
    """One point of the suite's grid: the suite fixes everything but the values of its axes."""

    precision: str
    seed: int
    axes: tuple[tuple[str, Any], ...] = ()  # (name, value) of every other axis, in AXES order
    named: tuple[str, ...] = ()  # the other axes the id names: those with several values in the matrix

    @property
    def id(self) -> str:
        """`<precision>[-<axis value>...]-seed<seed>`: stable and safe as a file name."""
        others = [BY_NAME[name].id_part(value) for name, value in self.axes if name in self.named]
        return "-".join([self.precision, *filter(None, others), f"seed{self.seed}"])

    def values(self) -> dict[str, Any]:
        """Every axis value of the cell by axis name, precision and seed included."""
        return {"precision": self.precision, **dict(self.axes), "seed": self.seed}

    def record_fields(self) -> dict[str, Any]:
        """The axis values as record columns (`config.train.optimizer`, ...), precision and seed left to the identity."""
        return {BY_NAME[name].record_key: value for name, value in self.axes}


def values(suite: Any, seeds: tuple[int, ...] | None = None) -> dict[str, tuple[Any, ...]]:
    """Each axis's values: the [matrix] list, or the suite's one setting where the matrix gives none."""
    matrix = suite.matrix
    found: dict[str, tuple[Any, ...]] = {}
    for axis in AXES:
        listed = getattr(matrix, axis.matrix_key)
        if axis.name == "seed" and seeds:
            listed = seeds
        if listed is None:
            section, key = axis.setting
            listed = (getattr(getattr(suite, section), key),)
        found[axis.name] = tuple(listed)
    return found


def varying(suite: Any) -> tuple[str, ...]:
    """Names of the axes other than precision and seed that the matrix gives more than one value."""
    return tuple(axis.name for axis in SETTING_AXES if len(getattr(suite.matrix, axis.matrix_key) or ()) > 1)


def matches(point: Mapping[str, Any], conditions: Mapping[str, Any]) -> bool:
    """True when the point has, for every axis of `conditions`, the value (or one of the values) given."""
    for name, wanted in conditions.items():
        allowed = wanted if isinstance(wanted, (tuple, list, set, frozenset)) else (wanted,)
        if not any(point[name] == value and type(point[name]) is type(value) for value in allowed):
            return False
    return True


def cells(suite: Any, seeds: tuple[int, ...] | None = None, where: Mapping[str, Iterable[Any]] | None = None) -> list[Cell]:
    """The grid's cells in a fixed order — seed, then precision, then the other axes in AXES order, each in
    the order the suite lists its values — without those `matrix.exclude` drops, then only those `where`
    keeps (axis name -> allowed values)."""
    axis_values = values(suite, seeds)
    named = varying(suite)
    others = [axis.name for axis in SETTING_AXES]
    kept: list[Cell] = []
    seen: set[Cell] = set()
    for seed, precision, *rest in itertools.product(
        axis_values["seed"], axis_values["precision"], *(axis_values[name] for name in others)
    ):
        values_here = tuple((name, value if BY_NAME[name].applies_to(precision) else None) for name, value in zip(others, rest, strict=True))
        cell = Cell(precision, seed, values_here, named)
        if cell in seen:  # the same cell again along an axis its precision has no value on
            continue
        seen.add(cell)
        point = cell.values()
        if any(matches(point, exclusion) for exclusion in suite.matrix.exclude):
            continue
        if where and not matches(point, {name: tuple(allowed) for name, allowed in where.items()}):
            continue
        kept.append(cell)
    return kept


def cell_from_values(suite: Any, point: Mapping[str, Any]) -> Cell:
    """The cell at `point` (axis name -> value; axes it lacks take the suite's setting), named as the suite
    names its cells; used to rebuild the cells a run.json recorded."""
    axis_values = values(suite)
    precision = str(point["precision"])
    others = tuple((axis.name, point.get(axis.name, axis_values[axis.name][0]) if axis.applies_to(precision) else None)
                   for axis in SETTING_AXES)
    return Cell(precision, int(point["seed"]), others, varying(suite))


def at(suite: Any, cell: Cell) -> Any:
    """The suite as `cell` runs it: each axis value written into the setting it overrides (lora.r,
    train.batch_size, ...), validated like the suite file's own values."""
    changes: dict[str, dict[str, Any]] = {}
    for name, value in cell.axes:
        if value is None:  # an axis the cell's precision has no value on: the suite's setting stands
            continue
        section, key = BY_NAME[name].setting
        changes.setdefault(section, {})[key] = value
    updated = {}
    for section, keys in changes.items():
        current = getattr(suite, section)
        if any(getattr(current, key) != value or type(getattr(current, key)) is not type(value) for key, value in keys.items()):
            updated[section] = type(current).model_validate({**current.model_dump(), **keys})
    return suite.model_copy(update=updated) if updated else suite
