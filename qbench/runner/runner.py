"""Runs each cell of a suite in its own process and keeps every record it writes."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qbench import __version__
from qbench.cell.measure.timing import wall_split
from qbench.contract import files
from qbench.contract import records as results
from qbench.contract.protocol import CellSpec, child_env, identity_fields
from qbench.contract.suite import Cell, LoadedSuite
from qbench.machine.threads import ThreadPlan
from qbench.runner import launch, scheduler
from qbench.runner.launch import CELL_COMMAND, CellProcess, ForkServerLauncher, ForkServerUnavailable
from qbench.runner.scheduler import LOCAL_SLOT, Slot

if TYPE_CHECKING:
    from qbench.machine.compute import ComputeChoice


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

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.signal_name = signal_name


def resolve_device(requested: str) -> str:
    """`auto` becomes cuda when torch sees a GPU (asked in a child, so this process stays CUDA-free)."""
    if requested != "auto":
        return requested
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True, text=True, timeout=120,
    )
    return "cuda" if probe.stdout.strip() == "True" else "cpu"


def create_run_dir(out: Path, suite_name: str, label: str = "") -> Path:
    """Create a fresh `out/<suite>/<UTC time>[-label]` folder (`label` e.g. `shard1of2`) for this run alone:
    created exclusively, `-2`, `-3`... added when the name is taken, so two runs started in the same second
    never share one. The suite name is checked to be one folder name (ValueError). OutputError naming --out
    when `out` is a file, read-only or full."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + (f"-{label}" if label else "")
    suite_dir = files.child(out, suite_name, "suite name")
    files.make_dirs(out, "--out")
    return files.create_dir_exclusive(suite_dir, stamp, "--out")


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
    executor = "local"  # recorded as env.executor; each executor's Run says its own
    forkserver: ForkServerLauncher | None = None  # cells forked from it; None: each a fresh subprocess
    compute: ComputeChoice | None = None  # the run's compute dtype (None: each cell decides)
    threads: ThreadPlan | None = None  # torch threads per cell (None: torch's default)
    _running: set[CellProcess] = field(default_factory=set, init=False, repr=False)
    _running_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)  # set when the run is being interrupted

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def write_manifest(self, extra: dict[str, Any] | None = None) -> None:
        manifest = {
            "qbench_version": __version__,
            "suite": self.loaded.suite.name,
            "suite_path": str(self.loaded.path),
            "suite_sha256": self.loaded.sha256,
            "suite_text": self.loaded.source_text(),
            "device": self.device,
            "cells": [{"cell_id": c.id, "precision": c.precision, "seed": c.seed, "axes": dict(c.axes)} for c in self.cells],
            "slots": [{"name": s.name, **s.env} for s in self.slots],
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **(extra or {}),
        }
        results.write_json_atomic(self.run_dir / "run.json", manifest)

    @property
    def launcher(self) -> str:
        """How this run's cells start: `forkserver` or `subprocess` (recorded as env.cell_launcher)."""
        return "forkserver" if self._forks else "subprocess"

    @property
    def _forks(self) -> bool:
        """Cells are forked from the fork server: there is one, and the cell command is qbench's own (a test's
        stand-in command, e.g. tests/fake_cell.py, runs as the subprocess it names)."""
        return self.forkserver is not None and launch.is_qbench_cell(self.cell_command)

    def _spec(self, cell: Cell, attempt: str = "", parent_pid: int = 0) -> CellSpec:
        """The cell's spec. `attempt`: the token that alone may write the record (a local cell writes into the
        run folder; "" where the executor writes the record itself). `parent_pid`: the process that starts the
        cell as its child (this one or its fork server, for a local cell; 0 where it is not the runner, e.g. a
        Ray worker)."""
        run_fields = {"env.cell_launcher": self.launcher, **(self.threads.record_fields() if self.threads else {})}
        return CellSpec(
            suite_text=self.loaded.source_text(),
            suite_path=str(self.loaded.path),
            suite_sha256=self.loaded.sha256,
            run_id=self.run_id,
            cell_id=cell.id,
            precision=cell.precision,
            seed=cell.seed,
            device=self.device,
            record_path=str(results.record_path(self.run_dir, cell.id)),
            executor=self.executor,
            axes=dict(cell.axes),
            attempt=attempt,
            parent_pid=parent_pid,
            compute=asdict(self.compute) if self.compute else None,
            threads=self.threads.per_cell if self.threads else None,
            run_fields=run_fields,
        )

    def _crash_record(
        self, cell: Cell, returncode: int | None, last_phase: str | None, partial: dict[str, Any] | None = None,
        interrupted: bool = False, slot: Slot = LOCAL_SLOT,
    ) -> dict[str, Any]:
        """The record of a cell whose process ended without finishing it: what it had measured, plus how it ended."""
        if interrupted:
            how = "was stopped because the run was interrupted"
        elif returncode is not None and returncode < 0:
            how = f"was killed by signal {signal.Signals(-returncode).name}"
        else:
            how = f"exited with code {returncode} without finishing its record"
        phase = (partial or {}).get("last_phase") or last_phase or "start"
        return {
            **(partial or {}),
            **self._identity(cell),
            "status": "interrupted" if interrupted else "failed",
            "error": f"cell process {how} (last phase: {phase}); see logs/{cell.id}.log",
            "error_type": "Interrupted" if interrupted else "ChildProcessDied",
            "error_phase": phase,
            "error_returncode": returncode,
            "env.executor": self.executor,
            "time.end": datetime.now(UTC).isoformat(timespec="seconds"),
            "env.cuda_visible_devices": slot.env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES")),
        }

    def _identity(self, cell: Cell) -> dict[str, Any]:
        return identity_fields(self.loaded, self.run_id, cell)

    def _settle(
        self, cell: Cell, returncode: int | None, last_phase: str | None, interrupted: bool = False,
        slot: Slot = LOCAL_SLOT, attempt: str = "", wall_s: float | None = None,
    ) -> dict[str, Any]:
        """The cell's final record: the one it wrote, or (if it died or was stopped first) a failure or
        interruption record that keeps every figure its last checkpoint held; with the runner's own figures
        (the wall time of the cell's process and what its parts leave of it). Written atomically, and only
        while `attempt` is still the cell's current one (else the newer attempt's record is returned)."""
        record_file = results.record_path(self.run_dir, cell.id)
        written = results.read_record(record_file)
        if written is not None and written.get("status") not in (None, "running"):
            record = written
        else:
            record = self._crash_record(cell, returncode, last_phase, written, interrupted, slot)
        if wall_s is not None:
            record.update(wall_split(record, wall_s))
        record.setdefault("env.cell_launcher", self.launcher)
        try:
            results.write_record(record_file, record, attempt)
        except results.Superseded:
            return results.read_record(record_file) or record
        return record

    def _launch(self, cell: Cell, env: dict[str, str], log: Any, attempt: str) -> CellProcess:
        """Start the cell's process: forked from the run's fork server, else (none, or it died) a subprocess."""
        if self._forks:
            try:
                spec = self._spec(cell, attempt, parent_pid=self.forkserver.pid)
                return CellProcess(spec, env, log, self.cell_command, server=self.forkserver)
            except ForkServerUnavailable as gone:  # the server died (e.g. the OOM killer): go on without it
                log.write(f"=== qbench: the fork server is gone ({gone}); this and later cells start as subprocesses ===\n")
                log.flush()
                self.forkserver = None
        return CellProcess(self._spec(cell, attempt, parent_pid=os.getpid()), env, log, self.cell_command)

    def run_cell(self, cell: Cell, slot: Slot = LOCAL_SLOT) -> dict[str, Any]:
        """Run one cell in a fresh process in `slot`; always returns (and leaves on disk) its record.

        OutputError when the run folder cannot be written (a full disk, a read-only folder): the run cannot
        keep what it measures, so it stops; the records already written stay as they are."""
        try:
            return self._run_cell(cell, slot)
        except OSError as error:
            raise files.OutputError.from_os_error(self.run_dir, error) from None

    def _run_cell(self, cell: Cell, slot: Slot) -> dict[str, Any]:
        log_path = self.run_dir / "logs" / f"{cell.id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        record_file = results.record_path(self.run_dir, cell.id)
        attempt = results.claim_record(record_file)  # from now on an older attempt's process cannot write it
        record_file.unlink(missing_ok=True)
        extra = self.threads.env() if self.threads else {}  # threads and OpenMP waiting, before torch loads
        env = child_env({**(self.env or {}), **extra, **slot.env})
        with open(log_path, "a", encoding="utf-8") as log:  # appended: a resumed cell keeps its earlier log
            log.write(log_header(cell))
            log.flush()
            launched = time.monotonic()
            child = self._launch(cell, env, log, attempt)
            with self._running_lock:
                self._running.add(child)
            try:
                for event in child.events():
                    self.listener.cell_event(cell, event)
                child.wait()
            except BaseException as error:
                child.stop()
                record = self._settle(
                    cell, child.returncode, child.last_phase, interrupted=isinstance(error, KeyboardInterrupt), slot=slot,
                    attempt=attempt, wall_s=time.monotonic() - launched,
                )
                _write_quietly(log, log_footer(cell, record))
                raise
            finally:
                with self._running_lock:
                    self._running.discard(child)
            record = self._settle(cell, child.returncode, child.last_phase, interrupted=self._stopping, slot=slot,
                                  attempt=attempt, wall_s=time.monotonic() - launched)
            log.write(log_footer(cell, record))
        return record

    def stop_running(self) -> None:
        """Stop every running cell process (each writes an interrupted record)."""
        self._stopping = True
        with self._running_lock:
            running = list(self._running)
        for child in running:
            child.terminate()
        for child in running:
            child.stop()

    def execute(self) -> list[dict[str, Any]]:
        """Run every cell, one process per slot at a time; a failed cell is recorded and the run goes on."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.listener = scheduler.serialized(self.listener)  # cells report from one thread per slot
        total = len(self.cells)

        running: list[str] = []  # ids of the cells whose process runs now
        stopped_during: list[str] = []

        def start(cell: Cell, index: int, slot: Slot) -> None:
            running.append(cell.id)
            self.listener.cell_started(cell, index, total)
            if slot.env:
                self.listener.cell_event(cell, {"event": "slot", "slot": slot.name})

        def finish(cell: Cell, record: dict[str, Any]) -> None:
            running.remove(cell.id)
            self.listener.cell_finished(cell, record)

        def stop() -> None:
            stopped_during.extend(running)
            self.stop_running()

        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            return scheduler.schedule(
                self.cells, self.slots, self.run_cell, on_start=start, on_finish=finish, stop_running=stop
            )
        except KeyboardInterrupt as stop_signal:
            where = f"during cell {', '.join(stopped_during)}" if stopped_during else "between cells"
            signal_name = "SIGTERM" if str(stop_signal) == "SIGTERM" else "SIGINT"
            raise RunInterrupted(f"run stopped by {signal_name} {where}; finished records are in {self.run_dir}", signal_name) from None
        finally:
            signal.signal(signal.SIGTERM, previous)


def note_timing(run_dir: Path, timing: dict[str, Any]) -> None:
    """Add run-wide seconds (e.g. the whole run's wall time) to run.json's `timing`."""
    manifest = results.read_record(Path(run_dir) / "run.json")
    if manifest is not None:
        manifest["timing"] = {**(manifest.get("timing") or {}), **timing}
        results.write_json_atomic(Path(run_dir) / "run.json", manifest)


RUN_LOCK = ".lock"


class RunDirBusy(RuntimeError):
    """Another qbench command is running cells in this run folder now."""


@contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this command alone while it runs cells (an advisory lock on RUN_DIR/.lock,
    released when the process ends, however it ends): a `--resume` of a run that is still going is refused
    instead of running its cells twice. RunDirBusy if another process holds it; OutputError if the folder
    cannot be written."""
    path = Path(run_dir) / RUN_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise files.OutputError.from_os_error(path, error) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy("another qbench command is running cells in this run folder now") from None
        yield
    finally:
        os.close(fd)


def pending_cells(run_dir: Path, cells: list[Cell]) -> list[Cell]:
    """The cells of a run that still need running: no record, an unreadable one, or a status other than ok."""
    return [c for c in cells if (results.read_record(results.record_path(run_dir, c.id)) or {}).get("status") != "ok"]


def log_header(cell: Cell) -> str:
    return f"=== qbench: cell {cell.id} started {datetime.now(UTC).isoformat(timespec='seconds')} ===\n"


def _write_quietly(log: Any, text: str) -> None:
    """A log line on the way out of an error: the error that got us here matters more than this line."""
    try:
        log.write(text)
        log.flush()
    except OSError:
        pass


def log_footer(cell: Cell, record: dict[str, Any]) -> str:
    error = f": {record.get('error')}" if record.get("status") != "ok" else ""
    return f"=== qbench: cell {cell.id} ended {datetime.now(UTC).isoformat(timespec='seconds')}, {record.get('status')}{error} ===\n"


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")
