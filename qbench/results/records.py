"""The record schema, atomic record files, and loading records into one flat pandas DataFrame."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

RECORDS_DIR = "cells"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so a reader sees the old file or the whole new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def record_path(run_dir: Path, cell_id: str) -> Path:
    return Path(run_dir) / RECORDS_DIR / f"{cell_id}.json"


def read_record(path: Path | str) -> dict[str, Any] | None:
    """One record file, or None when it is missing or not a readable JSON object."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_records(run_dir: Path | str) -> list[dict[str, Any]]:
    """All cell records of a run directory, in cell-id order."""
    folder = Path(run_dir) / RECORDS_DIR
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def load_frame(run_dirs: list[Path | str]) -> pd.DataFrame:
    """One DataFrame row per cell record over one or more run directories."""
    import pandas as pd

    rows = [record for run_dir in run_dirs for record in read_records(run_dir)]
    return pd.DataFrame(rows)


class ResultsError(ValueError):
    """A path given as results that holds no records qbench can read."""


TABLE_SUFFIXES = (".csv", ".parquet")


def find_run_dirs(path: Path | str) -> list[Path]:
    """Run directories at or under `path`: a folder with `cells/*.json`, or folders holding such folders."""
    path = Path(path)
    if (path / RECORDS_DIR).is_dir():
        return [path]
    return sorted(cells.parent for cells in path.rglob(RECORDS_DIR) if cells.is_dir() and any(cells.glob("*.json")))


def read_manifest(run_dir: Path | str) -> dict[str, Any] | None:
    """The run's `run.json` (suite text, device, cells), or None when the folder has none."""
    path = Path(run_dir) / "run.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _read_table(path: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as error:  # pandas raises many kinds; every one means the file is unusable
        raise ResultsError(f"{path}: cannot read as a results table ({type(error).__name__}: {error})") from None


def load_results(paths: list[Path | str]) -> pd.DataFrame:
    """One flat DataFrame from run directories, folders of them, or exported CSV / Parquet tables.

    Several inputs (shards of one suite run on several machines, or several seeds' runs) are
    concatenated; every row keeps its `run_id`. ResultsError when a path holds no records.
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
            try:
                table = pd.DataFrame([record for run_dir in run_dirs for record in read_records(run_dir)])
            except (OSError, json.JSONDecodeError) as error:
                raise ResultsError(f"{path}: a record cannot be read ({error})") from None
        elif path.exists():
            raise ResultsError(f"{path}: not a run directory nor a {' / '.join(TABLE_SUFFIXES)} table")
        else:
            raise ResultsError(f"{path}: no such file or folder")
        missing = [c for c in ("precision", "status") if c not in table.columns]
        if table.empty or missing:
            raise ResultsError(f"{path}: holds no cell records" + (f" (no {', '.join(missing)} column)" if missing else ""))
        parts.append(table)
    if not parts:
        raise ResultsError("no results given")
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
