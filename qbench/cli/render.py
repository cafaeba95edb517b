"""Everything the command line shows with rich: progress bars, tables, the machine report, the gate's verdict."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qbench import __version__
from qbench.analysis.report import layout

if TYPE_CHECKING:
    from pathlib import Path

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
        run_end(result.sections, result.run_dir, result.tables)
    if result.failed:
        errors.print(f"[red]{len(result.failed)} cell(s) did not finish:[/] {escape(', '.join(result.failed))}",
                     highlight=False, soft_wrap=True)
    return result.exit_code


def layout_width() -> int | None:
    """The width tables and prose are laid out for: the terminal's (or COLUMNS, when set); None when the output
    goes to a file or a pipe, which wraps long lines itself: nothing there is cut or folded to feign 80 columns."""
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return console.width
    return None


def table(frame: pd.DataFrame, title: str, width: int | None = None) -> list[Table]:
    """`frame` (display strings) as rich tables that fit `width` (None: unbounded, nothing wrapped): the columns
    split into as many tables as it takes, each repeating the row names, so that no cell is ever cut; words
    and headers wrap at their spaces, and a column too wide for the width alone folds."""
    from qbench.analysis.report.tables import format_value

    made = []
    for n, group in enumerate(layout.column_groups(frame, width)):
        part = frame.iloc[:, group]
        widths = layout.widths(frame, group, width) if width is not None else [None] * (len(group) + 1)
        if width is not None and layout.FRAME + sum(w + 3 for w in widths) > width:  # one column wider than the line
            widths = [widths[0]] + [max(1, width - layout.FRAME - widths[0] - 6)] * len(group)
        shown = Table(title=(title or None) if n == 0 else None, show_lines=False)
        shown.add_column(str(frame.index.name or ""), width=widths[0], overflow="fold")
        for column, column_width in zip(part.columns, widths[1:], strict=True):
            shown.add_column(str(column), justify="left" if layout.is_text(part[column]) else "right", width=column_width,
                             overflow="fold")
        for index, row in part.iterrows():
            shown.add_row(str(index), *(format_value(v) for v in row))
        made.append(shown)
    return made


def transposed(frame: pd.DataFrame, title: str, width: int | None = None) -> list[Table]:
    """A table with one row per precision (or run) and many figures, turned so that precisions are
    the columns (split into groups of precisions where they do not fit the width)."""
    return table(layout.turn(frame), title, width)


def prose(markdown: str, style: str | None = None) -> None:
    """Markdown prose: wrapped at the terminal's width, or as long lines where the output is piped."""
    from rich.markdown import Markdown

    width = layout_width()
    if width is not None:
        console.print(Markdown(markdown, style=style or "none"))
        return
    with unbounded(), console.capture() as captured:  # one long line per paragraph, the padding taken off
        console.print(Markdown(markdown, style=style or "none"))
    console.out("\n".join(line.rstrip() for line in captured.get().splitlines()), highlight=False)


@contextmanager
def unbounded() -> Iterator[None]:
    """Lay out as wide as the content is (output to a file or a pipe, which wraps long lines itself)."""
    width = console.width
    console.width = UNBOUNDED
    try:
        yield
    finally:
        console.width = width


UNBOUNDED = 100_000


def as_records(frame: pd.DataFrame) -> str:
    """A table of sentences as Markdown, one block per row: its name in bold, then each column's text."""
    blocks = []
    for index, row in frame.iterrows():
        lines = [f"**{index}**"] + [f"- {column}: {value}" for column, value in row.items() if str(value) not in ("", "—")]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def print_tables(frame: pd.DataFrame, turn: bool) -> None:
    """A section's table: turned (rows as columns) where asked, split into tables that fit the width; a table
    of sentences that does not fit in one piece is written row by row instead (repeated row names would
    stand between every sentence and the next)."""
    width = layout_width()
    shown_frame = frame.T if turn else frame
    text_columns = sum(layout.is_text(shown_frame[c]) for c in shown_frame.columns)
    if not turn and width is not None and len(layout.column_groups(frame, width)) > 1 and 2 * text_columns > len(frame.columns):
        prose(as_records(frame))
        return
    for shown in (transposed(frame, "", width) if turn else table(frame, "", width)):
        if width is None:
            with unbounded():
                console.print(shown)
        else:
            console.print(shown, width=width)


def sections(shown: list[Section], keys: tuple[str, ...] | None = None) -> None:
    """Report sections in the terminal, in their order (only `keys`, when given): the title as a rule, the prose
    as Markdown, the table (turned when it is wide, split where it does not fit), the note dimmed."""
    from rich.rule import Rule

    for section in shown:
        if keys is not None and section.key not in keys:
            continue
        console.print(Rule(f"[bold]{escape(section.title)}[/]", align="left", style="yellow" if section.key == "warnings" else "bold"),
                      width=min(layout_width() or 100, 100))
        if section.text:
            prose(section.text)
        if section.table is not None and not section.table.empty:
            print_tables(section.table, layout.turned(section.table, section.wide))
        if section.note:
            prose(section.note, style="dim")


# what the terminal shows at the end of a run: the answer first, the verdict, then the tables a person compares
RUN_END_SECTIONS = ("answer", "verdict", "nonfinite", "warnings", "relative", "per_precision", "failures")


def run_end(shown: list[Section], run_dir: Path, paths: dict[str, Path]) -> None:
    """The end of `qbench run`: the run's sections, where its files are, how to get the full report, and the
    answer once more as the last line."""
    import shlex

    sections(shown, RUN_END_SECTIONS)
    console.print(f"records: {escape(str(run_dir / 'cells'))}   table: {escape(str(paths['csv']))}   "
                  f"summary: {escape(str(paths['summary']))}", highlight=False, soft_wrap=layout_width() is None)
    console.print(f"plots and the HTML page: [bold]qbench report {escape(shlex.quote(str(run_dir)))}[/]", highlight=False,
                  soft_wrap=layout_width() is None)
    answer(shown)


def answer(shown: list[Section]) -> None:
    """The answer section's text once more, last: what a person reads when the run ends."""
    for section in shown:
        if section.key == "answer":
            prose(f"**Answer:** {section.text}" if not section.text.startswith("- ") else f"**Answer:**\n\n{section.text}")


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
    speed_checks(result)
    for note in result.notes:
        console.print(f"[dim]note: {escape(note)}[/]", highlight=False)
    if len(regressions):
        errors.print(f"[red]regression:[/] {len(regressions)} check(s) failed (exit 1)")
    else:
        console.print(f"[green]no regression[/] in {len(result.checks)} checks")


class GateProgress:
    """The gate's progress: one line per finished run (side, turn, seconds, exit code) under a bar over the runs."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=console)
        self.task: Any = None

    def __enter__(self) -> GateProgress:
        self.progress.start()
        self.task = self.progress.add_task("gate: runs (baseline's code and this code in turns)", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def block(self, block: Any, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)
        status = "" if block.exit_code == 0 else f" [red](qbench run exited {block.exit_code}: {escape(str(block.log))})[/]"
        self.progress.console.print(f"{block.side} run {block.turn + 1}: {block.seconds:.0f} s{status}"
                                    + (f"  {escape(str(block.run_dir))}" if block.run_dir else ""), highlight=False)


def speed_checks(result: Comparison) -> None:
    """Every speed check in the terminal: arm, each side's median, the change, samples, p, verdict."""
    import pandas as pd

    checks = result.checks
    if checks.empty or "kind" not in checks.columns:
        return
    speed = checks[checks["kind"] == "speed"]
    if speed.empty:
        return
    shown = Table(title="speed: this code against the baseline's code, run in turns in this job")
    for column in ("arm", "baseline", "new", "change", "samples", "p (slower)", "verdict"):
        shown.add_column(column)
    for _, row in speed.iterrows():
        ratio, p = row.get("ratio"), row.get("p_value")
        shown.add_row(str(row["arm"]), _ms(row.get("baseline")), _ms(row.get("new")),
                      f"{ratio - 1:+.1%}" if isinstance(ratio, float) and ratio == ratio else "—",
                      f"{int(row['n_baseline'])}/{int(row['n_new'])}" if pd.notna(row.get("n_baseline")) else "—",
                      f"{p:.2g}" if isinstance(p, float) and p == p else "—", str(row["verdict"]))
    console.print(shown)
    judged = speed["judged_by"].dropna() if "judged_by" in speed.columns else pd.Series(dtype=object)
    if len(judged):
        console.print(f"[dim]judged by: {escape(str(judged.iloc[0]))}[/]", highlight=False)


def _ms(value: Any) -> str:
    return f"{value * 1e3:.2f} ms" if isinstance(value, float) and value == value else "—"


def gate_end(result: Any) -> None:
    """The gate's last line: how long it took, and where its runs are."""
    runs = [b.run_dir for b in result.runs.blocks if b.run_dir is not None]
    where = runs[0].parents[3] if runs else None  # OUT/<side>/<turn>/<suite>/<run-id>
    console.print(f"gate: {len(result.runs.blocks)} runs against commit {result.commit[:12]} in {result.seconds:.0f} s"
                  + (f"; runs kept in {escape(str(where))}" if where else ""), highlight=False)


def history(table: pd.DataFrame, runs: pd.DataFrame, found: list[Any], plot: Path) -> None:
    """Each figure over the gate runs (columns: run id and commit), then the steps, then where the plot is."""
    labels = {int(r["id"]): f"{r['id']} {(r['git_commit'] or '?')[:7]}" for _, r in runs.iterrows()}
    shown = Table(title=f"gate history: {len(runs)} run(s), oldest first")
    for column in ("arm", "figure", *(labels.get(int(c), str(c)) for c in table.columns)):
        shown.add_column(column, overflow="fold")
    for (_machine, arm, name), values in table.iterrows():
        shown.add_row(str(arm), str(name), *(_value(name, v) for v in values))
    console.print(shown)
    for step in found:
        console.print(f"[yellow]step[/] {escape(step.arm)} {escape(step.figure)}: {step.change:+.1%} "
                      f"({_value(step.figure, step.before)} -> {_value(step.figure, step.after)}) starting at gate run {step.run}, "
                      f"commit {(step.commit or '?')[:12]}", highlight=False)
    if not found:
        console.print("no step change in these runs")
    console.print(f"plot: {escape(str(plot))}", highlight=False)


def _value(figure: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if figure.endswith(".ratio"):
        return f"{value:.3f}"
    if figure.endswith("_s"):
        return f"{value * 1e3:.2f} ms"
    if figure.endswith("_bytes"):
        return f"{value / 2**20:.1f} MiB"
    return f"{value:.4g}"
