"""Cell records on disk: who may write one (attempts), reading them strictly, and loading them into one
flat pandas DataFrame; run.json read back."""

from __future__ import annotations

import fcntl
import json
import math
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbench.results import fields
from qbench.results.files import OutputError, component_problem, write_json_atomic
from qbench.results.schema import STATUSES

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["write_json_atomic", "OutputError"]  # write_json_atomic lives in results.files; kept importable here

RECORDS_DIR = "cells"
MANIFEST = "run.json"
ATTEMPT_SUFFIX = ".attempt"
# what must agree between records for their figures to be set side by side (seeds, shards) or compared
IDENTITY_COLUMNS = ("suite", "task", "model", "data.source", "eval.protocol")


class ResultsError(ValueError):
    """A path given as results that holds no records qbench can read, or files that are not its records."""


def record_path(run_dir: Path | str, cell_id: str) -> Path:
    """`RUN_DIR/cells/<cell_id>.json`; ValueError when the cell id cannot be a file name there."""
    problem = component_problem(cell_id)
    if problem:
        raise ValueError(f"cell id {cell_id!r} cannot name a record file ({problem})")
    return Path(run_dir) / RECORDS_DIR / f"{cell_id}.json"


# --- attempts: which process may write a cell's record ------------------------------------------------------
#
# Each time the runner starts a cell it draws a fresh token and stores it in `cells/.<cell>.attempt`; the
# cell process gets the token in its spec and writes its record only while that file still holds it (checked
# and written under one lock). A cell process left over from a killed run therefore cannot write over the
# record of the attempt that replaced it.


class Superseded(RuntimeError):
    """A newer attempt at this cell owns its record; this process must not write it."""


def attempt_path(record_file: Path | str) -> Path:
    record_file = Path(record_file)
    return record_file.with_name(f".{record_file.stem}{ATTEMPT_SUFFIX}")


@contextmanager
def _attempt_locked(record_file: Path, create: bool) -> Iterator[int]:
    path = attempt_path(record_file)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        raise Superseded(f"{path} is gone: this attempt no longer owns {record_file.name}") from None
    except OSError as error:
        raise OutputError.from_os_error(path, error) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def claim_record(record_file: Path | str) -> str:
    """Start a new attempt at the cell whose record is `record_file`: returns the token that alone may write
    it from now on (earlier attempts' writes are refused). OutputError when the folder cannot be written."""
    record_file = Path(record_file)
    try:
        record_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError.from_os_error(record_file.parent, error) from None
    token = uuid.uuid4().hex
    with _attempt_locked(record_file, create=True) as fd:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, token.encode("ascii"), 0)
        except OSError as error:
            raise OutputError.from_os_error(attempt_path(record_file), error) from None
    return token


def current_attempt(record_file: Path | str) -> str | None:
    try:
        return attempt_path(record_file).read_text(encoding="ascii").strip() or None
    except (OSError, ValueError):
        return None


def write_record(record_file: Path | str, record: dict[str, Any], attempt: str | None) -> None:
    """Write a cell's record atomically, but only while `attempt` is the cell's current attempt (Superseded
    otherwise, and nothing is written). Without an attempt (a cell run on its own) it just writes."""
    record_file = Path(record_file)
    if not attempt:
        write_json_atomic(record_file, record)
        return
    with _attempt_locked(record_file, create=False) as fd:
        current = os.pread(fd, 256, 0).decode("ascii", "replace").strip()
        if current != attempt:
            raise Superseded(f"a newer attempt at this cell owns {record_file} now; this one's record is dropped")
        write_json_atomic(record_file, record)


# --- reading ------------------------------------------------------------------------------------------------


def read_record(path: Path | str) -> dict[str, Any] | None:
    """One JSON object file (a record, run.json), or None when it is missing or not a readable JSON object."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def record_problem(record: Any, cell_id: str | None = None) -> str | None:
    """Why `record` is not a cell record qbench wrote (for cell `cell_id`, when given), or None."""
    if not isinstance(record, dict):
        return f"not a cell record (a JSON {type(record).__name__}, not an object)"
    for key in ("cell_id", "precision", "status"):
        if not isinstance(record.get(key), str) or not record.get(key):
            return f"not a cell record (no {key})"
    if record["status"] not in STATUSES:
        return f"not a cell record (status {record['status']!r} is none of {', '.join(STATUSES)})"
    if cell_id is not None and record["cell_id"] != cell_id:
        return f"holds the record of cell {record['cell_id']!r}, not of {cell_id!r}"
    for key, value in record.items():
        if fields.spec_for(key) is not None and not _is_number(value):
            return f"{key}: {str(value)[:40]!r} is not a number"
    return None


def read_records(run_dir: Path | str) -> list[dict[str, Any]]:
    """All cell records of a run directory, in cell-id order; ResultsError naming the first file in
    `cells/` that is not a readable record of the cell its name says."""
    folder = Path(run_dir) / RECORDS_DIR
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ResultsError(f"{path}: cannot be read ({error.strerror or error})") from None
        except (ValueError, RecursionError) as error:
            raise ResultsError(f"{path}: not a cell record (not JSON: {str(error)[:80]})") from None
        problem = record_problem(record, path.stem)
        if problem:
            raise ResultsError(f"{path}: {problem}")
        records.append(record)
    return records


def run_records(run_dir: Path | str, cell_ids: list[str]) -> list[dict[str, Any]]:
    """The readable records of these cells of a run (what the run itself wrote), in the order given; other
    files in `cells/` are not looked at."""
    found = []
    for cell_id in cell_ids:
        record = read_record(record_path(run_dir, cell_id))
        if record is not None and record_problem(record, cell_id) is None:
            found.append(record)
    return found


def load_frame(run_dirs: list[Path | str]) -> pd.DataFrame:
    """One DataFrame row per cell record over one or more run directories (ResultsError: see `read_records`)."""
    import pandas as pd

    rows = [record for run_dir in run_dirs for record in read_records(run_dir)]
    return pd.DataFrame(rows)


TABLE_SUFFIXES = (".csv", ".parquet")


def find_run_dirs(path: Path | str) -> list[Path]:
    """Run directories at or under `path`: a folder with `cells/*.json`, or folders holding such folders."""
    path = Path(path)
    if (path / RECORDS_DIR).is_dir():
        return [path]
    try:
        return sorted(cells.parent for cells in path.rglob(RECORDS_DIR) if cells.is_dir() and any(cells.glob("*.json")))
    except OSError as error:
        raise ResultsError(f"{error.filename or path}: cannot be read ({error.strerror or error})") from None


def read_manifest(run_dir: Path | str) -> dict[str, Any] | None:
    """The run's `run.json` (suite text, device, cells), or None when the folder has no readable one."""
    return read_record(Path(run_dir) / MANIFEST)


def _read_table(path: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as error:  # pandas raises many kinds; every one means the file is unusable
        raise ResultsError(f"{path}: cannot read as a results table ({type(error).__name__}: {error})") from None


def _table_problem(table: Any) -> str | None:
    """Why a loaded table cannot be used: a registry metric column holding text."""
    import pandas as pd

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
    from qbench.suite import grid

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
    import pandas as pd

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
