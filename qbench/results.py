"""The record schema, atomic record files, and loading records into one flat pandas DataFrame."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "unsupported", "skipped", "interrupted")
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


def load_frame(run_dirs: list[Path | str]) -> Any:
    """One DataFrame row per cell record over one or more run directories."""
    import pandas as pd

    rows = [record for run_dir in run_dirs for record in read_records(run_dir)]
    return pd.DataFrame(rows)
