"""The executor protocol: where and how a run's cells run (processes on this machine, Ray tasks, SLURM jobs).

The runner (qbench.runner.api) drives every executor the same way:

    executor = executors.create("forkserver")
    problems = executor.placement_problems(...)  # before anything: do --gpus, --parallel, ... fit it?
    placement = executor.prepare(request)        # before any run folder: start a fork server, join a cluster,
                                                 # settle the device; runs the suite's checks meanwhile
    records = executor.run_cells(run)            # every cell's record in run.run_dir/cells/, the listener told
    executor.close(run_dir)                      # always

An executor whose cells are processes it can follow (a local subprocess or fork, a SLURM job) says only how
to start one (`ProcessExecutor.launch`, giving a `CellHandle`); the slots, the log, the record of a cell that
died and the stopping are shared here. Ctrl-C, SIGTERM and SIGHUP reach `run_cells` as KeyboardInterrupt
(the run turns them into one in qbench.runner.runner.Run.execute, remembering which in `run.stop_signal`): an
executor stops its running cells and lets it go on.
"""

from __future__ import annotations

import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TextIO

from qbench.contract import records as results
from qbench.contract.protocol import child_env
from qbench.runner import scheduler
from qbench.runner.runner import log_footer, log_header, write_quietly
from qbench.runner.scheduler import Slot

if TYPE_CHECKING:
    from qbench.contract.suite import Cell, LoadedSuite
    from qbench.machine.compute import ComputeChoice
    from qbench.machine.threads import ThreadPlan
    from qbench.runner.runner import Run


@dataclass
class Request:
    """What the runner asks of an executor before any run folder exists."""

    loaded: LoadedSuite
    cells: list[Cell]
    device: str  # as asked: auto, cpu or cuda (a resumed run: the device it ran on)
    threads: ThreadPlan
    slots: list[Slot]  # this machine's slots (--gpus, --parallel); executors that place cells themselves ignore them
    gpus_per_cell: float = 1
    recorded_compute: ComputeChoice | None = None  # a resumed run keeps the dtype its run.json recorded
    # the suite's checks against the world (qbench.runner.preflight), for a device (None: no memory check,
    # the cells run elsewhere); the executor calls it once, when it suits it (while a fork server imports)
    check: Callable[[str | None], None] = lambda device: None
    device_option: str = ""  # how the device was asked for, for a message naming it ("": --device DEVICE)


@dataclass
class Placement:
    """Where the cells will run, as `prepare` settled it."""

    device: str  # cpu or cuda
    where: str  # in words, for the header line
    compute: ComputeChoice | None = None  # the run's compute dtype (None: each cell decides where it runs)
    threads: ThreadPlan | None = None
    slots: list[Slot] | None = None  # one cell at a time per slot; None: the request's
    lines: list[str] = field(default_factory=list)  # how cells start, the dtype, the threads: the header
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)  # run.json entries of this executor


class Executor(ABC):
    """Runs a run's cells somewhere; every record it leaves is the same wherever the cell ran."""

    name: ClassVar[str]  # each record's env.executor and run.json's `executor`
    launcher: str = "subprocess"  # each record's env.cell_launcher: how the cell's own process started
    # command-line options this executor takes, by constructor argument (the CLI refuses the others)
    OPTIONS: ClassVar[dict[str, str]] = {}
    places_cells: ClassVar[bool] = False  # True: the executor (a cluster) decides where each cell runs

    def placement_problems(self, gpus: str | None, gpus_per_cell: float, device: str, parallel: int) -> list[str]:
        """What is wrong with these placement options for this executor (one line each)."""
        return []

    def cores_per_cell(self) -> int | None:
        """The cores each cell gets where it runs (its threads default to them); None: this machine's cores,
        divided among the cells that run side by side."""
        return None

    def check(self, request: Request) -> str:
        """Check the suite and the options against the world, starting nothing (`qbench run --check`, a shard
        with no cells); where the cells would run, in words."""
        request.check(None if self.places_cells else request.device)
        return request.device

    @abstractmethod
    def prepare(self, request: Request) -> Placement:
        """Get ready to run `request.cells` (SuiteError, nothing started, when it cannot); call `request.check`."""

    @abstractmethod
    def run_cells(self, run: Run) -> list[dict[str, Any]]:
        """Run every cell of `run`, leave its record in the run folder and tell `run` as each starts and ends
        (`run.cell_started`, `run.cell_finished`); a failed cell is recorded and the others go on. On
        KeyboardInterrupt: call `run.stop_requested()`, stop the running cells (each recorded `interrupted`),
        start no more, and let the interrupt go on. The records, in cell order."""

    def close(self, run_dir: Path | None = None) -> None:
        """Release what `prepare` started (a fork server, a cluster connection); `run_dir` keeps its logs."""
        return None


class CellHandle(Protocol):
    """One running cell as a `ProcessExecutor` follows it (qbench.runner.launch.CellProcess is one)."""

    last_phase: str | None  # the last phase the cell announced
    fields: dict[str, Any]  # record fields of where it ran (a host, a job id), added to its record
    failure: dict[str, Any] | None  # error fields when it ended without a record for a reason of its own
    wall_s: float | None  # the cell process's wall time where it ran (None: the parent measures launch to end)

    @property
    def returncode(self) -> int | None: ...

    def events(self) -> Iterator[dict[str, Any]]:
        """The cell's progress events as they come; ends when the cell has ended."""

    def wait(self) -> int | None:
        """Until the cell's process ended; its exit code (None: not known)."""

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        """Ask the cell to stop (it records itself as interrupted), with `sig` where the cell is a process here."""

    def stop(self) -> None:
        """Ask the cell to stop and make sure it is gone."""


class ProcessExecutor(Executor):
    """Cells as processes this parent follows, one per slot at a time: `launch` starts one."""

    POLL_S = 0.2

    @abstractmethod
    def launch(self, run: Run, cell: Cell, env: dict[str, str], log: TextIO, attempt: str) -> CellHandle:
        """Start `cell` with `env` added to its environment (its slot's GPUs, its threads); its output not
        meant for the parent goes to `log`; `attempt` alone may write its record."""

    def slots(self, run: Run) -> list[Slot]:
        return run.slots

    def run_cells(self, run: Run) -> list[dict[str, Any]]:
        running: set[CellHandle] = set()
        lock = threading.Lock()

        def one(cell: Cell, slot: Slot) -> dict[str, Any] | None:
            return self.supervise(run, cell, slot, running, lock)

        def stop() -> None:
            run.stop_requested()
            with lock:
                handles = list(running)
            for handle in handles:  # the signal the run got, which the cell then names in its record
                handle.terminate(signal.Signals[run.stop_signal or "SIGTERM"])
            for handle in handles:
                handle.stop()

        slots = self.slots(run)
        return scheduler.schedule(
            run.cells, slots, one, stop_running=stop,
            on_start=lambda cell, index, slot: run.cell_started(cell, index, slot.name if slot.env else None),
            on_finish=run.cell_finished,
        )

    def supervise(self, run: Run, cell: Cell, slot: Slot, running: set[CellHandle], lock: threading.Lock) -> dict[str, Any]:
        """Run one cell in `slot` and follow it to its end; always returns (and leaves on disk) its record.

        OutputError when the run folder cannot be written (a full disk, a read-only folder): the run cannot
        keep what it measures, so it stops; the records already written stay as they are."""
        from qbench.contract import files

        try:
            return self._supervise(run, cell, slot, running, lock)
        except OSError as error:
            raise files.OutputError.from_os_error(run.run_dir, error) from None

    def _supervise(self, run: Run, cell: Cell, slot: Slot, running: set[CellHandle], lock: threading.Lock) -> dict[str, Any]:
        log_path = run.run_dir / "logs" / f"{cell.id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        record_file = results.record_path(run.run_dir, cell.id)
        attempt = results.claim_record(record_file)  # from now on an older attempt's process cannot write it
        record_file.unlink(missing_ok=True)
        extra = run.threads.env() if run.threads else {}  # threads and OpenMP waiting, before torch loads
        env = {**(run.env or {}), **extra, **slot.env}
        with open(log_path, "a", encoding="utf-8") as log:  # appended: a resumed cell keeps its earlier log
            log.write(log_header(cell))
            log.flush()
            launched = time.monotonic()
            handle = self.launch(run, cell, env, log, attempt)
            with lock:
                running.add(handle)
            try:
                for event in handle.events():
                    run.listener.cell_event(cell, event)
                handle.wait()
            except BaseException as error:
                handle.stop()
                record = run.settle(cell, handle.returncode, handle.last_phase, interrupted=isinstance(error, KeyboardInterrupt),
                                    slot=slot, attempt=attempt, wall_s=_wall_s(handle, launched), fields=handle.fields,
                                    failure=handle.failure)
                write_quietly(log, log_footer(cell, record))
                raise
            finally:
                with lock:
                    running.discard(handle)
            record = run.settle(cell, handle.returncode, handle.last_phase, interrupted=run.stopping, slot=slot,
                                attempt=attempt, wall_s=_wall_s(handle, launched), fields=handle.fields, failure=handle.failure)
            log.write(log_footer(cell, record))
        return record

    @staticmethod
    def cell_env(env: dict[str, str]) -> dict[str, str]:
        """The whole environment of a cell process on this machine."""
        return child_env(env)


def _wall_s(handle: CellHandle, launched: float) -> float:
    """The cell process's wall time: as measured where it ran, else from its launch here to now."""
    return handle.wall_s if handle.wall_s is not None else time.monotonic() - launched
