"""The `qbench` command line: parses arguments, calls the library, renders with rich."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qbench import __version__
from qbench.suite import precisions
from qbench.suite.spec import Cell, SuiteError

console = Console()
errors = Console(stderr=True)

EXIT_OK, EXIT_FAILED_CELLS, EXIT_BAD_INPUT = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal number, as a shell reports it
COMMAND_LINE = "command line"


class ProgressListener:
    """Rich progress: one bar over cells, and one per running cell over its optimizer steps."""

    def __init__(self, progress: Progress, total_cells: int):
        self.progress = progress
        self.cells_task = progress.add_task("cells", total=total_cells)
        self.steps_tasks: dict[str, Any] = {}  # cell id -> its bar, while it runs
        self.where: dict[str, str] = {}  # cell id -> "(gpu 2) " when cells run in device slots

    def cell_started(self, cell: Cell, index: int, total: int) -> None:
        self.steps_tasks[cell.id] = self.progress.add_task(f"{cell.id}: starting", total=None)

    def cell_event(self, cell: Cell, event: dict[str, Any]) -> None:
        task = self.steps_tasks.get(cell.id)
        if task is None:
            return
        where = self.where.get(cell.id, "")
        if event["event"] == "slot":
            self.where[cell.id] = f"({event['slot']}) "
            self.progress.update(task, description=f"{self.where[cell.id]}{cell.id}: starting")
        elif event["event"] == "phase":
            self.progress.update(task, description=f"{where}{cell.id}: {event['phase']}", total=event.get("total"), completed=0)
        elif event["event"] == "step":
            self.progress.update(
                task,
                description=f"{where}{cell.id}: train (loss {event['loss']:.3f})",
                completed=event["step"],
                total=event["total"],
            )

    def cell_finished(self, cell: Cell, record: dict[str, Any]) -> None:
        status = record["status"]
        style = "green" if status == "ok" else "red"
        message = f"[{style}]{cell.id}: {status}[/]"
        if status != "ok":
            message += f" — {escape(str(record.get('error')))}"
        self.progress.console.print(message)
        self.progress.advance(self.cells_task)
        task = self.steps_tasks.pop(cell.id, None)
        if task is not None:
            self.progress.remove_task(task)
        self.where.pop(cell.id, None)


def _render_table(table: Any, title: str) -> Table:
    from qbench.report.write import format_value

    shown = Table(title=title, show_lines=False)
    shown.add_column(table.index.name or "")
    for column in table.columns:
        shown.add_column(str(column), justify="right")
    for index, row in table.iterrows():
        shown.add_row(str(index), *(format_value(v) for v in row))
    return shown


def _placement(args: argparse.Namespace, loaded: Any) -> tuple[list[Any] | None, tuple[int, int] | None]:
    """Device slots from --gpus/--gpus-per-cell and the shard from --shard; SuiteError when they are wrong."""
    from qbench.run import scheduler

    problems = []
    slots = shard = None
    try:
        if args.gpus:
            slots = scheduler.gpu_slots(scheduler.parse_gpus(args.gpus), args.gpus_per_cell)
            if args.device == "cpu":
                problems.append("--gpus runs cells on GPUs; it cannot be combined with --device cpu")
            if args.gpus_per_cell > 1 and loaded.suite.model.device_map != "auto":
                problems.append(
                    f"--gpus-per-cell {args.gpus_per_cell}: a cell only spreads over several GPUs with "
                    'model.device_map = "auto" in the suite'
                )
        elif args.gpus_per_cell != 1:
            problems.append("--gpus-per-cell needs --gpus")
        if args.shard:
            shard = scheduler.parse_shard(args.shard)
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise SuiteError(COMMAND_LINE, problems)
    return slots, shard


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise SuiteError(COMMAND_LINE, [f"--seeds: {text!r} is not a comma-separated list of integers"]) from None
    if len(set(seeds)) != len(seeds) or not all(0 <= s < 2**32 for s in seeds):
        raise SuiteError(COMMAND_LINE, [f"--seeds: {text!r} must be distinct integers from 0 to 2**32-1"])
    return seeds


def cmd_run(args: argparse.Namespace) -> int:
    from qbench.run import runner, scheduler
    from qbench.suite import preflight as checks
    from qbench.suite.spec import load

    if args.resume:
        return _resume(args)
    if not args.suite:
        raise SuiteError(COMMAND_LINE, ["qbench run needs a suite file (or --resume RUN_DIR)"])
    if args.force:
        raise SuiteError(COMMAND_LINE, ["--force only goes with --resume"])
    loaded = load(args.suite)
    only = tuple(args.only.split(",")) if args.only else None
    if only:
        unknown = [p for p in only if p not in loaded.suite.matrix.precisions]
        if unknown:
            raise SuiteError(args.suite, [f"--only: {', '.join(unknown)} not in matrix.precisions ({', '.join(loaded.suite.matrix.precisions)})"])
    seeds = _parse_seeds(args.seeds) if args.seeds else None
    slots, shard = _placement(args, loaded)
    checks.check_suite(loaded)
    cells = loaded.cells(only, seeds)
    matrix_cells = len(cells)
    if shard:
        cells = scheduler.shard_cells(cells, *shard)
        if not cells:
            console.print(f"shard {shard[0]}/{shard[1]} of suite {loaded.suite.name} has no cells ({matrix_cells} in the matrix)")
            return EXIT_OK
    device = "cuda" if slots else runner.resolve_device(args.device)
    label = f"shard{shard[0]}of{shard[1]}" if shard else ""
    run_dir = runner.new_run_dir(Path(args.out), loaded.suite.name, label)
    where = f"{device}, {len(slots)} cells at a time ({', '.join(s.name for s in slots)})" if slots else device
    part = f", shard {shard[0]}/{shard[1]} of {matrix_cells}" if shard else ""
    console.print(f"qbench {__version__}: suite [bold]{loaded.suite.name}[/] ({len(cells)} cells{part}) on {where} -> {run_dir}")
    run = runner.Run(loaded, run_dir, device, cells, slots=slots or [scheduler.LOCAL_SLOT])
    run.write_manifest(
        {
            "shard": f"{shard[0]}/{shard[1]}" if shard else None,
            "matrix_cells": matrix_cells,
            "gpus": scheduler.parse_gpus(args.gpus) if args.gpus else None,
            "gpus_per_cell": args.gpus_per_cell if args.gpus else None,
        }
    )
    stopped, records = _execute(run)
    return stopped if stopped is not None else _finish(run_dir, records)


def _execute(run: Any) -> tuple[int | None, list[dict[str, Any]]]:
    """Run the cells with progress bars: (the exit code if the run was interrupted, else None; the records)."""
    from qbench.run import runner

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        run.listener = ProgressListener(progress, len(run.cells))
        try:
            return None, run.execute()
        except runner.RunInterrupted as stop:
            errors.print(f"[yellow]interrupted:[/] {escape(str(stop))}", highlight=False, soft_wrap=True)
            errors.print(f"resume with: qbench run --resume {escape(str(run.run_dir))}", highlight=False, soft_wrap=True)
            return (EXIT_SIGTERM if stop.signal_name == "SIGTERM" else EXIT_SIGINT), []


def _resume(args: argparse.Namespace) -> int:
    from qbench.results import records as results
    from qbench.run import resume, runner, scheduler
    from qbench.suite import preflight as checks

    given = [
        flag
        for flag, used in (
            ("SUITE", args.suite), ("--only", args.only), ("--seeds", args.seeds),
            ("--device", args.device != "auto"), ("--out", args.out != "results"),
        )
        if used
    ]
    if given:
        raise SuiteError(COMMAND_LINE, [f"--resume takes its settings from RUN_DIR/run.json; drop {', '.join(given)}"])
    state = resume.open_run(args.resume, force=args.force)
    slots, shard = _placement(args, state.loaded)
    if shard:
        raise SuiteError(COMMAND_LINE, ["--shard does not go with --resume: the run folder already holds its shard's cells"])
    if slots and state.device != "cuda":
        raise SuiteError(COMMAND_LINE, [f"--gpus: the run in {state.run_dir} ran on {state.device}, not cuda"])
    checks.check_suite(state.loaded)
    if state.pending:
        console.print(
            f"qbench {__version__}: resuming [bold]{state.loaded.suite.name}[/] in {state.run_dir}: "
            f"{len(state.pending)} of {len(state.cells)} cells to run ({', '.join(c.id for c in state.pending)}) on {state.device}"
        )
        resume.note_resume(state, forced=args.force)
        stopped, _ = _execute(
            runner.Run(state.loaded, state.run_dir, state.device, state.pending, slots=slots or [scheduler.LOCAL_SLOT])
        )
        if stopped is not None:
            return stopped
    else:
        console.print(f"nothing to resume in {state.run_dir}: every cell has an ok record")
    records = [results.read_record(results.record_path(state.run_dir, c.id)) for c in state.cells]
    return _finish(state.run_dir, [r for r in records if r is not None])


def _finish(run_dir: Path, records: list[dict[str, Any]]) -> int:
    from qbench.report import write as report
    from qbench.results import records as results

    frame = results.load_frame([run_dir])
    paths = report.write_run_outputs(run_dir, frame)
    console.print(_render_transposed(report.summary_table(frame), f"{frame['suite'].iloc[0]} — {run_dir}"))
    console.print(f"records: {run_dir / 'cells'}   table: {paths['csv']}   summary: {paths['summary']}")
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        listed = ", ".join(f"{r['cell_id']} ({r['status']}: {r.get('error_type')})" for r in failed)
        errors.print(f"[red]{len(failed)} cell(s) did not finish:[/] {escape(listed)}", highlight=False, soft_wrap=True)
        return EXIT_FAILED_CELLS
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from qbench.cell.models import BUILTIN_MODELS
    from qbench.data import registry

    table = Table(title="precisions (matrix.precisions)")
    table.add_column("name")
    table.add_column("base weights")
    for name, precision in precisions.REGISTRY.items():
        table.add_row(name, precision.description)
    console.print(table)
    table = Table(title="builtin models (model.id = \"builtin:NAME\")")
    table.add_column("name")
    table.add_column("what")
    for name, what in BUILTIN_MODELS.items():
        table.add_row(name, what)
    console.print(table)
    table = Table(title="builtin datasets (data.kind = \"builtin\", data.name = NAME)")
    table.add_column("name")
    table.add_column("task")
    table.add_column("what")
    for name, (task, what) in registry.BUILTIN_DATASETS.items():
        table.add_row(name, task, what)
    console.print(table)
    return EXIT_OK


def cmd_env(args: argparse.Namespace) -> int:
    import json

    from qbench.machine.environment import machine_report

    if args.json:  # nothing but the JSON on standard output
        report = machine_report(args.device, args.compute_dtype)
        print(json.dumps(report, indent=1))
    else:
        with console.status("probing torch, CUDA, NVML and every weight format ..."):
            report = machine_report(args.device, args.compute_dtype)
        _render_env(report)
    return EXIT_OK if "probe_error" not in report else EXIT_FAILED_CELLS


def _render_env(report: dict[str, Any]) -> None:
    from qbench.report.write import MB

    table = Table(title="versions")
    table.add_column("package")
    table.add_column("version")
    for name, version in report["packages"].items():
        table.add_row(name, version or "[red]not installed[/]")
    console.print(table)
    torch_facts, nvml = report.get("torch", {}), report.get("nvml", {})
    machine = Table(title="machine", show_header=False)
    machine.add_column("what")
    machine.add_column("value")
    rows = [
        ("python", report["python"]), ("platform", report["platform"]), ("cpu", f"{report['cpu_model']} ({report['cpu_count']} cores)"),
        ("torch CUDA build", str(torch_facts.get("cuda_build"))), ("CUDA available", str(torch_facts.get("cuda_available"))),
        ("NVIDIA driver", str(nvml.get("driver_version"))),
        ("NVML", "available" if nvml.get("available") else f"unavailable: {nvml.get('reason')}"),
        *((k, str(v)) for k, v in report["environment"].items()),
    ]
    for what, value in rows:
        machine.add_row(what, value)
    console.print(machine)
    if torch_facts.get("devices"):
        devices = Table(title="GPUs (torch -> NVML)")
        for column in ("torch", "name", "capability", "memory MiB", "bf16", "NVML index", "matched"):
            devices.add_column(column)
        for d in torch_facts["devices"]:
            devices.add_row(
                d["torch_device"], d["name"], d["capability"], f"{d['total_memory_bytes'] / MB:,.0f}", str(d["bf16_supported"]),
                str(d.get("nvml_index")), str(d.get("nvml_match")),
            )
        console.print(devices)
    for d in nvml.get("devices", []):
        console.print(f"NVML device {d['nvml_index']}: {d['name']} {d['uuid']}, used {d['used_bytes'] / MB:,.0f} of "
                      f"{d['total_bytes'] / MB:,.0f} MiB, per-process memory {d['per_process_memory']}", highlight=False)
    if "probe_error" in report:
        errors.print(f"[red]probe failed:[/] {report['probe_error']}", highlight=False)
        return
    formats = Table(title=f"weight formats on {report['formats_device']} (quantize + forward + backward, compute {report['formats_compute_dtype']})")
    for column in ("precision", "works", "output error vs fp32", "seconds", "error"):
        formats.add_column(column)
    for name, result in report["formats"].items():
        ok = result["status"] == "ok"
        formats.add_row(
            name, "[green]yes[/]" if ok else "[red]no[/]",
            f"{result['output_rel_error']:.2%}" if ok else "—", f"{result['seconds']:.2f}", result.get("error", ""),
        )
    console.print(formats)
def _render_transposed(table: Any, title: str) -> Table:
    """A table with one row per precision (or run) and many figures, turned so that precisions are
    the columns: a terminal (and a CI log, 80 columns wide) holds six precisions, not twenty figures."""
    turned = table.T
    turned.index.name = ""
    return _render_table(turned, title)


def cmd_report(args: argparse.Namespace) -> int:
    from qbench.report import write as report
    from qbench.results import records as results

    try:
        frame = results.load_results(args.run_dirs)
    except results.ResultsError as error:
        errors.print(f"[red]error:[/] {error}", highlight=False)
        return EXIT_BAD_INPUT
    out = Path(args.out) if args.out else report.default_report_dir([Path(p) for p in args.run_dirs])
    paths = report.write_report(frame, out, args.title)
    for heading, table in report.report_tables(frame).items():
        wide = heading.startswith(("Per precision", "Runs merged"))
        console.print(_render_transposed(table, heading) if wide else _render_table(table, heading))
    console.print(f"{len(frame)} cells from {len(args.run_dirs)} input(s) -> html: {paths['html']}")
    console.print(f"also: {paths['markdown']}  {paths['csv']}  {paths['parquet']}  {paths['summary_csv']}", highlight=False)
    return EXIT_OK


def _compare_settings(args: argparse.Namespace, new_paths: list[str]) -> Any:
    """The suite's [compare] table (--suite, else the new run's own suite text), then --tolerance over it."""
    from qbench.gate import compare
    from qbench.results import records as results
    from qbench.suite.spec import load, parse_compare

    overrides = [compare.parse_tolerance(text) for text in args.tolerance or []]
    if args.suite:
        loaded = load(args.suite)
        return compare.Settings.build(loaded.suite.compare, overrides, args.noise_sigmas, f"suite {args.suite}")
    for path in new_paths:
        for run_dir in results.find_run_dirs(path) if Path(path).is_dir() else []:
            manifest = results.read_manifest(run_dir)
            if manifest and manifest.get("suite_text"):
                spec = parse_compare(manifest["suite_text"], run_dir / "run.json")
                return compare.Settings.build(spec, overrides, args.noise_sigmas, f"suite of {run_dir.name}")
    return compare.Settings.build(None, overrides, args.noise_sigmas)


def cmd_compare(args: argparse.Namespace) -> int:
    import os

    from qbench.gate import compare
    from qbench.results import records as results

    try:
        settings = _compare_settings(args, [args.new])
        baseline = results.load_results([args.baseline])
        new = results.load_results([args.new])
    except SuiteError as error:
        comparison = compare.Comparison.unusable([f"{error.path}: {p}" for p in error.problems], args.baseline, args.new)
    except (results.ResultsError, ValueError) as error:
        comparison = compare.Comparison.unusable([str(error)], args.baseline, args.new)
    else:
        comparison = compare.compare(baseline, new, settings, args.baseline, args.new)
    markdown = comparison.markdown()
    targets = [args.markdown] if args.markdown else []
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        targets.append(os.environ["GITHUB_STEP_SUMMARY"])
    for target in targets:
        if target == "-":
            sys.stdout.write(markdown + "\n")
        else:
            with open(target, "a", encoding="utf-8") as handle:
                handle.write(markdown + "\n")
    _print_comparison(comparison)
    return comparison.exit_code


def _print_comparison(comparison: Any) -> None:
    from qbench.gate import compare

    if comparison.problems:
        for problem in comparison.problems:
            errors.print(f"[red]unusable:[/] {problem}", highlight=False)
        return
    regressions = comparison.regressions
    # one line per regression: metric names are long, a table would cut them in a narrow terminal
    for _, row in compare.checks_table(regressions).iterrows():
        detail = f"{row['baseline']} -> {row['new']} ({row['change']}; allowed {row['allowed worse by'] or '—'})"
        if row["verdict"] in ("failed", "missing") and row["note"]:
            detail = row["note"]
        console.print(f"[red]{row['verdict']}[/] {row['precision']} {row['metric']}: {detail}", highlight=False)
    for note in comparison.notes:
        console.print(f"[dim]note: {note}[/]", highlight=False)
    if len(regressions):
        errors.print(f"[red]regression:[/] {len(regressions)} check(s) failed (exit 1)")
    else:
        console.print(f"[green]no regression[/] in {len(comparison.checks)} checks")


def cmd_baseline_refresh(args: argparse.Namespace) -> int:
    import tempfile

    from qbench.gate import baseline
    from qbench.results import records as results
    from qbench.suite.spec import load

    loaded = load(args.suite)
    with tempfile.TemporaryDirectory(prefix="qbench-baseline-") as scratch:
        for repeat in range(args.repeats):
            if args.repeats > 1:
                console.print(f"repeat {repeat + 1} of {args.repeats}")
            # parsed, not built by hand, so every option of `qbench run` gets its default
            code = cmd_run(build_parser().parse_args(["run", args.suite, "--out", scratch, "--device", args.device]))
            if code != EXIT_OK:
                errors.print(f"[red]the run did not finish cleanly (exit {code}); the baseline is left as it was[/]")
                return code
        try:
            target = baseline.install(results.find_run_dirs(scratch), Path(args.out), loaded.suite.name)
        except baseline.BaselineError as error:
            errors.print(f"[red]error:[/] {error}", highlight=False)
            return EXIT_FAILED_CELLS
    console.print(f"baseline of suite [bold]{loaded.suite.name}[/] refreshed: {target} — review the diff and commit it")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qbench",
        description="Run the same LoRA fine-tune under every base weight format (16-bit, LLM.int8, FP4, NF4, "
        "with and without double quantization) and compare memory, speed and quality.",
    )
    parser.add_argument("--version", action="version", version=f"qbench {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a suite: one process per (precision, seed) cell, one JSON record each",
        description="Run every cell of SUITE (a TOML file) and write records, results.csv and summary.md into "
        "OUT/<suite>/<run-id>/. Exit 0 when every cell is ok, 1 when a cell failed, 2 on a bad suite.",
    )
    run.add_argument("suite", nargs="?", help="suite file, e.g. suites/clip.toml")
    run.add_argument("--out", default="results", help="folder for run directories (default: results)")
    run.add_argument("--only", metavar="PRECISIONS", help="comma-separated subset of the matrix, e.g. bf16,nf4-dq")
    run.add_argument("--seeds", metavar="SEEDS", help="comma-separated seeds overriding matrix.seeds, e.g. 0,1,2")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    run.add_argument(
        "--gpus",
        metavar="LIST",
        help="run cells in parallel, one process per GPU (CUDA_VISIBLE_DEVICES set per cell), e.g. 0,1,2,3; "
        "list a GPU twice to run two cells side by side on it",
    )
    run.add_argument(
        "--gpus-per-cell",
        type=int,
        default=1,
        metavar="N",
        help='give each cell N GPUs of --gpus (for a base too large for one GPU; needs model.device_map = "auto")',
    )
    run.add_argument(
        "--shard",
        metavar="I/N",
        help="run only the I-th of N deterministic parts of the matrix (split a run over machines or CI jobs; "
        "load all the shards' run folders together to report them as one run)",
    )
    run.add_argument(
        "--resume", metavar="RUN_DIR",
        help="finish a stopped run: run only the cells of RUN_DIR without an ok record, with the suite, cells and "
        "device recorded in RUN_DIR/run.json",
    )
    run.add_argument("--force", action="store_true", help="with --resume: resume even if the suite file changed since")
    run.set_defaults(handler=cmd_run)

    env = commands.add_parser(
        "env",
        help="versions, device, CUDA/driver, NVML, and which weight formats work here (each one tried)",
        description="Show versions, the device, CUDA and driver, NVML, and which weight formats work on DEVICE: each is "
        "tried (quantize, forward and backward a small layer) in a separate process.",
    )
    env.add_argument("--device", default="auto", help="where to try the formats: auto (default), cpu, cuda, cuda:N")
    env.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(handler=cmd_env)
    report = commands.add_parser(
        "report",
        help="tables and plots from one or more run directories (CSV, Parquet, Markdown, HTML)",
        description="Merge the records of every RUN_DIR (run directories, folders of them, or exported CSV / "
        "Parquet tables: shards of one suite on several machines merge into one report) and write report.csv, "
        "report.parquet, summary.csv, report.md, plots/*.png and a self-contained report.html.",
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory, a folder of them, or a results CSV/Parquet")
    report.add_argument("--out", help="output folder (default: RUN_DIR/report, or report-N-runs beside the first)")
    report.add_argument("--title", help="page title (default: qbench report — SUITE)")
    report.set_defaults(handler=cmd_report)

    comparing = commands.add_parser(
        "compare",
        help="regression gate: NEW against BASELINE, exit 0 ok, 1 regression, 2 unusable input",
        description="Compare the records of NEW against BASELINE (run directories, folders of them, or exported "
        "CSV). Exact metrics must match, quality and memory may move the worse way by their tolerance (or the "
        "seeds' noise), speed is compared only as ratios to the baseline precision within one run. Tolerances: "
        "--tolerance, then the suite's [compare.tolerances], then qbench's defaults. Writes a Markdown summary "
        "to --markdown and, when set, $GITHUB_STEP_SUMMARY. Exit 0: no regression; 1: regression; 2: unusable input.",
    )
    comparing.add_argument("baseline", metavar="BASELINE", help="baseline records, e.g. results/baselines/ci")
    comparing.add_argument("new", metavar="NEW", help="new records (run directory, folder of them, or CSV)")
    comparing.add_argument("--suite", help="take the [compare] settings from this suite file (default: the new run's suite)")
    comparing.add_argument("--tolerance", action="append", metavar="PATTERN=SPEC",
                           help="e.g. 'quality.*recall@1=abs:0.05' or 'ratio.*=rel:0.5' or 'memory.*=ignore'; repeatable")
    comparing.add_argument("--noise-sigmas", type=float, help="standard errors of seed noise allowed (default: suite, 3)")
    comparing.add_argument("--markdown", metavar="FILE", help="append the Markdown summary to FILE ('-': standard output)")
    comparing.set_defaults(handler=cmd_compare)

    baselines = commands.add_parser("baseline", help="manage committed baselines (results/baselines/<suite>/)")
    baseline_commands = baselines.add_subparsers(dest="baseline_command", required=True, metavar="ACTION")
    refresh = baseline_commands.add_parser(
        "refresh",
        help="run SUITE and make its records the suite's committed baseline",
        description="Run every cell of SUITE (--repeats times) and, when every cell is ok, replace OUT/<suite>/ "
        "with the runs' records (<run-id>/run.json, cells/, results.csv, summary.md). Review the diff and commit it.",
    )
    refresh.add_argument("suite", help="suite file, e.g. suites/ci.toml")
    refresh.add_argument("--out", default=str(Path("results") / "baselines"), help="baselines folder (default: results/baselines)")
    refresh.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    refresh.add_argument("--repeats", type=int, default=1, choices=range(1, 11), metavar="N",
                         help="run the suite N times (1-10): compare averages them and takes their spread as noise")
    refresh.set_defaults(handler=cmd_baseline_refresh)

    listing = commands.add_parser("list", help="show precisions, builtin models and builtin datasets")
    listing.set_defaults(handler=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SuiteError as error:
        for problem in error.problems:
            errors.print(f"[red]error:[/] {escape(f'{error.path}: {problem}')}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # before any cell started (checks, device probe): nothing to keep
        errors.print("[yellow]interrupted[/]")
        return EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
