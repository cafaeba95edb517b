"""Resuming a run directory: the suite and cells its run.json recorded, and which cells still need running."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qbench.contract import grid, precisions
from qbench.contract import record as record_model
from qbench.contract import records as results
from qbench.contract.files import component_problem
from qbench.contract.fingerprint import DataFingerprint
from qbench.contract.suite import Cell, LoadedSuite, SuiteError, parse

MANIFEST = "run.json"
REQUIRED_KEYS = ("suite_path", "suite_sha256", "suite_text", "device", "cells")


@dataclass(frozen=True)
class Resumable:
    """A run directory ready to resume: its recorded suite and device, every cell, and those still to run."""

    run_dir: Path
    manifest: dict[str, Any]
    loaded: LoadedSuite
    device: str
    cells: list[Cell]
    pending: list[Cell]
    suite_file_changed: bool


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _recorded_cells(manifest_path: Path, entries: Any, loaded: LoadedSuite) -> list[Cell]:
    """The cells run.json lists, rebuilt on the recorded suite's grid; each must get the id it was recorded with."""
    try:
        if not isinstance(entries, list) or not entries:
            raise TypeError
        points = [({**dict(entry.get("axes") or {}), "precision": str(entry["precision"]), "seed": int(entry["seed"])},
                   entry.get("cell_id")) for entry in entries]
    except (TypeError, KeyError, ValueError, AttributeError, OverflowError):
        raise SuiteError(manifest_path, ["cells: not a list of {precision, seed, axes} entries"]) from None
    if any(not 0 <= point["seed"] < 2**32 for point, _ in points):
        raise SuiteError(manifest_path, ["cells: a seed outside 0 to 2**32-1"])
    unknown = sorted({point["precision"] for point, _ in points if point["precision"] not in precisions.REGISTRY})
    if unknown:
        raise SuiteError(manifest_path, [f"cells: unknown precision(s) {', '.join(unknown)}"])
    cells = []
    for point, recorded_id in points:
        strange = sorted(set(point) - set(grid.BY_NAME))
        if strange:
            raise SuiteError(manifest_path, [f"cells: {recorded_id}: unknown axis {', '.join(strange)}"])
        cell = grid.cell_from_values(loaded.suite, point)
        if recorded_id is not None and cell.id != recorded_id:
            raise SuiteError(manifest_path, [f"cells: {recorded_id} is not the id of its axis values ({cell.id}) in the recorded suite"])
        problem = component_problem(cell.id)
        if problem:
            raise SuiteError(manifest_path, [f"cells: {str(cell.id)[:60]!r} cannot name a record file ({problem})"])
        cells.append(cell)
    if len({cell.id for cell in cells}) != len(cells):
        raise SuiteError(manifest_path, ["cells: a cell is listed twice"])
    return cells


def _foreign_records(run_dir: Path, loaded: LoadedSuite, cells: list[Cell]) -> list[str]:
    """The run's record files that hold another cell's or another suite's record: resuming would replace
    them, and they are not this run's to replace."""
    problems = []
    for cell in cells:
        path = results.record_path(run_dir, cell.id)
        record = results.read_record(path)
        if record is None:
            continue  # missing or torn: not a record at all, the cell runs again
        ours = {"cell_id": cell.id, "suite": loaded.suite.name, "suite_sha256": loaded.sha256}
        differs = [key for key, value in ours.items() if key in record and record[key] != value]
        if differs:
            problems.append(
                f"{path}: holds a record of another {' and '.join(k.removesuffix('_sha256') for k in differs)} "
                f"({', '.join(f'{k} {str(record[k])[:64]!r}' for k in differs)}); move it out of this run folder"
            )
    return problems


# what a run writes in its folder: none of it may be a link (a write would land wherever it points)
RUN_PARTS = ("run.json", ".lock", results.RECORDS_DIR, "logs", "slurm", "report", "results.csv", "summary.md")
DIRECTORIES = (results.RECORDS_DIR, "logs", "slurm", "report")
CELL_FILES = ((results.RECORDS_DIR, "{}.json"), (results.RECORDS_DIR, ".{}" + results.ATTEMPT_SUFFIX), ("logs", "{}.log"))
MAX_PARALLEL = 4096  # cells side by side on one machine: more is no machine's


def _link_problem(path: Path, run_dir: Path) -> str | None:
    if not path.is_symlink():
        return None
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return (f"{path} is a symbolic link{target}; qbench writes only inside the run folder {run_dir} and does not write "
            "through links: put the real folder or file there (or start a new run)")


def run_folder_problems(run_dir: Path, cell_ids: list[str]) -> list[str]:
    """What stops a resumption from writing only inside `run_dir`: a part it writes (cells/, logs/, run.json, a
    cell's record, attempt token or log, ...) that is a symbolic link, or a folder of it that is a file."""
    problems = [problem for name in RUN_PARTS if (problem := _link_problem(run_dir / name, run_dir))]
    problems += [f"{run_dir / name} is not a folder (a run folder's {name}/ holds the run's files)" for name in DIRECTORIES
                 if (run_dir / name).exists() and not (run_dir / name).is_symlink() and not (run_dir / name).is_dir()]
    if problems:
        return problems
    for cell_id in cell_ids:
        problems += [problem for folder, pattern in CELL_FILES
                     if (problem := _link_problem(run_dir / folder / pattern.format(cell_id), run_dir))]
    forkserver_log = _link_problem(run_dir / "logs" / "forkserver.log", run_dir)
    return problems + ([forkserver_log] if forkserver_log else [])


def _whole_number(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def recorded_settings_problems(manifest: dict[str, Any]) -> list[str]:
    """The settings a resumption takes from run.json (how many cells side by side, threads, compute dtype, how
    cells start), each checked: a value edited by hand is named as run.json's, not as an option's."""
    from qbench.machine.compute import ComputeChoice

    problems = []
    if manifest.get("parallel") is not None and not _whole_number(manifest["parallel"], 1, MAX_PARALLEL):
        problems.append(f"parallel: {str(manifest['parallel'])[:40]!r} is not a number of cells from 1 to {MAX_PARALLEL}")
    if manifest.get("threads_per_cell") is not None and not _whole_number(manifest["threads_per_cell"], 1, MAX_PARALLEL):
        problems.append(f"threads_per_cell: {str(manifest['threads_per_cell'])[:40]!r} is not a number of threads from 1 to {MAX_PARALLEL}")
    for key in ("threads_source", "cell_launcher", "executor"):
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            problems.append(f"{key}: {str(manifest[key])[:40]!r} is not a text")
    if manifest.get("data") is not None and DataFingerprint.from_manifest(manifest["data"]) is None:
        problems.append(f"data: {str(manifest['data'])[:60]!r} is not the data fingerprint a run records")
    compute = manifest.get("compute")
    if compute is not None:
        try:
            if not isinstance(compute, dict) or not isinstance(compute.get("emulated", []), list):
                raise TypeError
            choice = ComputeChoice(**{**compute, "emulated": tuple(compute.get("emulated", ()))})
            if not all(isinstance(getattr(choice, key), str) for key in ("setting", "dtype", "reason", "device")):
                raise TypeError
        except (TypeError, ValueError):
            problems.append(f"compute: {str(compute)[:60]!r} is not the compute dtype a run records")
    return [f"{problem} (run.json was edited?)" for problem in problems]


def open_run(run_dir: Path | str, force: bool = False) -> Resumable:
    """Read RUN_DIR/run.json; SuiteError when it is missing or broken, when the suite file changed since
    the run started (unless `force`), or when a cell's record file holds a record of another cell or
    suite. The cells always run with the suite text run.json recorded, so every record of one run
    directory comes from one suite."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    link = _link_problem(manifest_path, run_dir)
    if link:
        raise SuiteError(run_dir, [link])
    manifest = results.read_record(manifest_path)
    if manifest is None:
        raise SuiteError(run_dir, [f"not a qbench run directory: no readable {MANIFEST}"])
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise SuiteError(manifest_path, [f"{key}: missing (not written by qbench run?)" for key in missing])
    wrong = [key for key in ("suite_path", "suite_sha256", "suite_text", "device") if not isinstance(manifest[key], str)]
    if wrong:
        raise SuiteError(manifest_path, [f"{key}: not a string (run.json was edited?)" for key in wrong])
    if not re.fullmatch(r"cpu|cuda(:\d+)?", manifest["device"]):
        raise SuiteError(manifest_path, [f"device: {manifest['device'][:40]!r} is not cpu or cuda (run.json was edited?)"])
    problem = record_model.manifest_problem(manifest)
    if problem:
        raise SuiteError(manifest_path, [f"{problem} (run.json was edited?)"])
    suite_path, recorded_sha = Path(manifest["suite_path"]), manifest["suite_sha256"]
    suite_text = manifest["suite_text"]
    if _sha256(suite_text) != recorded_sha:
        raise SuiteError(manifest_path, ["suite_text: does not match suite_sha256 (run.json was edited?)"])
    try:
        now_sha: str | None = hashlib.sha256(suite_path.read_bytes()).hexdigest()
    except (OSError, ValueError):  # ValueError: a path with a NUL byte
        now_sha = None
    if now_sha != recorded_sha and not force:
        what = "no longer exists" if now_sha is None else "has changed"
        raise SuiteError(manifest_path, [
            f"the suite file {suite_path} {what} since this run started; resuming runs the missing cells with the "
            "suite recorded in run.json, not with the file as it is now. Start a new run to use the file, or pass "
            "--force to resume with the recorded suite"
        ])
    settings = recorded_settings_problems(manifest)
    if settings:
        raise SuiteError(manifest_path, settings)
    loaded = LoadedSuite(parse(suite_text, suite_path), suite_path, recorded_sha, suite_text)
    cells = _recorded_cells(manifest_path, manifest["cells"], loaded)
    links = run_folder_problems(run_dir, [cell.id for cell in cells])
    if links:
        raise SuiteError(run_dir, links)
    foreign = _foreign_records(run_dir, loaded, cells)
    if foreign:
        raise SuiteError(run_dir, foreign)
    from qbench.runner.runner import pending_cells

    return Resumable(
        run_dir, manifest, loaded, str(manifest["device"]), cells, pending_cells(run_dir, cells), now_sha != recorded_sha
    )


def data_changes(state: Resumable, now: DataFingerprint | None) -> list[str]:
    """What differs between the data run.json's fingerprint describes and the data as the checks read it now,
    one line per file ([] when the same, or when either is not known: a run from before fingerprints)."""
    recorded = DataFingerprint.from_manifest(state.manifest.get("data"))
    if recorded is None or now is None:
        return []
    data = state.loaded.suite.data
    where = {f"data.{key}": str(state.loaded.resolve(value)) for key in ("train", "eval", "image_root")
             if isinstance(value := getattr(data, key, None), str)}
    return recorded.changes(now, where)


def data_changed_line(changes: list[str]) -> str:
    shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
    return (f"the data changed since this run started ({shown}): resuming would measure the missing cells on other "
            "data than the finished ones. Start a new run, or pass --force to resume on the data as it is now (its "
            "records say so, and reports do not compare them with the others)")


def note_resume(state: Resumable, forced: bool, executor: str = "local", data_changed: list[str] | None = None) -> None:
    """Add this resumption (when, which cells, whether forced, what ran them, what data changed) to run.json
    (atomically; OutputError when the run folder cannot be written, before any cell starts)."""
    manifest = dict(state.manifest)
    earlier = manifest.get("resumes")
    manifest["resumes"] = [*(earlier if isinstance(earlier, list) else []), {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "cells": [c.id for c in state.pending],
        "forced": forced,
        "suite_file_changed": state.suite_file_changed,
        "data_changed": list(data_changed or []),
        "executor": executor,
    }]
    results.write_manifest(state.run_dir, manifest)
