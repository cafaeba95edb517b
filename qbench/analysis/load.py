"""Records on disk (run folders, or exported CSV / Parquet tables) -> one flat pandas DataFrame, one row per cell."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from qbench.contract import fields
from qbench.contract.records import RECORDS_DIR, ResultsError, find_run_dirs, read_records

# what must agree between records for their figures to be set side by side (seeds, shards) or compared
IDENTITY_COLUMNS = ("suite", "task", "model", "data.source", "eval.protocol")

def load_frame(run_dirs: list[Path | str]) -> pd.DataFrame:
    """One DataFrame row per cell record over one or more run directories (ResultsError: see `read_records`)."""
    rows = [record for run_dir in run_dirs for record in read_records(run_dir)]
    return pd.DataFrame(rows)


TABLE_SUFFIXES = (".csv", ".parquet")


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as error:  # pandas raises many kinds; every one means the file is unusable
        raise ResultsError(f"{path}: cannot read as a results table ({type(error).__name__}: {error})") from None


def _table_problem(table: Any) -> str | None:
    """Why a loaded table cannot be used: a registry metric column holding text."""
    for column in table.columns:
        dtype = table[column].dtype
        if fields.spec_for(str(column)) is None or (pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)):
            continue
        values = table[column].dropna()
        numbers = pd.to_numeric(values.map(lambda v: None if isinstance(v, bool) else v), errors="coerce")
        bad = values[numbers.isna()]
        if len(bad):
            return f"column {column}: {str(bad.iloc[0])[:40]!r} is not a number"
    return None


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
        elif path.is_dir():
            run_dirs = find_run_dirs(path)
            if not run_dirs:
                raise ResultsError(f"{path}: no run directory (a folder with {RECORDS_DIR}/*.json) at or under it")
            table = pd.DataFrame([record for run_dir in run_dirs for record in read_records(run_dir)])
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
        parts.append(table)
    if not parts:
        raise ResultsError("no results given")
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
