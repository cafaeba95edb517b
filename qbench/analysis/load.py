"""Records on disk (run folders, or exported CSV / Parquet tables) -> one flat pandas DataFrame, one row per cell,
each column of the type the record model declares (qbench.contract.record): numbers as numbers (a missing one
NaN), booleans as True / False (None when missing), lists as lists, whatever the file was."""

from __future__ import annotations

import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import pandas as pd

from qbench.contract import record, renames
from qbench.contract.records import RECORDS_DIR, ResultsError, find_run_dirs, read_records, schema_problem
from qbench.contract.schema import SCHEMA_VERSION

# what must agree between records for their figures to be set side by side (seeds, shards) or compared
IDENTITY_COLUMNS = ("suite", "task", "model", "data.source", "eval.protocol")


def frame_of(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One DataFrame row per flat record, each column of its declared type (`typed`)."""
    return typed(pd.DataFrame(records))


def load_frame(run_dirs: list[Path | str]) -> pd.DataFrame:
    """One DataFrame row per cell record over one or more run directories (ResultsError: see `read_records`)."""
    return frame_of([record for run_dir in run_dirs for record in read_records(run_dir)])


TABLE_SUFFIXES = (".csv", ".parquet")


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as error:  # pandas raises many kinds; every one means the file is unusable
        raise ResultsError(f"{path}: cannot read as a results table ({type(error).__name__}: {error})") from None


def _kind(column: Any) -> str | None:
    """"number", "bool", "list" or "text": what the record model declares column `column` to hold (None:
    no record key, e.g. a column compare derives, or an open part of any type)."""
    info = record.key_info(str(column))
    if info is None:
        return None
    kinds = {t for t in (typing.get_args(info.kind) if isinstance(info.kind, types.UnionType) else (info.kind,))
             if t is not type(None)}
    if kinds and kinds <= {int, float}:
        return "number"
    if kinds == {bool}:
        return "bool"
    if any(typing.get_origin(t) is list for t in kinds):
        return "list"
    return "text" if kinds == {str} else None


def _as_bool(value: Any) -> Any:
    """True / False / None from what a table holds for a boolean (a bool, numpy's, or its text)."""
    if _missing(value):
        return None
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    text = str(value).strip().lower()
    return {"true": True, "false": False}.get(text, value)


def _as_list(value: Any) -> Any:
    """A list from what a table holds for one (a list, an array, or its JSON text); None when missing."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if hasattr(value, "tolist"):  # a numpy array, as Parquet gives lists back
        return value.tolist()
    return None if _missing(value) else value


def typed(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with each record column of the type the record model declares: numbers numeric (missing: NaN),
    booleans True / False / None, lists lists. A column holding text where a number belongs is left as it is
    (`_table_problem` names it)."""
    columns = {}
    for column in frame.columns:
        values, kind = frame[column], _kind(column)
        if kind == "number" and not pd.api.types.is_numeric_dtype(values.dtype):
            converted = pd.to_numeric(values.map(lambda v: None if isinstance(v, bool) else v), errors="coerce")
            if converted.notna().sum() == values.map(lambda v: not _missing(v)).sum():
                values = converted
        elif kind == "bool":
            values = values.map(_as_bool).astype(object)
        elif kind == "list":
            values = values.map(_as_list).astype(object)
        columns[column] = values
    return pd.DataFrame(columns, index=frame.index, columns=frame.columns)


def exportable(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` for a CSV or Parquet file: each list (or dict) as its JSON text, which `typed` reads back as it was."""
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].dtype == object and frame[column].map(lambda v: isinstance(v, list | dict | tuple)).any():
            frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, list | dict | tuple) else v)
    return frame


def _table_problem(table: Any) -> str | None:
    """Why a loaded table cannot be used: a column the record model declares numeric holding text."""
    for column in table.columns:
        if _kind(column) != "number" or (pd.api.types.is_numeric_dtype(table[column].dtype)
                                          and not pd.api.types.is_bool_dtype(table[column].dtype)):
            continue
        values = table[column].dropna()
        numbers = pd.to_numeric(values.map(lambda v: None if isinstance(v, bool) else v), errors="coerce")
        bad = values[numbers.isna()]
        if len(bad):
            return f"column {column}: {str(bad.iloc[0])[:40]!r} is not a number"
    return None


def _table_as_schema(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """An exported table as schema 3: a schema-2 table's columns renamed (contract.renames), with
    `converted_from_schema`; ResultsError for a table of any schema a reader cannot convert."""
    versions = {v for v in table.get("schema_version", pd.Series(dtype=object)).dropna()}
    if not versions:
        raise ResultsError(f"{path}: {schema_problem(None)}")
    for version in sorted(versions, key=str):
        problem = schema_problem(int(version) if isinstance(version, float) and version.is_integer() else version)
        if problem:
            raise ResultsError(f"{path}: {problem}")
    old = {int(v) for v in versions} - {SCHEMA_VERSION}
    if not old:
        return table
    if len(versions) > 1:
        raise ResultsError(f"{path}: holds records of schemas {', '.join(map(str, sorted(map(int, versions))))} in one table")
    version = old.pop()  # each row as its record converts (a forked cell's PSS moves to tree_pss, ...)
    rows = [renames.convert({k: v for k, v in row.items() if not _missing(v)}, version) for row in table.to_dict("records")]
    return pd.DataFrame(rows, index=table.index)


def identity_differences(frame: Any) -> list[str]:
    """What differs between records that should describe one experiment: suite, task, model, data, eval
    protocol, any `config.*` setting that is not a grid axis, or the kind of device (cpu / cuda). Empty when
    they agree. Grid axes (`config.lora.r`, ...) may differ: a report keeps each of their values apart as an arm."""
    from qbench.contract import grid

    problems = []
    config = sorted(c for c in frame.columns if str(c).startswith("config.") and c not in grid.RECORD_KEYS)
    columns = [c for c in IDENTITY_COLUMNS if c in frame.columns] + config
    for column in columns:
        values = sorted({_shown(v) for v in frame[column] if not _missing(v)})
        if len(values) > 1:
            problems.append(f"{column} differs: {', '.join(values[:4])}{' ...' if len(values) > 4 else ''}")
    if "env.device" in frame.columns:
        kinds = sorted({str(v).split(":")[0] for v in frame["env.device"] if not _missing(v)})
        if len(kinds) > 1:
            problems.append(f"measured on different devices: {', '.join(kinds)}")
    return problems


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _shown(value: Any) -> str:
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return str(bool(value)).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def load_results(paths: list[Path | str]) -> pd.DataFrame:
    """One flat DataFrame from run directories, folders of them, or exported CSV / Parquet tables.

    Several inputs (shards of one suite run on several machines, or several seeds' runs) are
    concatenated; every row keeps its `run_id`. ResultsError when a path holds no records, or a file among
    the records is not one (naming it), or a metric column holds text.
    """
    parts = []
    for path in map(Path, paths):
        if path.is_file() and path.suffix in TABLE_SUFFIXES:
            table = _read_table(path)
            if "precision" in table.columns and "status" in table.columns and not table.empty:
                table = _table_as_schema(table, path)
        elif path.is_dir():
            run_dirs = find_run_dirs(path)
            if not run_dirs:
                raise ResultsError(f"{path}: no run directory (a folder with {RECORDS_DIR}/*.json) at or under it")
            table = frame_of([record for run_dir in run_dirs for record in read_records(run_dir)])
        elif path.exists():
            raise ResultsError(f"{path}: not a run directory nor a {' / '.join(TABLE_SUFFIXES)} table")
        else:
            raise ResultsError(f"{path}: no such file or folder")
        missing = [c for c in ("precision", "status") if c not in table.columns]
        if table.empty or missing:
            raise ResultsError(f"{path}: holds no cell records" + (f" (no {', '.join(missing)} column)" if missing else ""))
        problem = _table_problem(table)
        if problem:
            raise ResultsError(f"{path}: {problem}")
        parts.append(typed(table))
    if not parts:
        raise ResultsError("no results given")
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
