"""The run folder of one `qbench run` and its records: the manifest, each cell's spec, the record of a cell
that died or was stopped, and the one place that turns Ctrl-C / SIGTERM / SIGHUP into RunInterrupted. Where
the cells run is the executor's business (qbench.runner.executors)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qbench import __version__
from qbench.cell.measure.timing import wall_split
from qbench.contract import files
from qbench.contract import records as results
from qbench.contract.protocol import CellSpec, identity_fields
from qbench.contract.schema import SCHEMA_VERSION
from qbench.contract.suite import Cell, LoadedSuite
from qbench.machine.threads import ThreadPlan
from qbench.runner import scheduler
from qbench.runner.scheduler import LOCAL_SLOT, Slot

if TYPE_CHECKING:
    from qbench.contract.fingerprint import DataFingerprint
    from qbench.machine.compute import ComputeChoice
    from qbench.runner.executors.base import Executor


@dataclass(frozen=True)
class RunStarted:
    """What a run is about to do, told to the listener before its first cell (the command line's header)."""

    suite: str
    run_dir: Path
    cells: list[Cell]  # the cells this command runs
    total_cells: int  # the run folder's cells (a resume runs only the pending ones)
    where: str  # device and executor, in words
    lines: list[str] = field(default_factory=list)  # compute dtype, threads, how cells start
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shard: tuple[int, int] | None = None
    matrix_cells: int | None = None
    resumed: bool = False


class Listener(Protocol):
    """What the runner tells its caller (the CLI renders it; the library never prints)."""

    def run_started(self, started: RunStarted) -> None: ...
    def cell_started(self, cell: Cell, index: int, total: int) -> None: ...
    def cell_event(self, cell: Cell, event: dict[str, Any]) -> None: ...
    def cell_finished(self, cell: Cell, record: dict[str, Any]) -> None: ...


class QuietListener:
    def run_started(self, started: RunStarted) -> None:
        pass

    def cell_started(self, cell: Cell, index: int, total: int) -> None:
        pass

    def cell_event(self, cell: Cell, event: dict[str, Any]) -> None:
        pass

    def cell_finished(self, cell: Cell, record: dict[str, Any]) -> None:
        pass


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by Ctrl-C, SIGTERM or SIGHUP; finished records are intact."""

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.signal_name = signal_name


# what stops a run cleanly (its cells recorded interrupted, a line saying how to resume): Ctrl-C, `kill`, and
# the hangup of a closed terminal or a lost SSH session
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_as_interrupts(heard: Callable[[str], None]) -> Iterator[None]:
    """While inside, each of STOP_SIGNALS raises KeyboardInterrupt in the main thread (every time: a second one
    stops the cells faster), `heard(its name)` called first. A signal this process ignores stays ignored
    (`nohup` ignores SIGHUP so that the run outlives the terminal), and outside the main thread nothing changes."""

    def interrupt(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        heard(name)
        raise KeyboardInterrupt(name)

    previous: dict[int, Any] = {}
    try:
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) != signal.SIG_IGN:
                previous[sig] = signal.signal(sig, interrupt)
    except ValueError:  # not the main thread: signals are the main thread's caller's to handle
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    """One run of a suite's cells into one run directory, by one executor."""

    loaded: LoadedSuite
    run_dir: Path
    device: str
    cells: list[Cell]
    executor: Executor
    listener: Listener = field(default_factory=QuietListener)
    slots: list[Slot] = field(default_factory=lambda: [LOCAL_SLOT])  # one cell process per slot at a time (local)
    compute: ComputeChoice | None = None  # the run's compute dtype (None: each cell decides)
    threads: ThreadPlan | None = None  # torch threads per cell (None: torch's default)
    env: dict[str, str] | None = None  # extra environment for the cell processes
    data: DataFingerprint | None = None  # what the checks read of the data (None: no checks ran, e.g. a test's executor)
    # this `qbench run` or `--resume` (its start, UTC): the report marks speed ratios of cells timed in different ones
    session: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    stopping: bool = field(default=False, init=False)  # set once the run is being interrupted
    stop_signal: str | None = field(default=None, init=False)  # the signal that stopped it (SIGINT, SIGTERM, SIGHUP)
    running: list[str] = field(default_factory=list, init=False)  # ids of the cells that run now
    stopped_during: list[str] = field(default_factory=list, init=False)  # the cells running when the stop came
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def write_manifest(self, extra: dict[str, Any] | None = None) -> None:
        manifest = {
            "schema_version": SCHEMA_VERSION,
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
        results.write_manifest(self.run_dir, manifest)

    def spec(self, cell: Cell, attempt: str = "", parent_pid: int = 0) -> CellSpec:
        """The cell's spec. `attempt`: the token that alone may write the record ("" where the executor writes
        the record itself). `parent_pid`: the process that starts the cell as its child (0 where that is not
        known here, e.g. a Ray worker or a SLURM job, which checks it itself)."""
        run_fields = {"env.cell_launcher": self.executor.launcher, "run_session": self.session,
                      **(self.threads.record_fields() if self.threads else {}),
                      **(self.data.record_fields() if self.data else {})}
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
            executor=self.executor.name,
            axes=dict(cell.axes),
            attempt=attempt,
            parent_pid=parent_pid,
            compute=asdict(self.compute) if self.compute else None,
            threads=self.threads.per_cell if self.threads else None,
            run_fields=run_fields,
            data_files=dict(self.data.data_files) if self.data else {},
        )

    def crash_record(
        self, cell: Cell, returncode: int | None, last_phase: str | None, partial: dict[str, Any] | None = None,
        interrupted: bool = False, slot: Slot = LOCAL_SLOT,
    ) -> dict[str, Any]:
        """The record of a cell whose process ended without finishing it: what it had measured, plus how it ended."""
        if interrupted:
            how = f"was stopped because the run was interrupted{f' by {self.stop_signal}' if self.stop_signal else ''}"
        elif returncode is not None and returncode < 0:
            how = f"was killed by signal {signal.Signals(-returncode).name}"
        else:
            how = f"exited with code {returncode} without finishing its record"
        phase = (partial or {}).get("last_phase") or last_phase or "start"
        return {
            **(partial or {}),
            **identity_fields(self.loaded, self.run_id, cell),
            "status": "interrupted" if interrupted else "failed",
            "error": f"cell process {how} (last phase: {phase}); see logs/{cell.id}.log",
            "error_type": "Interrupted" if interrupted else "ChildProcessDied",
            "error_phase": phase,
            "error_returncode": returncode,
            "env.executor": self.executor.name,
            "time.end": datetime.now(UTC).isoformat(timespec="seconds"),
            "env.cuda_visible_devices": slot.env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES")),
        }

    def settle(
        self, cell: Cell, returncode: int | None, last_phase: str | None, interrupted: bool = False,
        slot: Slot = LOCAL_SLOT, attempt: str = "", wall_s: float | None = None, fields: dict[str, Any] | None = None,
        failure: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The cell's final record: the one it wrote, or (if it died or was stopped first) a failure or
        interruption record that keeps every figure its last checkpoint held; with the runner's own figures
        (the wall time of the cell's process and what its parts leave of it) and the executor's `fields`
        (where it ran). `failure`: the executor's own error fields for a cell that left no record (its job
        or worker died). Written atomically, and only while `attempt` is still the cell's current one (else
        the newer attempt's record is returned)."""
        record_file = results.record_path(self.run_dir, cell.id)
        written = results.read_record(record_file)
        if written is not None and written.get("status") not in (None, "running"):
            record = self.named_stop({**(fields or {}), **written})
        else:
            record = {**self.crash_record(cell, returncode, last_phase, written, interrupted, slot), **(fields or {})}
            if failure and not interrupted:
                record.update(failure)
        if wall_s is not None:
            record.update(wall_split(record, wall_s))
        record.setdefault("env.cell_launcher", self.executor.launcher)
        try:
            results.write_record(record_file, record, attempt)
        except results.Superseded:
            return results.read_record(record_file) or record
        return record

    def named_stop(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record the cell wrote as interrupted while the run was being stopped, naming the signal that stopped
        the run: the cell itself got SIGTERM from whatever stopped it (the runner, its Ray task, its SLURM job),
        whichever signal reached the run."""
        if (self.stopping and self.stop_signal and record.get("status") == "interrupted"
                and self.stop_signal not in str(record.get("error"))):
            record["error"] = f"Interrupted: stopped by signal {self.stop_signal} (the run's)"
        return record

    # -- what the executors report (from one thread at a time: Run.execute serializes the listener) -----------

    def cell_started(self, cell: Cell, index: int, where: str | None = None) -> None:
        with self._lock:
            self.running.append(cell.id)
        self.listener.cell_started(cell, index, len(self.cells))
        if where:
            self.listener.cell_event(cell, {"event": "slot", "slot": where})

    def cell_finished(self, cell: Cell, record: dict[str, Any]) -> None:
        with self._lock:
            if cell.id in self.running:
                self.running.remove(cell.id)
        self.listener.cell_finished(cell, record)

    def execute(self) -> list[dict[str, Any]]:
        """Run every cell with the executor; a failed cell is recorded and the run goes on. Ctrl-C, SIGTERM or
        SIGHUP stops it: the executor stops its running cells (recorded `interrupted`, naming the signal) and
        RunInterrupted is raised."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.listener = scheduler.serialized(self.listener)  # cells report from one thread per slot
        with signals_as_interrupts(self._heard):
            try:
                return self.executor.run_cells(self)
            except KeyboardInterrupt:
                if not self.stopping:
                    self.stop_requested()
                where = f"during cell {', '.join(self.stopped_during)}" if self.stopped_during else "between cells"
                signal_name = self.stop_signal or "SIGINT"
                raise RunInterrupted(f"run stopped by {signal_name} {where}", signal_name) from None

    def _heard(self, signal_name: str) -> None:
        if self.stop_signal is None:  # the first one stopped the run; a second only hurries it
            self.stop_signal = signal_name

    def stop_requested(self) -> None:
        """The run is being interrupted: remember which cells were running (for the message) and say so."""
        with self._lock:
            self.stopping = True
            self.stop_signal = self.stop_signal or "SIGINT"  # a KeyboardInterrupt no handler of ours raised
            self.stopped_during = list(self.running)


def note_timing(run_dir: Path, timing: dict[str, Any]) -> None:
    """Add run-wide seconds (e.g. the whole run's wall time) to run.json's `timing`."""
    manifest = results.read_record(Path(run_dir) / "run.json")
    if manifest is not None:
        manifest["timing"] = {**(manifest.get("timing") or {}), **timing}
        results.write_manifest(run_dir, manifest)


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


def write_quietly(log: Any, text: str) -> None:
    """A log line on the way out of an error: the error that got us here matters more than this line."""
    try:
        log.write(text)
        log.flush()
    except OSError:
        pass


def log_footer(cell: Cell, record: dict[str, Any]) -> str:
    error = f": {record.get('error')}" if record.get("status") != "ok" else ""
    return f"=== qbench: cell {cell.id} ended {datetime.now(UTC).isoformat(timespec='seconds')}, {record.get('status')}{error} ===\n"
