"""Run a suite, or finish a stopped run, as one library call: the run folder, its lock and run.json, the
checks before any cell, the executor (qbench.runner.executors), the records, results.csv and summary.md.

    from qbench.runner.api import run_suite, resume_run
    result = run_suite("suites/ci.toml", out="results", executor="slurm")
    result.exit_code, result.run_dir, result.failed          # 0 / 1 / 130 / 143, the folder, what did not finish
    result = resume_run(result.run_dir)                       # only the cells without an ok record

Bad input (the suite, an option, an --out that cannot be written) raises SuiteError or OutputError before any
cell starts, leaving no run folder; everything after that is in the RunResult. Nothing here prints: a
listener (qbench.runner.runner.Listener) hears what happens, and the command line renders it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbench.contract.exitcodes import Exit
from qbench.contract.files import OutputError
from qbench.contract.suite import LoadedSuite, SuiteError, load
from qbench.runner import executors, plan, runner
from qbench.runner.executors.base import Executor, Request
from qbench.runner.plan import COMMAND_LINE
from qbench.runner.runner import Listener, QuietListener, Run, RunInterrupted, RunStarted
from qbench.runner.scheduler import LOCAL_SLOT

if TYPE_CHECKING:
    from qbench.analysis.gate.compare import Settings
    from qbench.analysis.report.sections import Section
    from qbench.contract.fingerprint import DataFingerprint
    from qbench.contract.suite import Cell
    from qbench.runner.resume import Resumable

# what the terminal shows at the end of a run: the verdict first, then the tables a person compares
@dataclass
class RunResult:
    """How a run (or a resumption) went."""

    exit_code: int  # Exit: 0 every cell ok, 1 a cell did not finish, 2 a table could not be written, 130/143 stopped
    run_dir: Path | None = None  # None: no cell was to run (a check, an empty shard)
    suite: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)  # the records of the run's cells, as on disk at the end
    failed: list[str] = field(default_factory=list)  # "cell (status: error type)" or "cell (no record)"
    interrupted: str | None = None  # why the run stopped early (RunInterrupted's message)
    error: str | None = None  # one line: what could not be written once cells had run, and what to do
    note: str | None = None  # one line when no cell ran: the check passed, an empty shard, nothing to resume
    tables: dict[str, Path] = field(default_factory=dict)  # results.csv and summary.md
    sections: list[Section] = field(default_factory=list)  # the report's sections (the terminal shows qbench.cli.render.RUN_END_SECTIONS)


def run_suite(
    suite: str | Path | LoadedSuite, *, out: str | Path = "results", executor: str | Executor = executors.DEFAULT,
    only: str | None = None, seeds: str | None = None, where: list[str] | tuple[str, ...] = (), shard: str | None = None,
    device: str = "auto", gpus: str | None = None, gpus_per_cell: float = 1, threads: int | None = None,
    parallel: int = 1, check_only: bool = False, listener: Listener | None = None,
) -> RunResult:
    """Check the suite against the world, run its cells (after `only`, `where`, `seeds`, `shard`, as the
    command line's options of the same names) with `executor` into a new run folder under `out`, and write
    its results.csv and summary.md. `check_only`: stop after the checks, having written nothing.

    A folder or file that cannot be written before any cell ran raises OutputError (no run folder is left);
    afterwards the result's exit code is 1 when a cell of the run has no ok record, 2 when only results.csv
    or summary.md could not be written. What was written before stays as it was."""
    loaded = suite if isinstance(suite, LoadedSuite) else load(suite)
    executor = executors.create(executor) if isinstance(executor, str) else executor
    run_plan = plan.make(loaded, only=only, seeds=seeds, shard=shard, gpus=gpus, gpus_per_cell=gpus_per_cell,
                         device=device, executor=executor, where=where, threads=threads, parallel=parallel)
    return execute_plan(run_plan, Path(out), device, check_only, listener)


def execute_plan(run_plan: plan.RunPlan, out: Path, device: str, check_only: bool = False,
              listener: Listener | None = None) -> RunResult:
    """`run_suite` for a plan made already (qbench.runner.plan.make)."""
    from qbench.runner import preflight

    loaded, executor, listener = run_plan.loaded, run_plan.executor, listener or QuietListener()
    assert executor is not None
    check_out_folder(out, "--out")
    check_path_lengths(out, loaded.suite.name, run_plan.label, [cell.id for cell in run_plan.cells])
    check_limits()
    gpus_per_cell = max(1, int(run_plan.gpus_per_cell or 1))
    checked: list[Any] = []  # what the executor's call of the checks found (the data's fingerprint)
    request = Request(loaded, run_plan.cells, "cuda" if run_plan.on_gpus else device, run_plan.threads, run_plan.run_slots(),
                      run_plan.gpus_per_cell or 1,
                      check=lambda on: checked.append(preflight.check_suite(loaded, device=on, gpus_per_cell=gpus_per_cell)))
    if check_only or not run_plan.cells:
        where = executor.check(request)
        if check_only:
            ids = ", ".join(c.id for c in run_plan.cells) or "none in this shard"
            note = f"suite {loaded.suite.name} passes every check: {len(run_plan.cells)} cell(s) would run on {where} ({ids})"
        else:
            shard = run_plan.shard or (0, 0)
            note = f"shard {shard[0]}/{shard[1]} of suite {loaded.suite.name} has no cells ({run_plan.matrix_cells} in the matrix)"
        return RunResult(Exit.OK, suite=loaded.suite.name, note=note)
    started_at = time.monotonic()
    run_dir = None
    try:
        placement = executor.prepare(request)
        run_dir = create_run_dir(out, loaded, run_plan.label)
        data = data_fingerprint(checked)
        run = Run(loaded, run_dir, placement.device, run_plan.cells, executor, listener,
                  slots=placement.slots or request.slots, compute=placement.compute, threads=placement.threads, data=data)
        listener.run_started(RunStarted(loaded.suite.name, run_dir, run_plan.cells, len(run_plan.cells), placement.where,
                                        placement.lines, placement.notes, placement.warnings, run_plan.shard,
                                        run_plan.matrix_cells))
        manifest = {**run_plan.manifest_extras(), "executor": executor.name, **placement.manifest,
                    "data": data.manifest() if data else None}
        return _run_in(run, manifest, started_at)
    finally:
        executor.close(run_dir if run_dir is not None and run_dir.exists() else None)


def resume_run(run_dir: str | Path, *, executor: str | Executor | None = None, force: bool = False, gpus: str | None = None,
               gpus_per_cell: float = 1, parallel: int | None = None, listener: Listener | None = None) -> RunResult:
    """Finish a stopped run: run only the cells of `run_dir` without an ok record, with the suite, cells,
    device, compute dtype, threads and way of starting cells that its run.json recorded. `executor` None: on
    this machine, started as the run's other cells were (another name or executor: e.g. "ray"). `force`:
    resume even if the suite file changed since (the recorded suite text is used either way)."""
    from qbench.runner import resume

    listener = listener or QuietListener()
    state = resume.open_run(run_dir, force=force)
    check_limits()
    executor = _resume_executor(state, executor)
    # the cells of one run folder start alike: forked or not, and as many side by side (a forked cell's PSS
    # shares pages with the fork server and its siblings, so either changes its memory figures)
    recorded_parallel = state.manifest.get("parallel") or 1
    if parallel not in (None, 1, recorded_parallel):
        raise SuiteError(COMMAND_LINE, [f"--parallel {parallel}: the run in {state.run_dir} ran {recorded_parallel} "
                                        "cell(s) side by side; resume it the same way (leave --parallel out)"])
    parallel = recorded_parallel if not gpus else (parallel or 1)
    slots, _ = plan.placement(state.loaded, gpus, gpus_per_cell, state.device if executor.places_cells else "auto", None,
                              executor, parallel if not executor.places_cells else 1)
    if gpus and state.device != "cuda":
        raise SuiteError(COMMAND_LINE, [f"--gpus: the run in {state.run_dir} ran on {state.device}, not cuda"])
    if slots and not gpus and state.device != "cpu":
        raise SuiteError(COMMAND_LINE, [f"--parallel: the run in {state.run_dir} ran on {state.device}, not cpu"])
    started: list[bool] = []  # gets an entry once run.json notes the resumption: from then on cells may have run
    try:
        with runner.exclusive(state.run_dir):
            state = replace(state, pending=runner.pending_cells(state.run_dir, state.cells))  # as it is now, held
            if not state.pending:
                started.append(True)
                result = finish(state.run_dir, state.cells)
                result.note = f"nothing to resume in {state.run_dir}: every cell has an ok record"
                return result
            interrupted = _run_pending(state, executor, slots or [LOCAL_SLOT], gpus_per_cell, force, listener, started)
            if interrupted is not None:
                return interrupted
            return finish(state.run_dir, state.cells)
    except runner.RunDirBusy as busy:
        raise SuiteError(state.run_dir, [str(busy)]) from None
    except OSError as error:
        if started:
            return _stopped_by_output(error, state.run_dir, state.cells)
        raise OutputError.from_os_error(state.run_dir, error) from None  # nothing ran


def _resume_executor(state: Resumable, executor: str | Executor | None) -> Executor:
    """The executor of a resumption: as asked, else this machine's, starting cells as the run's other cells
    started (run.json's cell_launcher); SuiteError when one asked for would start them otherwise."""
    recorded = state.manifest.get("cell_launcher")
    recorded = recorded if recorded in ("forkserver", "subprocess") else None
    if executor is None or executor == executors.DEFAULT:
        return executors.create(recorded or executors.DEFAULT)
    if isinstance(executor, str):
        executor = executors.create(executor)
    asked = getattr(executor, "asked", None)  # this machine's executors: how they start cells
    if recorded and asked in ("forkserver", "subprocess") and asked != recorded:
        raise SuiteError(COMMAND_LINE, [f"--executor {asked}: the run in {state.run_dir} started its cells as "
                                        f"{recorded}; resume it the same way (leave --executor out)"])
    return executor


def _run_pending(state: Resumable, executor: Executor, slots: list, gpus_per_cell: float, force: bool, listener: Listener,
                 started: list[bool]) -> RunResult | None:
    """Run the cells a resumed run still needs; the result when interrupted, else None. `started` gets an
    entry once run.json notes the resumption (before that, a failed write ran nothing)."""
    from qbench.machine import threads
    from qbench.machine.compute import ComputeChoice
    from qbench.runner import preflight, resume

    # the cells of one run directory compute alike: the dtype and the threads run.json recorded, not new ones
    recorded = state.manifest.get("compute")
    choice = ComputeChoice(**{**recorded, "emulated": tuple(recorded.get("emulated", ()))}) if recorded else None
    per_cell = state.manifest.get("threads_per_cell")
    side_by_side = 1 if executor.places_cells else len(slots)
    cores = executor.cores_per_cell()
    thread_plan = (threads.ThreadPlan(per_cell, state.manifest.get("threads_source") or "run.json", cores or threads.available_cores(),
                                      side_by_side)
                   if per_cell else threads.plan(None, state.loaded.suite.threads, side_by_side, cores=cores))
    on_gpus = any("CUDA_VISIBLE_DEVICES" in slot.env for slot in slots)
    checked: list[Any] = []
    request = Request(state.loaded, state.pending, "cuda" if on_gpus else state.device, thread_plan, slots,
                      gpus_per_cell, recorded_compute=choice,
                      check=lambda on: checked.append(preflight.check_suite(state.loaded, device=on,
                                                                            gpus_per_cell=max(1, int(gpus_per_cell)))),
                      device_option=f"--resume (the run in {state.run_dir} ran on {state.device})")
    try:
        placement = executor.prepare(request)
        data = data_fingerprint(checked)
        changed = resume.data_changes(state, data)
        if changed and not force:
            raise SuiteError(state.run_dir / resume.MANIFEST, [resume.data_changed_line(changed)])
        run = Run(state.loaded, state.run_dir, placement.device, state.pending, executor, listener,
                  slots=placement.slots or slots, compute=placement.compute, threads=placement.threads, data=data)
        listener.run_started(RunStarted(state.loaded.suite.name, state.run_dir, state.pending, len(state.cells),
                                        placement.where, placement.lines, placement.notes, placement.warnings, resumed=True))
        resume.note_resume(state, forced=force, executor=executor.name, data_changed=changed)
        started.append(True)
        try:
            run.execute()
        except RunInterrupted as stop:
            return _interrupted(stop, state.run_dir, state.loaded.suite.name)
    finally:
        executor.close(state.run_dir)
    return None


def data_fingerprint(checked: list[Any]) -> DataFingerprint | None:
    """The data's fingerprint the checks made (None: they did not run, or a stand-in for them made none)."""
    return getattr(checked[-1], "data", None) if checked else None


ADDRESS_SPACE = "ulimit -v"  # how a problem of this process's address-space limit is named


def check_limits() -> None:
    """SuiteError before anything imports torch when this process's limits leave no room for a run (an
    address-space limit under what torch and a model need: torch would abort the process, not raise)."""
    from qbench.machine import limits

    problem = limits.address_space_problem()
    if problem:
        raise SuiteError(ADDRESS_SPACE, [problem])


# what a run writes inside its folder beyond the files named by a cell (the report's staging folder and plots,
# run.json's temporary file, ...): room kept for it under PATH_MAX
RUN_FOLDER_TAIL_BYTES = 160
RUN_STAMP = "20000101-000000"  # the run folder's name, as runner.create_run_dir makes it
TEMPORARY_SUFFIX_BYTES = len(".json.") + 8 + len(".tmp")  # files.write_bytes_atomic's temporary beside a record


def check_path_lengths(out: Path, suite: str, label: str, cell_ids: list[str]) -> None:
    """SuiteError naming --out, before any check or cell, when a file the run will write would have a path
    longer than this system allows (PATH_MAX), or a name longer than a folder can hold (NAME_MAX): the run
    would otherwise fail half-way, with a resume hint that cannot work either."""
    base = Path(os.path.abspath(out)) / suite / f"{RUN_STAMP}{f'-{label}' if label else ''}-9999"
    existing = next((p for p in (base, *base.parents) if os.path.exists(p)), Path("/"))  # os.path: False past PATH_MAX
    try:
        path_max, name_max = os.pathconf(existing, "PC_PATH_MAX"), os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        path_max, name_max = 4096, 255
    inside = [f"cells/.{cell_id}{TEMPORARY_SUFFIX_BYTES * 'x'}" for cell_id in cell_ids] + ["x" * RUN_FOLDER_TAIL_BYTES]
    longest = max(inside, key=lambda tail: len(tail.encode("utf-8", "surrogateescape")))
    needed = len(str(base / longest).encode("utf-8", "surrogateescape"))
    if needed >= path_max:
        raise SuiteError(COMMAND_LINE, [f"--out: {str(out)[:80]}{'...' if len(str(out)) > 80 else ''} is too deep: the run's "
                                        f"files would have paths of up to {needed:,} bytes, more than this system's "
                                        f"{path_max:,} (PATH_MAX); choose a shorter --out"])
    named = max(cell_ids, key=len, default="")
    if len(f".{named}".encode("utf-8", "surrogateescape")) + TEMPORARY_SUFFIX_BYTES > name_max:
        raise SuiteError(COMMAND_LINE, [f"cell {named[:60]!r}...: its record's temporary file would have a name longer than "
                                        f"{name_max} bytes (NAME_MAX); shorten the grid's axis values"])


def check_out_folder(out: Path, option: str) -> None:
    """SuiteError naming `option` when `out` (or the nearest part of it that exists) is not a folder qbench can
    write in: checked before any suite check or cell, so that a typo does not cost a run."""
    for ancestor in (out, *out.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise SuiteError(COMMAND_LINE, [f"{option}: {ancestor} is not a folder"])
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise SuiteError(COMMAND_LINE, [f"{option}: cannot write in {ancestor} (read-only or no permission)"])
            return


def create_run_dir(out: Path, loaded: LoadedSuite, label: str = "") -> Path:
    """The run's new folder under `out` (made only now: a run refused by the checks leaves no folder behind);
    OutputError when it cannot be made."""
    try:
        return runner.create_run_dir(out, loaded.suite.name, label)
    except ValueError as error:  # a suite name that is no folder name (the suite check refuses it first)
        raise SuiteError(loaded.path, [f"name: {error}"]) from None
    except OSError as error:
        raise OutputError.from_os_error(out, error) from None


def _run_in(run: Run, manifest: dict[str, Any], started_at: float | None = None) -> RunResult:
    """Hold the run folder, write run.json, run the cells and write the run's tables. A write that fails before
    run.json is written removes the (still empty) folder and raises OutputError; afterwards the records stay."""
    started = False
    try:
        with runner.exclusive(run.run_dir):
            run.write_manifest(manifest)
            started = True
            try:
                run.execute()
            except RunInterrupted as stop:
                return _interrupted(stop, run.run_dir, run.loaded.suite.name)
            if started_at is not None:
                runner.note_timing(run.run_dir, {"run_wall_s": time.monotonic() - started_at})
            return finish(run.run_dir, run.cells)
    except OSError as error:
        if started:
            return _stopped_by_output(error, run.run_dir, run.cells)
        _remove_unstarted_run_dir(run.run_dir)  # nothing ran: leave no half-made run folder behind
        raise OutputError.from_os_error(run.run_dir, error) from None


def _interrupted(stop: RunInterrupted, run_dir: Path, suite: str) -> RunResult:
    code = Exit.__members__.get(stop.signal_name, Exit.SIGINT)  # 128 + the signal's number, as a shell reports it
    return RunResult(code, run_dir, suite, interrupted=str(stop))


def _remove_unstarted_run_dir(run_dir: Path) -> None:
    """Remove a run folder this call created and nothing ran in (its lock file at most)."""
    try:
        (run_dir / runner.RUN_LOCK).unlink(missing_ok=True)
        run_dir.rmdir()  # only when empty: never removes anything else
    except OSError:
        pass


def _stopped_by_output(error: OSError, run_dir: Path, cells: list[Cell]) -> RunResult:
    """The result of a run whose write failed once cells had run: exit 1 when a cell of the run has no ok
    record, 2 when every record is ok and only the run's tables could not be written."""
    from qbench.contract import records as results

    problem = OutputError.from_os_error(run_dir, error)
    records = results.run_records(run_dir, [c.id for c in cells])
    complete = len(records) == len(cells) and all(r["status"] == "ok" for r in records)
    if complete:
        after = f"; every cell's record is intact in {run_dir / 'cells'}: `qbench run --resume {run_dir}` writes the tables"
    else:
        after = f"; the run stopped, the records written so far are intact: finish it with `qbench run --resume {run_dir}`"
    return RunResult(Exit.BAD_INPUT if complete else Exit.FAILED, run_dir, records=records, error=f"{problem}{after}")


def finish(run_dir: Path, cells: list[Cell]) -> RunResult:
    """results.csv and summary.md from the records of the run's own cells (other files in cells/ are not the
    run's and are left alone); exit 1 when a cell has no ok record."""
    from qbench.analysis.load import frame_of
    from qbench.analysis.report import summary, write
    from qbench.contract import records as results

    records = results.run_records(run_dir, [c.id for c in cells])
    result = RunResult(Exit.OK, run_dir, records=records)
    if records:
        frame = frame_of(records)
        result.sections = write.report_sections(frame, report_settings([run_dir]))
        result.tables = summary.write_run_outputs(run_dir, frame, shown=result.sections)
        result.suite = str(frame["suite"].iloc[0])
    recorded = {r["cell_id"] for r in records}
    result.failed = [f"{r['cell_id']} ({r['status']}: {r.get('error_type')})" for r in records if r["status"] != "ok"]
    result.failed += [f"{c.id} (no record)" for c in cells if c.id not in recorded]
    if result.failed:
        result.exit_code = Exit.FAILED
    return result


def report_settings(paths: list) -> Settings | None:
    """The gate settings of the suite the runs recorded (the eval-set warnings compare with its tolerances);
    None (qbench's defaults) when the stored suite text has an unusable [compare] table."""
    from qbench.analysis.gate import compare

    try:
        return compare.settings_of_runs(paths)
    except SuiteError:
        return None
