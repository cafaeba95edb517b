"""Runs each cell of a suite in its own process and keeps every record it writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from qbench import __version__, results, scheduler
from qbench.cell import EVENT_PREFIX
from qbench.scheduler import LOCAL_SLOT, Slot
from qbench.suite import Cell, LoadedSuite

CHILD_STOP_GRACE_S = 60
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
CELL_COMMAND = (sys.executable, "-m", "qbench.cell")  # reads the cell's spec on stdin, writes its record


class Listener(Protocol):
    """What the runner tells its caller (the CLI renders it; the library never prints)."""

    def cell_started(self, cell: Cell, index: int, total: int) -> None: ...
    def cell_event(self, cell: Cell, event: dict[str, Any]) -> None: ...
    def cell_finished(self, cell: Cell, record: dict[str, Any]) -> None: ...


class QuietListener:
    def cell_started(self, cell: Cell, index: int, total: int) -> None:
        pass

    def cell_event(self, cell: Cell, event: dict[str, Any]) -> None:
        pass

    def cell_finished(self, cell: Cell, record: dict[str, Any]) -> None:
        pass


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by Ctrl-C or SIGTERM; finished records are intact."""


def resolve_device(requested: str) -> str:
    """`auto` becomes cuda when torch sees a GPU (asked in a child, so this process stays CUDA-free)."""
    if requested != "auto":
        return requested
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True, text=True, timeout=120,
    )
    return "cuda" if probe.stdout.strip() == "True" else "cpu"


def new_run_dir(out: Path, suite_name: str, label: str = "") -> Path:
    """A fresh `out/<suite>/<UTC time>[-label]` folder name (`label` e.g. `shard1of2`)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + (f"-{label}" if label else "")
    candidate = out / suite_name / stamp
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = out / suite_name / f"{stamp}-{suffix}"
    return candidate


@dataclass
class Run:
    """One run of a suite's cells into one run directory."""

    loaded: LoadedSuite
    run_dir: Path
    device: str
    cells: list[Cell]
    listener: Listener = QuietListener()
    env: dict[str, str] | None = None  # extra environment for the cell processes
    slots: list[Slot] = field(default_factory=lambda: [LOCAL_SLOT])  # one cell process per slot at a time
    cell_command: tuple[str, ...] = field(default_factory=lambda: CELL_COMMAND)
    _running: set[subprocess.Popen] = field(default_factory=set, init=False, repr=False)
    _running_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.listener = scheduler.serialized(self.listener)  # cells report from one thread per slot

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def write_manifest(self, extra: dict[str, Any] | None = None) -> None:
        manifest = {
            "qbench_version": __version__,
            "suite": self.loaded.suite.name,
            "suite_path": str(self.loaded.path),
            "suite_sha256": self.loaded.sha256,
            "suite_text": self.loaded.path.read_text(encoding="utf-8"),
            "device": self.device,
            "cells": [{"cell_id": c.id, "precision": c.precision, "seed": c.seed} for c in self.cells],
            "slots": [{"name": s.name, **s.env} for s in self.slots],
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **(extra or {}),
        }
        results.write_json_atomic(self.run_dir / "run.json", manifest)

    def _spec(self, cell: Cell) -> dict[str, Any]:
        return {
            "suite_text": self.loaded.path.read_text(encoding="utf-8"),
            "suite_path": str(self.loaded.path),
            "suite_sha256": self.loaded.sha256,
            "run_id": self.run_id,
            "cell_id": cell.id,
            "precision": cell.precision,
            "seed": cell.seed,
            "device": self.device,
            "record_path": str(results.record_path(self.run_dir, cell.id)),
        }

    def _crash_record(self, cell: Cell, returncode: int, last_phase: str | None, slot: Slot) -> dict[str, Any]:
        if returncode < 0:
            how = f"killed by signal {signal.Signals(-returncode).name}"
        else:
            how = f"exited with code {returncode} without writing its record"
        return {
            "schema_version": results.SCHEMA_VERSION,
            "suite": self.loaded.suite.name,
            "suite_sha256": self.loaded.sha256,
            "run_id": self.run_id,
            "cell_id": cell.id,
            "task": self.loaded.suite.task,
            "model": self.loaded.suite.model.id,
            "precision": cell.precision,
            "baseline_precision": self.loaded.suite.baseline,
            "seed": cell.seed,
            "status": "failed",
            "error": f"cell process {how} (last phase: {last_phase or 'start'}); see logs/{cell.id}.log",
            "error_type": "ChildProcessDied",
            "env.cuda_visible_devices": slot.env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES")),
        }

    def run_cell(self, cell: Cell, slot: Slot = LOCAL_SLOT) -> dict[str, Any]:
        """Run one cell in a fresh process in `slot`; always returns (and leaves on disk) its record."""
        log_path = self.run_dir / "logs" / f"{cell.id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        record_file = results.record_path(self.run_dir, cell.id)
        record_file.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", **(self.env or {}), **slot.env}
        # the cell must run the same qbench as this process, whatever the working directory
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
        last_phase = None
        with open(log_path, "w", encoding="utf-8") as log:
            child = subprocess.Popen(
                list(self.cell_command),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
            )
            with self._running_lock:
                self._running.add(child)
            try:
                child.stdin.write(json.dumps(self._spec(cell)))
                child.stdin.close()
                for line in child.stdout:
                    if line.startswith(EVENT_PREFIX):
                        event = json.loads(line[len(EVENT_PREFIX):])
                        last_phase = event.get("phase", last_phase)
                        self.listener.cell_event(cell, event)
                    else:
                        log.write(line)
                child.wait()
            except BaseException:
                self._stop_child(child)
                raise
            finally:
                with self._running_lock:
                    self._running.discard(child)
        if record_file.exists():
            record = json.loads(record_file.read_text(encoding="utf-8"))
        else:
            record = self._crash_record(cell, child.returncode, last_phase, slot)
            results.write_json_atomic(record_file, record)
        return record

    @staticmethod
    def _stop_child(child: subprocess.Popen) -> None:
        """Ask a running cell to stop (it writes an interrupted record), then make sure it is gone."""
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=CHILD_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def stop_running(self) -> None:
        """Stop every running cell process (each writes an interrupted record)."""
        with self._running_lock:
            running = list(self._running)
        for child in running:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in running:
            self._stop_child(child)

    def execute(self) -> list[dict[str, Any]]:
        """Run every cell, one process per slot at a time; a failed cell is recorded and the run goes on."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        total = len(self.cells)

        def start(cell: Cell, index: int, slot: Slot) -> None:
            self.listener.cell_started(cell, index, total)
            if slot.env:
                self.listener.cell_event(cell, {"event": "slot", "slot": slot.name})

        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            return scheduler.schedule(
                self.cells, self.slots, self.run_cell, on_start=start, on_finish=self.listener.cell_finished, stop_running=self.stop_running
            )
        except KeyboardInterrupt:
            raise RunInterrupted(f"run stopped; finished records are in {self.run_dir}") from None
        finally:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")
