"""Cell records and run.json on disk: who may write a record (attempts), writing both through their models
(qbench.contract.record), reading them strictly (a schema-2 record converted, any other schema refused); the
DataFrame over them is qbench.analysis.load's.

A record file is the flat record (one dotted key per value, as a DataFrame row has them), validated by the
record model on every write: the key names the concept in code, records, reports and documents alike, and a
file can be read and grepped by it."""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qbench.contract import record as model
from qbench.contract import renames
from qbench.contract.files import OutputError, component_problem, write_json_atomic
from qbench.contract.schema import CONVERTIBLE, SCHEMA_VERSION, STATUSES

# what names a cell, its run and its arm: one value each (a report groups and orders records by them)

__all__ = ["write_json_atomic", "OutputError"]  # write_json_atomic lives in results.files; kept importable here

RECORDS_DIR = "cells"
MANIFEST = "run.json"
ATTEMPT_SUFFIX = ".attempt"


class ResultsError(ValueError):
    """A path given as results that holds no records qbench can read, or files that are not its records."""


def record_path(run_dir: Path | str, cell_id: str) -> Path:
    """`RUN_DIR/cells/<cell_id>.json`; ValueError when the cell id cannot be a file name there."""
    problem = component_problem(cell_id)
    if problem:
        raise ValueError(f"cell id {cell_id!r} cannot name a record file ({problem})")
    return Path(run_dir) / RECORDS_DIR / f"{cell_id}.json"


ADAPTERS_DIR = "adapters"


def adapter_path(run_dir: Path | str, cell_id: str) -> Path:
    """`RUN_DIR/adapters/<cell_id>`: where a suite with `output.keep_adapters` keeps a cell's trained adapter."""
    record_path(run_dir, cell_id)  # the same rule for the name
    return Path(run_dir) / ADAPTERS_DIR / cell_id


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


UNDECLARED = "RecordInvalid"  # error_type of a record that held keys or values the record model refuses


def checked(record: dict[str, Any]) -> dict[str, Any]:
    """`record` as the record model reads it back, key for key; a record the model refuses (a key nobody
    declared, a value of the wrong type: a bug of qbench's) becomes a failed record with the error naming each
    offending key, without them, so that nothing undeclared is written and nothing declared is lost."""
    try:
        return model.normalised(record)
    except model.RecordInvalid as invalid:
        refused = set(invalid.keys)
        kept = {key: value for key, value in record.items() if key not in refused}
        kept.update({
            "status": "failed",
            "error": f"{UNDECLARED}: the record model (qbench.contract.record) refuses {invalid}",
            "error_type": UNDECLARED,
            "error_phase": record.get("error_phase") or record.get("last_phase"),
        })
        return model.normalised(kept)


def write_record(record_file: Path | str, record: dict[str, Any], attempt: str | None) -> dict[str, Any]:
    """Write a cell's record atomically, as the record model reads it (`checked`), but only while `attempt` is
    the cell's current attempt (Superseded otherwise, and nothing is written). Without an attempt (a cell run
    on its own) it just writes. Returns what was written."""
    record_file = Path(record_file)
    written = checked(record)
    if not attempt:
        write_json_atomic(record_file, written)
        return written
    with _attempt_locked(record_file, create=False) as fd:
        current = os.pread(fd, 256, 0).decode("ascii", "replace").strip()
        if current != attempt:
            raise Superseded(f"a newer attempt at this cell owns {record_file} now; this one's record is dropped")
        write_json_atomic(record_file, written)
    return written


# --- reading ------------------------------------------------------------------------------------------------


def read_record(path: Path | str) -> dict[str, Any] | None:
    """One JSON object file as it is on disk (a record the runner merges its figures into), or None when it is
    missing or not a readable JSON object. Analysis reads records with `read_records` (validated, converted)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def schema_problem(version: Any) -> str | None:
    """Why a record of schema `version` cannot be read (the one line compare and report print), or None."""
    if version == SCHEMA_VERSION or version in CONVERTIBLE:
        return None
    readable = ", ".join(map(str, CONVERTIBLE))
    return (f"a record of schema {version!r}, but this qbench writes schema {SCHEMA_VERSION} and converts only schema "
            f"{readable}: its keys may mean other things, so it is not compared; refresh the baseline (qbench baseline "
            "refresh SUITE) or remake the run with this qbench")


def as_schema(record: dict[str, Any]) -> dict[str, Any]:
    """A flat record of a readable schema as schema 3 (a schema-2 record's keys renamed: contract.renames);
    ValueError (schema_problem) for any other schema."""
    version = record.get("schema_version")
    problem = schema_problem(version)
    if problem:
        raise ValueError(problem)
    return renames.convert(record, version) if version != SCHEMA_VERSION else record


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
    try:
        model.validate(as_schema(record))
    except ValueError as error:  # RecordInvalid is one
        return str(error)
    return None


def loaded(record: dict[str, Any]) -> dict[str, Any]:
    """A record `record_problem` accepts, as the schema-3 flat record (converted where it was older)."""
    return model.normalised(as_schema(record))


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
        records.append(loaded(record))
    return records


def run_records(run_dir: Path | str, cell_ids: list[str]) -> list[dict[str, Any]]:
    """The readable records of these cells of a run (what the run itself wrote), in the order given; other
    files in `cells/` are not looked at."""
    found = []
    for cell_id in cell_ids:
        record = read_record(record_path(run_dir, cell_id))
        if record is not None and record_problem(record, cell_id) is None:
            found.append(loaded(record))
    return found


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
    """The run's `run.json` (suite text, device, cells) as the run-manifest model reads it (qbench.contract.record.
    RunManifest), or None when the folder has no readable one or it is not a run.json qbench writes."""
    manifest = read_record(Path(run_dir) / MANIFEST)
    if manifest is None or model.manifest_problem(manifest) is not None:
        return None
    return model.RunManifest.model_validate(manifest).model_dump(exclude_unset=True, by_alias=True)


def write_manifest(run_dir: Path | str, manifest: dict[str, Any]) -> None:
    """Write `run.json` atomically through the run-manifest model (ValueError naming the field it refuses)."""
    problem = model.manifest_problem(manifest)
    if problem:
        raise ValueError(f"{Path(run_dir) / MANIFEST}: {problem}")
    checked_manifest = model.RunManifest.model_validate(manifest).model_dump(exclude_unset=True, by_alias=True)
    write_json_atomic(Path(run_dir) / MANIFEST, checked_manifest)


