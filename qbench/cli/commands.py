"""The commands behind `qbench run | env | report | compare | baseline | list`: thin calls into the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qbench import __version__
from qbench.cli import render
from qbench.cli.render import console, errors
from qbench.contract import optimizers, precisions
from qbench.contract.exitcodes import Exit
from qbench.contract.suite import SuiteError
from qbench.runner.plan import COMMAND_LINE

if TYPE_CHECKING:
    from qbench.analysis.gate.compare import Settings
    from qbench.contract.suite import Cell, LoadedSuite
    from qbench.machine.compute import ComputeChoice
    from qbench.machine.threads import ThreadPlan
    from qbench.runner.plan import RunPlan
    from qbench.runner.ray_executor import CellResources, Cluster
    from qbench.runner.resume import Resumable
    from qbench.runner.runner import Run
    from qbench.runner.scheduler import Slot
    from qbench.runner.start import RunStart


def cmd_run(args: argparse.Namespace) -> int:
    from qbench.contract.suite import load
    from qbench.runner import plan

    if args.resume is not None:
        return _resume(args)
    if not args.suite:
        raise SuiteError(COMMAND_LINE, ["qbench run needs a suite file (or --resume RUN_DIR)"])
    if args.force:
        raise SuiteError(COMMAND_LINE, ["--force only goes with --resume"])
    loaded = load(args.suite)
    run_plan = plan.make(loaded, only=args.only, seeds=args.seeds, shard=args.shard, gpus=args.gpus,
                         gpus_per_cell=args.gpus_per_cell, device=args.device, executor=args.executor,
                         ray_address=args.ray_address, cpus_per_cell=args.cpus_per_cell, where=args.where,
                         threads=args.threads, parallel=args.parallel, launcher=args.launcher)
    return run_suite(run_plan, Path(args.out), args.device, check_only=args.check)


def run_suite(run_plan: RunPlan, out: Path, device: str, check_only: bool = False) -> int:
    """Check the suite against the world, run the plan's cells into a new run folder under `out`, and
    write its results.csv and summary.md; the exit code says how it went. `check_only`: stop after the
    checks, having written nothing.

    A folder or file that cannot be written gives one line: exit 2 while no cell has run (--out a file,
    read-only, full), afterwards 1 when a cell of the run has no ok record, 2 when only results.csv or
    summary.md could not be written. What was written before stays as it was."""
    from qbench.runner import preflight, runner

    loaded = run_plan.loaded
    on_ray = run_plan.executor == "ray"  # cells run on the cluster's nodes: this machine's memory says nothing
    checks = {"device": None if on_ray else "cuda" if run_plan.on_gpus else device,
              "gpus_per_cell": max(1, int(run_plan.gpus_per_cell or 1))}
    check_out_folder(out, "--out")
    if not on_ray and (device.startswith("cuda") or run_plan.on_gpus):
        check_cuda_seen("--gpus" if run_plan.on_gpus else f"--device {device}")
    if check_only or on_ray or not run_plan.cells:  # else checked while the fork server imports (_begin)
        preflight.check_suite(loaded, **checks)
    if check_only:
        where = "a Ray cluster" if on_ray else "cuda" if run_plan.on_gpus else runner.resolve_device(device)
        console.print(f"suite [bold]{escape(loaded.suite.name)}[/] passes every check: {len(run_plan.cells)} cell(s) "
                      f"would run on {where} ({', '.join(c.id for c in run_plan.cells) or 'none in this shard'})")
        return Exit.OK
    if not run_plan.cells:
        shard = run_plan.shard or (0, 0)
        console.print(f"shard {shard[0]}/{shard[1]} of suite {loaded.suite.name} has no cells ({run_plan.matrix_cells} in the matrix)")
        return Exit.OK
    if on_ray:
        return _run_on_ray(run_plan, out, device)
    started_at = time.monotonic()
    begun = _begin(loaded, run_plan.cells, "cuda" if run_plan.on_gpus else device, run_plan.threads, run_plan.launcher,
                   run_plan.on_gpus, checks=checks)
    run_dir = None
    try:
        run_dir = _create_run_dir(out, loaded, run_plan.label)
        if run_dir is None:
            return Exit.BAD_INPUT
        slots = run_plan.slots
        where = f"{begun.device}, {len(slots)} cells at a time ({', '.join(s.name for s in slots)})" if slots else begun.device
        _header(run_plan, where, run_dir)
        render.run_start(begun)
        run = runner.Run(loaded, run_dir, begun.device, run_plan.cells, slots=run_plan.run_slots(), forkserver=begun.forkserver,
                         compute=begun.compute, threads=begun.threads)
        extras = {"compute": asdict(begun.compute), "cell_launcher": begun.launcher, "timing": begun.timing, "shared": begun.shared}
        return _run_in(run, run_dir, {**run_plan.manifest_extras(), **extras}, started_at)
    finally:
        begun.close(run_dir if run_dir is not None and run_dir.exists() else None)


def _create_run_dir(out: Path, loaded: LoadedSuite, label: str = "") -> Path | None:
    """The run's new folder under `out`; None (one line printed) when it cannot be made."""
    from qbench.contract.files import OutputError
    from qbench.runner import runner

    try:  # made only now: a run refused by the checks leaves no folder behind
        return runner.create_run_dir(out, loaded.suite.name, label)
    except ValueError as error:  # a suite name that is no folder name (the suite check refuses it first)
        raise SuiteError(loaded.path, [f"name: {error}"]) from None
    except OSError as error:
        render.error(str(OutputError.from_os_error(out, error)))
        return None


def _run_in(run: Run, run_dir: Path, manifest: dict[str, Any], started_at: float | None = None) -> int:
    """Hold `run_dir`, write run.json, run the cells and write the run's tables; the exit code. A write that
    fails before run.json is written removes the (still empty) folder; afterwards the records stay."""
    from qbench.contract.files import OutputError
    from qbench.runner import runner

    started = False
    try:
        with runner.exclusive(run_dir):
            run.write_manifest(manifest)
            started = True
            stopped, _ = _execute(run)
            if stopped is not None:
                return stopped
            if started_at is not None:
                runner.note_timing(run_dir, {"run_wall_s": time.monotonic() - started_at})
            return _finish(run_dir, run.cells)
    except OSError as error:
        if started:
            return _stopped_by_output(error, run_dir, run.cells)
        _remove_unstarted_run_dir(run_dir)  # nothing ran: leave no half-made run folder behind
        render.error(str(OutputError.from_os_error(run_dir, error)))
        return Exit.BAD_INPUT


def _run_on_ray(run_plan: RunPlan, out: Path, device: str) -> int:
    """The plan's cells on a Ray cluster (joined before any folder is made)."""
    loaded = run_plan.loaded
    with _cluster(run_plan.executor, run_plan.ray_address) as cluster:
        device, resources = _ray_resources(cluster, device, run_plan.gpus_per_cell or 1, run_plan.cpus_per_cell)
        run_dir = _create_run_dir(out, loaded, run_plan.label)
        if run_dir is None:
            return Exit.BAD_INPUT
        run, where, extras = _ray_run(cluster, loaded, run_dir, run_plan.cells, device, resources)
        run.threads = run_plan.threads
        _header(run_plan, where, run_dir)
        return _run_in(run, run_dir, {**run_plan.manifest_extras(), **extras})


def check_cuda_seen(option: str) -> None:
    """SuiteError naming `option` when torch sees no CUDA GPU here (asked in a child process, as `auto` is):
    before any cell, instead of every cell failing in its first CUDA call."""
    from qbench.runner import launch, runner

    if not launch.is_qbench_cell(runner.CELL_COMMAND):
        return  # a stand-in cell command (the tests' fake GPUs) decides for itself what a device is
    if runner.resolve_device("auto") != "cuda":
        raise SuiteError(COMMAND_LINE, [f"{option}: torch sees no CUDA GPU on this machine (a CPU build of torch, or "
                                        "no driver); use --device cpu, or auto"])


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


def _remove_unstarted_run_dir(run_dir: Path) -> None:
    """Remove a run folder this command created and nothing ran in (its lock file at most)."""
    from qbench.runner import runner

    try:
        (run_dir / runner.RUN_LOCK).unlink(missing_ok=True)
        run_dir.rmdir()  # only when empty: never removes anything else
    except OSError:
        pass


def _stopped_by_output(error: OSError, run_dir: Path, cells: list[Cell]) -> int:
    """One line for a write that failed once cells had run; exit 1 when a cell of the run has no ok record,
    2 when every record is ok and only the run's tables could not be written."""
    from qbench.contract import records as results
    from qbench.contract.files import OutputError

    problem = OutputError.from_os_error(run_dir, error)
    records = results.run_records(run_dir, [c.id for c in cells])
    complete = len(records) == len(cells) and all(r["status"] == "ok" for r in records)
    if complete:
        after = f"; every cell's record is intact in {run_dir / 'cells'}: `qbench run --resume {run_dir}` writes the tables"
    else:
        after = f"; the run stopped, the records written so far are intact: finish it with `qbench run --resume {run_dir}`"
    render.error(f"{problem}{after}")
    return Exit.BAD_INPUT if complete else Exit.FAILED


def _header(run_plan: RunPlan, where: str, run_dir: Path) -> None:
    loaded = run_plan.loaded
    part = f", shard {run_plan.shard[0]}/{run_plan.shard[1]} of {run_plan.matrix_cells}" if run_plan.shard else ""
    console.print(f"qbench {__version__}: suite [bold]{escape(loaded.suite.name)}[/] ({len(run_plan.cells)} cells{part}) on {escape(where)} -> {escape(str(run_dir))}")


def _begin(loaded: LoadedSuite, cells: list[Cell], device: str, thread_plan: ThreadPlan, launcher: str, on_gpus: bool,
           recorded: ComputeChoice | None = None, checks: dict[str, Any] | None = None) -> RunStart:
    """Check the suite against the world (with `checks`, preflight.check_suite's options; None: checked
    already) while the fork server imports, then settle the device, the compute dtype and the threads
    (qbench.runner.start); SuiteError (nothing started) for a bad suite."""
    from qbench.runner import preflight, start

    server = start.begin(launcher, device, on_gpus)  # imports torch & co. while the suite is checked
    try:
        if checks is not None:
            preflight.check_suite(loaded, **checks)
        return start.finish(server, loaded, cells, device, thread_plan, launcher, on_gpus, recorded)
    except BaseException:
        if server is not None:
            server.close()
        raise


@contextmanager
def _cluster(executor: str, address: str | None) -> Iterator[Cluster | None]:
    """The Ray cluster for `--executor ray` (joined before any cell; exit 2 when it cannot be), else None."""
    if executor != "ray":
        yield None
        return
    from qbench.runner import ray_executor

    cluster = ray_executor.connect(address)
    try:
        yield cluster
    finally:
        ray_executor.disconnect(cluster)


def _ray_resources(cluster: Cluster, device: str, gpus_per_cell: float, cpus_per_cell: float) -> tuple[str, CellResources]:
    """The device of a run on the Ray cluster (auto: cuda when the cluster has GPUs) and what each cell asks
    for; SuiteError when no node has room for one cell (checked before any folder is made)."""
    from qbench.runner import ray_executor

    if device == "auto":
        device = "cuda" if cluster.has_gpus() else "cpu"
    resources = ray_executor.cell_resources(device, gpus_per_cell, cpus_per_cell)
    cluster.check_fits(resources)
    return device, resources


def _ray_run(cluster: Cluster, loaded: LoadedSuite, run_dir: Path, cells: list[Cell], device: str,
             resources: CellResources) -> tuple[Run, str, dict[str, Any]]:
    """A run of `cells` on the Ray cluster: the run, the header text and run.json's `ray` entry."""
    from qbench.runner import ray_executor

    total = ", ".join(f"{cluster.resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
    where = f"{device}, Ray at {cluster.address} ({len(cluster.nodes)} node(s), {total}; {resources.describe()} per cell)"
    run = ray_executor.RayRun(loaded, run_dir, device, cells, resources=resources)
    return run, where, {"executor": "ray", "ray": cluster.manifest(resources)}


def _execute(run: Run) -> tuple[int | None, list[dict[str, Any]]]:
    """Run the cells with progress bars: (the exit code if the run was interrupted, else None; the records)."""
    from qbench.runner import runner

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        run.listener = render.ProgressListener(progress, len(run.cells))
        try:
            return None, run.execute()
        except runner.RunInterrupted as stop:
            errors.print(f"[yellow]interrupted:[/] {escape(str(stop))}", highlight=False, soft_wrap=True)
            errors.print(f"resume with: qbench run --resume {escape(str(run.run_dir))}", highlight=False, soft_wrap=True)
            return (Exit.SIGTERM if stop.signal_name == "SIGTERM" else Exit.SIGINT), []


def _resume(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from qbench.contract.files import OutputError
    from qbench.runner import plan, preflight, resume, runner

    given = [
        flag
        for flag, used in (
            ("SUITE", args.suite is not None), ("--only", args.only is not None), ("--seeds", args.seeds is not None),
            ("--where", args.where), ("--device", args.device != "auto"), ("--out", args.out != "results"),
            ("--check", args.check), ("--threads", args.threads is not None), ("--launcher", args.launcher != "auto"),
        )
        if used
    ]
    if given:
        raise SuiteError(COMMAND_LINE, [f"--resume takes its settings from RUN_DIR/run.json; drop {', '.join(given)}"])
    state = resume.open_run(args.resume, force=args.force)
    # the cells of one run folder start alike: forked or not, and as many side by side (a forked cell's PSS
    # shares pages with the fork server and its siblings, so either changes its memory figures)
    args.launcher = state.manifest.get("cell_launcher") or "auto"
    recorded_parallel = state.manifest.get("parallel") or 1
    if args.parallel not in (1, recorded_parallel):
        raise SuiteError(COMMAND_LINE, [f"--parallel {args.parallel}: the run in {state.run_dir} ran {recorded_parallel} "
                                        "cell(s) side by side; resume it the same way (leave --parallel out)"])
    args.parallel = recorded_parallel if not args.gpus else args.parallel
    on_ray = args.executor == "ray"
    slots, shard = plan.placement(state.loaded, args.gpus, args.gpus_per_cell, state.device if on_ray else args.device,
                                  args.shard, args.executor, args.ray_address, args.cpus_per_cell, args.parallel)
    if shard:
        raise SuiteError(COMMAND_LINE, ["--shard does not go with --resume: the run folder already holds its shard's cells"])
    if args.gpus and state.device != "cuda":
        raise SuiteError(COMMAND_LINE, [f"--gpus: the run in {state.run_dir} ran on {state.device}, not cuda"])
    if not on_ray and state.device.startswith("cuda"):
        check_cuda_seen(f"--resume (the run in {state.run_dir} ran on {state.device})")
    if slots and not args.gpus and state.device != "cpu":
        raise SuiteError(COMMAND_LINE, [f"--parallel: the run in {state.run_dir} ran on {state.device}, not cpu"])
    preflight.check_suite(state.loaded, device=None if on_ray else state.device, gpus_per_cell=max(1, int(args.gpus_per_cell)))
    started: list[bool] = []  # gets an entry once run.json notes the resumption: from then on cells may have run
    try:
        with runner.exclusive(state.run_dir):
            state = replace(state, pending=runner.pending_cells(state.run_dir, state.cells))  # as it is now, held
            if not state.pending:
                console.print(f"nothing to resume in {escape(str(state.run_dir))}: every cell has an ok record")
                started.append(True)
            else:
                stopped = _run_pending(state, args, slots, started)
                if stopped is not None:
                    return stopped
            return _finish(state.run_dir, state.cells)
    except runner.RunDirBusy as busy:
        raise SuiteError(state.run_dir, [str(busy)]) from None
    except OSError as error:
        if started:
            return _stopped_by_output(error, state.run_dir, state.cells)
        render.error(str(OutputError.from_os_error(state.run_dir, error)))  # nothing ran
        return Exit.BAD_INPUT


def _run_pending(state: Resumable, args: argparse.Namespace, slots: list[Slot] | None, started: list[bool]) -> int | None:
    """Run the cells a resumed run still needs, here or on Ray; the exit code when interrupted, else None.
    `started` gets an entry once run.json notes the resumption (before that, a failed write ran nothing).
    The suite was checked already."""
    from qbench.machine import threads
    from qbench.machine.compute import ComputeChoice
    from qbench.runner import resume, runner
    from qbench.runner.scheduler import LOCAL_SLOT

    # the cells of one run directory compute alike: the dtype and the threads run.json recorded, not new ones
    recorded = state.manifest.get("compute")
    choice = ComputeChoice(**{**recorded, "emulated": tuple(recorded.get("emulated", ()))}) if recorded else None
    per_cell = state.manifest.get("threads_per_cell")
    side_by_side = len(slots) if slots else 1
    thread_plan = (threads.ThreadPlan(per_cell, state.manifest.get("threads_source") or "run.json", threads.available_cores(),
                                      side_by_side)
                   if per_cell else threads.plan(None, state.loaded.suite.threads, side_by_side))
    begun = None
    with _cluster(args.executor, args.ray_address) as cluster:
        if cluster is not None:
            device, resources = _ray_resources(cluster, state.device, args.gpus_per_cell, args.cpus_per_cell or 1.0)
            run, where, _ = _ray_run(cluster, state.loaded, state.run_dir, state.pending, device, resources)
            run.threads = thread_plan
        else:
            begun = _begin(state.loaded, state.pending, state.device, thread_plan, args.launcher, bool(args.gpus), choice)
            run = runner.Run(state.loaded, state.run_dir, state.device, state.pending, slots=slots or [LOCAL_SLOT],
                             forkserver=begun.forkserver, compute=begun.compute, threads=begun.threads)
            where = state.device
        try:
            console.print(
                f"qbench {__version__}: resuming [bold]{escape(state.loaded.suite.name)}[/] in {escape(str(state.run_dir))}: "
                f"{len(state.pending)} of {len(state.cells)} cells to run ({', '.join(c.id for c in state.pending)}) on {escape(where)}"
            )
            if begun is not None:
                render.run_start(begun)
            resume.note_resume(state, forced=args.force, executor=args.executor)
            started.append(True)
            stopped, _ = _execute(run)
        finally:
            if begun is not None:
                begun.close(state.run_dir)
    return stopped


# what the terminal shows at the end of a run: the verdict first, then the tables a person compares
RUN_END_SECTIONS = ("verdict", "nonfinite", "warnings", "relative", "per_precision", "failures")


def _finish(run_dir: Path, cells: list[Cell]) -> int:
    """results.csv and summary.md from the records of the run's own cells (other files in cells/ are not
    the run's and are left alone), the verdict and tables, and the exit code: 1 when a cell has no ok record."""
    import pandas as pd

    from qbench.analysis.report import summary, write
    from qbench.contract import records as results

    records = results.run_records(run_dir, [c.id for c in cells])
    if records:
        frame = pd.DataFrame(records)
        shown = write.report_sections(frame, _report_settings([run_dir]))
        paths = summary.write_run_outputs(run_dir, frame, shown=shown)
        console.print(f"[bold]{escape(str(frame['suite'].iloc[0]))}[/] — {escape(str(run_dir))}", highlight=False)
        render.sections(shown, RUN_END_SECTIONS)
        budget_verdicts(records)
        console.print(f"records: {run_dir / 'cells'}   table: {paths['csv']}   summary: {paths['summary']}")
    recorded = {r["cell_id"] for r in records}
    failed = [f"{r['cell_id']} ({r['status']}: {r.get('error_type')})" for r in records if r["status"] != "ok"]
    failed += [f"{c.id} (no record)" for c in cells if c.id not in recorded]
    if failed:
        errors.print(f"[red]{len(failed)} cell(s) did not finish:[/] {escape(', '.join(failed))}", highlight=False, soft_wrap=True)
        return Exit.FAILED
    return Exit.OK


def budget_verdicts(records: list[dict[str, Any]]) -> None:
    """A suite with a [fit] table: each cell's peak against the budget (qbench.cell.budget)."""
    from qbench.contract import sizes

    for record in records:
        if record.get("fit.budget_bytes") is None or "fit.within_budget" not in record:
            continue
        verdict = {True: "[green]within[/]", False: "[yellow]over[/]", None: "not judged:"}[record["fit.within_budget"]]
        why = f" {escape(str(record.get('fit.verdict_reason')))}" if record["fit.within_budget"] is None else ""
        console.print(f"{escape(record['cell_id'])}: peak {sizes.label(record.get('fit.peak_bytes'))} "
                      f"({record.get('fit.peak_bytes')} bytes), {verdict}{why} the limit of {record['fit.limit_bytes']:,} bytes",
                      highlight=False)


def cmd_list(args: argparse.Namespace) -> int:
    from qbench.cell.models import BUILTIN_MODELS
    from qbench.contract.tasks import BUILTIN_DATASETS

    shown = Table(title="precisions (matrix.precisions)")
    shown.add_column("name")
    shown.add_column("base weights")
    for name, precision in precisions.REGISTRY.items():
        shown.add_row(name, precision.description)
    console.print(shown)
    shown = Table(title="optimizers (train.optimizer, matrix.optimizers)")
    shown.add_column("name")
    shown.add_column("what")
    for name, optimizer in optimizers.REGISTRY.items():
        shown.add_row(name, optimizer.description)
    console.print(shown)
    shown = Table(title="builtin models (model.id = \"builtin:NAME\")")
    shown.add_column("name")
    shown.add_column("what")
    for name, what in BUILTIN_MODELS.items():
        shown.add_row(name, what)
    console.print(shown)
    shown = Table(title="builtin datasets (data.kind = \"builtin\", data.name = NAME)")
    shown.add_column("name")
    shown.add_column("task")
    shown.add_column("what")
    for name, (task, what) in BUILTIN_DATASETS.items():
        shown.add_row(name, task, what)
    console.print(shown)
    return Exit.OK


def cmd_env(args: argparse.Namespace) -> int:
    from qbench.machine.environment import machine_report

    if args.json:  # nothing but the JSON on standard output
        report = machine_report(args.device, args.compute_dtype)
        print(json.dumps(report, indent=1))
    else:
        with console.status("probing torch, CUDA, NVML and every weight format ..."):
            report = machine_report(args.device, args.compute_dtype)
        render.machine(report)
    return Exit.OK if "probe_error" not in report else Exit.FAILED


def cmd_report(args: argparse.Namespace) -> int:
    """Exit 0 with a report; 2 (one line) when an input holds no records, a file that is not a record, or
    records of different suites or settings (which are never averaged together), or when the report folder
    cannot be written or holds other files."""
    from qbench.analysis import load
    from qbench.analysis.report import write
    from qbench.contract import files
    from qbench.contract import records as results

    try:
        frame = load.load_results(args.run_dirs)
    except results.ResultsError as problem:
        render.error(str(problem))
        return Exit.BAD_INPUT
    mixed = load.identity_differences(frame)
    if mixed:
        render.error(
            f"{', '.join(args.run_dirs)}: the records describe different experiments and are not merged into one "
            f"report ({'; '.join(mixed[:3])}{f'; and {len(mixed) - 3} more' if len(mixed) > 3 else ''}); "
            "report each suite on its own"
        )
        return Exit.BAD_INPUT
    out = Path(args.out) if args.out else write.default_report_dir([Path(p) for p in args.run_dirs])
    shown = write.report_sections(frame, _report_settings(args.run_dirs))
    try:
        paths = write.write_report(frame, out, args.title, shown=shown)
    except (files.NotOwned, OSError) as problem:
        render.error(str(problem) if isinstance(problem, files.NotOwned) else str(files.OutputError.from_os_error(out, problem)))
        return Exit.BAD_INPUT
    render.sections(shown)
    console.print(f"{len(frame)} cells from {len(args.run_dirs)} input(s) -> html: {escape(str(paths['html']))}")
    console.print(f"also: {escape(str(paths['markdown']))}  {escape(str(paths['csv']))}  {escape(str(paths['parquet']))}  "
                  f"{escape(str(paths['summary_csv']))}", highlight=False)
    return Exit.OK


def _compare_settings(args: argparse.Namespace, new_paths: list[str]) -> Settings:
    """The suite's [compare] table (--suite, else the new run's own suite text), then --tolerance over it."""
    from qbench.analysis.gate import compare
    from qbench.contract.suite import load

    overrides = [compare.parse_tolerance(text) for text in args.tolerance or []]
    if args.suite:
        loaded = load(args.suite)
        return compare.Settings.build(loaded.suite.compare, overrides, args.noise_sigmas, f"suite {args.suite}")
    return compare.settings_of_runs(new_paths, overrides, args.noise_sigmas)


def _report_settings(paths: list) -> Settings | None:
    """The gate settings of the suite the runs recorded (the eval-set warnings compare with its tolerances);
    None (qbench's defaults) when the stored suite text has an unusable [compare] table."""
    from qbench.analysis.gate import compare

    try:
        return compare.settings_of_runs(paths)
    except SuiteError:
        return None


def _markdown_targets(args: argparse.Namespace) -> list[str]:
    """Where the Markdown verdict goes: --markdown, then $GITHUB_STEP_SUMMARY; SuiteError when one is a folder."""
    targets = [args.markdown] if args.markdown else []
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        targets.append(os.environ["GITHUB_STEP_SUMMARY"])
    for target, option in zip(targets, (["--markdown"] if args.markdown else []) + ["$GITHUB_STEP_SUMMARY"], strict=False):
        if target != "-" and Path(target).is_dir():
            raise SuiteError(COMMAND_LINE, [f"{option}: {target} is a folder; name a file to append the summary to"])
    return targets


def cmd_compare(args: argparse.Namespace) -> int:
    """Exit 0: no regression; 1: regression; 2: unusable input (nothing comparable, unreadable records,
    different experiments), or the Markdown summary cannot be written."""
    from qbench.analysis import load
    from qbench.analysis.gate import compare
    from qbench.contract import records as results

    targets = _markdown_targets(args)
    try:
        settings = _compare_settings(args, [args.new])
        baseline = load.load_results([args.baseline])
        new = load.load_results([args.new])
    except SuiteError as problem:
        comparison = compare.Comparison.unusable([f"{problem.path}: {p}" for p in problem.problems], args.baseline, args.new)
    except (results.ResultsError, ValueError) as problem:
        comparison = compare.Comparison.unusable([str(problem)], args.baseline, args.new)
    else:
        comparison = compare.compare(baseline, new, settings, args.baseline, args.new)
    markdown = comparison.markdown()
    unwritten = None
    for target in targets:
        try:
            if target == "-":
                sys.stdout.write(markdown + "\n")
            else:
                with open(target, "a", encoding="utf-8") as handle:
                    handle.write(markdown + "\n")
        except OSError as error:
            unwritten = f"cannot write the Markdown summary to {target}: {error.strerror or error}"
            break
    render.comparison(comparison)
    if unwritten:
        render.error(unwritten)
        return Exit.BAD_INPUT
    return comparison.exit_code


def cmd_baseline_refresh(args: argparse.Namespace) -> int:
    """Exit 0 when the baseline was replaced; 1 when a cell did not finish; 2 (before any cell) when the code
    is not a clean commit, the baselines folder cannot be written or the old baseline folder holds anything
    but an earlier baseline of this suite, or when the new baseline cannot be written (the old one is then
    left as it was)."""
    from qbench.analysis.gate import baseline
    from qbench.contract import records as results
    from qbench.contract.files import OutputError
    from qbench.contract.suite import load
    from qbench.machine.environment import git_commit
    from qbench.runner import plan

    loaded = load(args.suite)
    try:  # before any cell: the runs would measure code that no commit holds
        baseline.check_commit(git_commit(), args.allow_dirty)
    except baseline.BaselineError as problem:
        render.error(str(problem))
        return Exit.BAD_INPUT
    out = Path(args.out)
    check_out_folder(out, "--out")
    try:
        target = baseline.target_dir(out, loaded.suite.name)
    except baseline.BaselineError as problem:
        raise SuiteError(loaded.path, [f"name: {problem}"]) from None
    problem = baseline.replace_problem(target, loaded.suite.name)
    if problem:
        raise SuiteError(COMMAND_LINE, [f"--out: {problem}; it is not replaced (move it away first)"])
    with tempfile.TemporaryDirectory(prefix="qbench-baseline-") as scratch:
        for repeat in range(args.repeats):
            if args.repeats > 1:
                console.print(f"repeat {repeat + 1} of {args.repeats}")
            code = run_suite(plan.make(loaded, device=args.device, threads=args.threads), Path(scratch), args.device)
            if code != Exit.OK:
                errors.print(f"[red]the run did not finish cleanly (exit {code}); the baseline is left as it was[/]")
                return code
        try:
            target = baseline.install(results.find_run_dirs(scratch), out, loaded.suite.name, args.allow_dirty)
        except baseline.BaselineError as problem:
            render.error(str(problem))
            return Exit.FAILED
        except OSError as error:
            render.error(f"{OutputError.from_os_error(target, error)}; the baseline is left as it was")
            return Exit.BAD_INPUT
    console.print(f"baseline of suite [bold]{escape(loaded.suite.name)}[/] refreshed: {escape(str(target))} — review the diff and commit it")
    return Exit.OK
