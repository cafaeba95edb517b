"""Everything the command line shows with rich: progress bars, tables, the machine report, the gate's verdict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qbench import __version__

if TYPE_CHECKING:
    import pandas as pd

    from qbench.analysis.gate.compare import Comparison
    from qbench.analysis.report.sections import Section
    from qbench.contract.suite import Cell
    from qbench.runner.api import RunResult
    from qbench.runner.runner import RunStarted

console = Console()
errors = Console(stderr=True)


def one_line(text: str) -> str:
    """`text` with every character that is not printable (newlines, tabs, ESC and other terminal controls,
    U+2028...) written as its Python escape: whatever user text a message echoes, it stays one line and
    cannot move the cursor or colour the terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def error(message: str) -> None:
    """One red line on standard error; the text is escaped (it may hold user input)."""
    errors.print(f"[red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


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
            message += f" — {escape(one_line(str(record.get('error'))))}"
        self.progress.console.print(message)
        self.progress.advance(self.cells_task)
        task = self.steps_tasks.pop(cell.id, None)
        if task is not None:
            self.progress.remove_task(task)
        self.where.pop(cell.id, None)


class RunDisplay:
    """The command line's listener of a run: its header, then a progress bar over cells and one per running
    cell; `with RunDisplay() as display: run_suite(..., listener=display)` clears the bars at the end."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.bars: ProgressListener | None = None

    def __enter__(self) -> RunDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def run_started(self, started: RunStarted) -> None:
        run_header(started)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=console)
        self.progress.start()
        self.bars = ProgressListener(self.progress, len(started.cells))

    def cell_started(self, cell: Cell, index: int, total: int) -> None:
        if self.bars is not None:
            self.bars.cell_started(cell, index, total)

    def cell_event(self, cell: Cell, event: dict[str, Any]) -> None:
        if self.bars is not None:
            self.bars.cell_event(cell, event)

    def cell_finished(self, cell: Cell, record: dict[str, Any]) -> None:
        if self.bars is not None:
            self.bars.cell_finished(cell, record)


def run_header(started: RunStarted) -> None:
    """The lines above a run's progress bars: what runs where, the compute dtype and why, the threads, how cells
    start; then any note and warning."""
    suite, run_dir, where = escape(started.suite), escape(str(started.run_dir)), escape(started.where)
    if started.resumed:
        ids = ", ".join(c.id for c in started.cells)
        console.print(f"qbench {__version__}: resuming [bold]{suite}[/] in {run_dir}: {len(started.cells)} of "
                      f"{started.total_cells} cells to run ({escape(ids)}) on {where}")
    else:
        part = f", shard {started.shard[0]}/{started.shard[1]} of {started.matrix_cells}" if started.shard else ""
        console.print(f"qbench {__version__}: suite [bold]{suite}[/] ({len(started.cells)} cells{part}) on {where} -> {run_dir}")
    for line in started.lines:
        console.print(f"  {escape(line)}", highlight=False)
    for note in started.notes:
        console.print(f"  [dim]{escape(note)}[/]", highlight=False)
    for warning in started.warnings:
        errors.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


def run_result(result: RunResult) -> int:
    """How a run or a resumption ended, in the terminal (the verdict and tables, what did not finish, how to
    resume); its exit code."""
    from qbench.runner.api import RUN_END_SECTIONS

    if result.interrupted:
        errors.print(f"[yellow]interrupted:[/] {escape(result.interrupted)}", highlight=False, soft_wrap=True)
        errors.print(f"resume with: qbench run --resume {escape(str(result.run_dir))}", highlight=False, soft_wrap=True)
        return result.exit_code
    if result.error:
        error(result.error)
        return result.exit_code
    if result.note:
        console.print(escape(result.note), highlight=False)
    if result.tables:
        console.print(f"[bold]{escape(result.suite)}[/] — {escape(str(result.run_dir))}", highlight=False)
        sections(result.sections, RUN_END_SECTIONS)
        console.print(f"records: {result.run_dir / 'cells'}   table: {result.tables['csv']}   summary: {result.tables['summary']}")
    if result.failed:
        errors.print(f"[red]{len(result.failed)} cell(s) did not finish:[/] {escape(', '.join(result.failed))}",
                     highlight=False, soft_wrap=True)
    return result.exit_code


def table(frame: pd.DataFrame, title: str) -> Table:
    from qbench.analysis.report.tables import format_value

    shown = Table(title=title or None, show_lines=False)
    longest = max([len(str(i)) for i in frame.index] + [len(str(frame.index.name or ""))])
    shown.add_column(frame.index.name or "", min_width=min(longest, 26))  # row names wrap no more than they must
    for column in frame.columns:
        shown.add_column(str(column), justify="right")
    for index, row in frame.iterrows():
        shown.add_row(str(index), *(format_value(v) for v in row))
    return shown


def transposed(frame: pd.DataFrame, title: str) -> Table:
    """A table with one row per precision (or run) and many figures, turned so that precisions are
    the columns: a terminal (and a CI log, 80 columns wide) holds six precisions, not twenty figures."""
    turned = frame.T
    turned.index.name = ""
    return table(turned, title)


def sections(shown: list[Section], keys: tuple[str, ...] | None = None) -> None:
    """Report sections in the terminal, in their order (only `keys`, when given): the title as a rule, the prose
    as Markdown, the table (turned when it is wide), the note dimmed."""
    from rich.markdown import Markdown
    from rich.rule import Rule

    for section in shown:
        if keys is not None and section.key not in keys:
            continue
        console.print(Rule(f"[bold]{escape(section.title)}[/]", align="left", style="yellow" if section.key == "warnings" else "bold"))
        if section.text:
            console.print(Markdown(section.text))
        if section.table is not None and not section.table.empty:
            from qbench.analysis.report.grid import TURNED_MAX_ARMS, narrow

            shown = section.table
            if len(shown) > TURNED_MAX_ARMS and len(shown.columns) > 5:  # a grid's many arms: rows, and what fits
                shown = narrow(shown)
                console.print(f"[dim]{len(section.table.columns) - len(shown.columns)} more columns in summary.md[/]", highlight=False)
            turn = len(shown) <= TURNED_MAX_ARMS and (section.wide or len(shown.columns) > 5)  # 80 columns hold about six
            console.print(transposed(shown, "") if turn else table(shown, ""))
        if section.note:
            console.print(f"[dim]{escape(section.note)}[/]", highlight=False)


def machine(report: dict[str, Any]) -> None:
    """`qbench env`: versions, machine, GPUs and the weight formats tried on the device."""
    from qbench.analysis.report.tables import MB

    versions = Table(title="versions")
    versions.add_column("package")
    versions.add_column("version")
    for name, version in report["packages"].items():
        versions.add_row(name, version or "[red]not installed[/]")
    console.print(versions)
    torch_facts, nvml = report.get("torch", {}), report.get("nvml", {})
    facts = Table(title="machine", show_header=False)
    facts.add_column("what")
    facts.add_column("value")
    rows = [
        ("python", report["python"]), ("platform", report["platform"]), ("cpu", f"{report['cpu_model']} ({report['cpu_count']} cores)"),
        ("torch CUDA build", str(torch_facts.get("cuda_build"))), ("CUDA available", str(torch_facts.get("cuda_available"))),
        ("NVIDIA driver", str(nvml.get("driver_version"))),
        ("NVML", "available" if nvml.get("available") else f"unavailable: {nvml.get('reason')}"),
        *((k, str(v)) for k, v in report["environment"].items()),
    ]
    for what, value in rows:
        facts.add_row(what, value)
    console.print(facts)
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


def comparison(result: Comparison) -> None:
    """The gate's verdict in the terminal: one line per regression, the notes, then the count."""
    from qbench.analysis.gate.markdown import checks_table

    if result.problems:
        for problem in result.problems:
            errors.print(f"[red]unusable:[/] {escape(problem)}", highlight=False, soft_wrap=True)
        return
    regressions = result.regressions
    # one line per regression: metric names are long, a table would cut them in a narrow terminal
    for _, row in checks_table(regressions).iterrows():
        detail = f"{row['baseline']} -> {row['new']} ({row['change']}; allowed {row['allowed worse by'] or '—'})"
        if row["verdict"] in ("failed", "missing") and row["note"]:
            detail = row["note"]
        console.print(f"[red]{row['verdict']}[/] {row.get('arm', row.get('precision'))} {row['metric']}: {escape(detail)}",
                      highlight=False)
    for note in result.notes:
        console.print(f"[dim]note: {escape(note)}[/]", highlight=False)
    if len(regressions):
        errors.print(f"[red]regression:[/] {len(regressions)} check(s) failed (exit 1)")
    else:
        console.print(f"[green]no regression[/] in {len(result.checks)} checks")
