"""The contract between the parent (runner) and one cell's child process, imported by both sides.

    parent --CellSpec as JSON on stdin--> python -m qbench.cell
    parent <--"QBENCH_EVENT {...}" lines on stdout-- (phase, step, done)
    the child writes cells/<cell>.json atomically, and only while its `attempt` is the cell's current one
    (records.write_record); the parent reads it back when the child ends
    the child dies with the parent: Linux's parent-death signal, a check of its parent's pid, and a closed
    stdout pipe all stop it (qbench.cell.pipeline)

Neither torch nor pandas is imported here: the parent must stay CUDA-free.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbench.contract.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from qbench.contract.grid import Cell
    from qbench.contract.suite import LoadedSuite

EVENT_PREFIX = "QBENCH_EVENT "
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding this qbench package


@dataclass(frozen=True)
class CellSpec:
    """Everything a cell process needs: the validated suite text, which cell, where, and its record file."""

    suite_text: str
    suite_path: str
    suite_sha256: str
    run_id: str
    cell_id: str
    precision: str
    seed: int
    device: str
    record_path: str
    executor: str = "local"  # what started the cell's process (`local`, `ray`), recorded as env.executor
    axes: dict[str, Any] = field(default_factory=dict)  # the cell's other axis values (qbench.contract.grid), by name
    attempt: str = ""  # the token of this attempt at the cell (records.claim_record); "" when the parent keeps the record
    parent_pid: int = 0  # the pid of the process that starts the cell as its child; 0: not checked
    # decided once per run by the runner, so that every cell of a run computes alike (None: the cell decides)
    compute: dict[str, Any] | None = None  # qbench.machine.compute.ComputeChoice's fields
    threads: int | None = None  # torch intra-op threads
    run_fields: dict[str, Any] = field(default_factory=dict)  # record fields the runner knows (threads' source, ...)
    # what the run's checks read of each data file ("data.train" -> sha256): the cell reads the same or stops
    data_files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CellSpec:
        """The spec a parent sent; ValueError when the text is not one."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a cell spec is a JSON object")
        return cls(**{**data, "seed": int(data["seed"])})

    def loaded_suite(self) -> LoadedSuite:
        from qbench.contract.suite import LoadedSuite, parse

        return LoadedSuite(parse(self.suite_text, self.suite_path), Path(self.suite_path), self.suite_sha256, self.suite_text)

    def cell(self, loaded: LoadedSuite) -> Cell:
        """The grid cell this spec runs (axes it does not name take the suite's setting)."""
        from qbench.contract import grid

        return grid.cell_from_values(loaded.suite, {**self.axes, "precision": self.precision, "seed": self.seed})


def identity_fields(loaded: LoadedSuite, run_id: str, cell: Cell, cell_id: str | None = None) -> dict[str, Any]:
    """The keys that say which cell a record is (`schema.IDENTITY_KEYS`, and every axis value of the
    grid under its `config.*` key), the same in a finished record and in the one the parent writes for
    a cell whose process died. `cell_id`: the id the parent gave the cell, if not the cell's own."""
    suite = loaded.suite
    return {
        "schema_version": SCHEMA_VERSION,
        "suite": suite.name,
        "suite_sha256": loaded.sha256,
        "run_id": run_id,
        "cell_id": cell_id or cell.id,
        "task": suite.task,
        "model": suite.model.id,
        "precision": cell.precision,
        "baseline_precision": suite.baseline,
        "seed": cell.seed,
        "config.safetensors_only": suite.model.safetensors_only,
        "config.trust_remote_code": suite.model.trust_remote_code,
        **cell.record_fields(),
    }


def event_line(event: str, **fields: Any) -> str:
    """One progress line as a cell prints it."""
    return EVENT_PREFIX + json.dumps({"event": event, **fields})


def parse_event(line: str) -> dict[str, Any] | None:
    """The progress event on a line of a cell's output, or None for any other line."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        event = json.loads(line[len(EVENT_PREFIX):])
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a qbench child process (cell, sampler, probe): this one's, unbuffered output,
    GPUs in PCI bus order (as NVML numbers them), and this qbench first on the path, whatever the working
    directory or the installed copy."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env
