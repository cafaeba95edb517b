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
from rich.text import Text

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

# emoji codes off: rich would turn ":fire:" in an echoed path (or "nf4-seed0:train:error") into a picture, a
# text that is not in the file; markup stays on for qbench's own styling, and every echoed text is escaped (echo)
console = Console(emoji=False)
errors = Console(stderr=True, emoji=False)


def echo(value: object) -> str:
    """Any text qbench did not write itself (a path, a name, a caption, an error) made safe to interpolate into
    a rich markup string: shown as it is, on one line, never read as markup ("[bold]", "[/]")."""
    return escape(one_line(str(value)))


def plain(value: object) -> Text:
    """A table cell or header shown exactly as its text (tables read plain strings as markup)."""
    return Text(str(value))


def shell_quoted(path: object) -> str:
    """A path as a shell reads it back (quoted where it holds spaces or shell characters)."""
    import shlex

    return shlex.quote(str(path))


def one_line(text: str) -> str:
    """`text` with every character that is not printable (newlines, tabs, ESC and other terminal controls,
    U+2028...) written as its Python escape: whatever user text a message echoes, it stays one line and
    cannot move the cursor or colour the terminal."""
    if text.isprintable():
        return text
    try:  # a path as an ASCII locale names undecodable bytes (surrogate escapes): shown as the UTF-8 it is
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeError:
        pass
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def error(message: str) -> None:
    """One red line on standard error; the text is escaped (it may hold user input)."""
    errors.print(f"[red]error:[/] {echo(message)}", highlight=False, soft_wrap=True)


class ProgressListener:
    """Rich progress: one bar over cells, and one per running cell over its optimizer steps."""

    def __init__(self, progress: Progress, total_cells: int):
        self.progress = progress
        self.cells_task = progress.add_task("cells", total=total_cells)
        self.steps_tasks: dict[str, Any] = {}  # cell id -> its bar, while it runs
        self.where: dict[str, str] = {}  # cell id -> "(gpu 2) " when cells run in device slots

    def cell_started(self, cell: Cell, index: int, total: int) -> None:
        self.steps_tasks[cell.id] = self.progress.add_task(f"{echo(cell.id)}: starting", total=None)

    def cell_event(self, cell: Cell, event: dict[str, Any]) -> None:
        task = self.steps_tasks.get(cell.id)
        if task is None:
            return
        if event["event"] == "slot":
            self.where[cell.id] = f"({event['slot']}) "
        where = self.where.get(cell.id, "")
        if event["event"] == "slot":
            self.progress.update(task, description=f"{echo(where)}{echo(cell.id)}: starting")
        elif event["event"] == "phase":
            self.progress.update(task, description=f"{echo(where)}{echo(cell.id)}: {echo(event['phase'])}", total=event.get("total"),
                                 completed=0)
        elif event["event"] == "step":
            self.progress.update(
                task,
                description=f"{echo(where)}{echo(cell.id)}: train (loss {event['loss']:.3f})",
                completed=event["step"],
                total=event["total"],
            )

    def cell_finished(self, cell: Cell, record: dict[str, Any]) -> None:
        status = record["status"]
        style = "green" if status == "ok" else "red"
        message = f"[{style}]{echo(cell.id)}: {echo(status)}[/]"
        if status != "ok":
            message += f" — {echo(record.get('error'))}"
        self.progress.console.print(message, highlight=False)
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
    if started.resumed:
        ids = ", ".join(c.id for c in started.cells)
        console.print(f"qbench {echo(__version__)}: resuming [bold]{echo(started.suite)}[/] in {echo(started.run_dir)}: "
                      f"{len(started.cells)} of {started.total_cells:d} cells to run ({echo(ids)}) on {echo(started.where)}",
                      highlight=False)
    else:
        part = f", shard {started.shard[0]}/{started.shard[1]} of {started.matrix_cells}" if started.shard else ""
        console.print(f"qbench {echo(__version__)}: suite [bold]{echo(started.suite)}[/] ({len(started.cells)} cells{echo(part)}) on "
                      f"{echo(started.where)} -> {echo(started.run_dir)}", highlight=False)
    for line in started.lines:
        console.print(f"  {echo(line)}", highlight=False)
    for note in started.notes:
        console.print(f"  [dim]{echo(note)}[/]", highlight=False)
    for warning in started.warnings:
        errors.print(f"[yellow]warning:[/] {echo(warning)}", highlight=False, soft_wrap=True)


def run_result(result: RunResult, resumable: bool = True) -> int:
    """How a run or a resumption ended, in the terminal (the verdict and tables, what did not finish, where its
    files are and how to resume it: `resumable` False where its folder is a scratch one about to go); its exit
    code."""
    if result.interrupted:
        kept = f"; finished records are in {result.run_dir}" if resumable else ""
        errors.print(f"[yellow]interrupted:[/] {echo(result.interrupted + kept)}", highlight=False, soft_wrap=True)
        if resumable:
            errors.print(f"resume with: qbench run --resume {echo(shell_quoted(result.run_dir))}", highlight=False,
                         soft_wrap=True)
        return result.exit_code
    if result.error:
        error(result.error)
        return result.exit_code
    if result.note:
        console.print(echo(result.note), highlight=False)
    if result.tables:
        where = result.run_dir if resumable else "a scratch folder"
        console.print(f"[bold]{echo(result.suite)}[/] — {echo(where)}", highlight=False)
        run_end(result.sections, result.run_dir, result.tables, kept=resumable)
        budget_verdicts(result.records)
    if result.failed:
        errors.print(f"[red]{len(result.failed)} cell(s) did not finish:[/] {echo(', '.join(result.failed))}",
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
        shown = Table(title=plain(title) if title and n == 0 else None, show_lines=False)
        shown.add_column(plain(frame.index.name or ""), width=widths[0], overflow="fold")
        for column, column_width in zip(part.columns, widths[1:], strict=True):
            shown.add_column(plain(column), justify="left" if layout.is_text(part[column]) else "right", width=column_width,
                             overflow="fold")
        for index, row in part.iterrows():
            shown.add_row(plain(index), *(plain(format_value(v)) for v in row))
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
        console.print(Rule(f"[bold]{echo(section.title)}[/]", align="left", style="yellow" if section.key == "warnings" else "bold"),
                      width=min(layout_width() or 100, 100))
        if section.text:
            prose(section.text)
        if section.table is not None and not section.table.empty:
            print_tables(section.table, layout.turned(section.table, section.wide))
        if section.note:
            prose(section.note, style="dim")


# what the terminal shows at the end of a run: the answer first, the verdict, then the tables a person compares
RUN_END_SECTIONS = ("answer", "verdict", "nonfinite", "warnings", "relative", "per_precision", "failures")


def run_end(shown: list[Section], run_dir: Path, paths: dict[str, Path], kept: bool = True) -> None:
    """The end of `qbench run`: the run's sections, where its files are (when `kept`: not a scratch folder about
    to go), how to get the full report, and the answer once more as the last line."""
    sections(shown, RUN_END_SECTIONS)
    if not kept:
        answer(shown)
        return
    console.print(f"records: {echo(run_dir / 'cells')}   table: {echo(paths['csv'])}   "
                  f"summary: {echo(paths['summary'])}", highlight=False, soft_wrap=layout_width() is None)
    console.print(f"plots and the HTML page: [bold]qbench report {echo(shell_quoted(run_dir))}[/]", highlight=False,
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
        versions.add_row(plain(name), plain(version) if version else Text("not installed", style="red"))
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
        facts.add_row(plain(what), plain(value))
    console.print(facts)
    if torch_facts.get("devices"):
        devices = Table(title="GPUs (torch -> NVML)")
        for column in ("torch", "name", "capability", "memory MiB", "bf16", "NVML index", "matched"):
            devices.add_column(column)
        for d in torch_facts["devices"]:
            devices.add_row(*(plain(v) for v in (
                d["torch_device"], d["name"], d["capability"], f"{d['total_memory_bytes'] / MB:,.0f}", d["bf16_supported"],
                d.get("nvml_index"), d.get("nvml_match"),
            )))
        console.print(devices)
    for d in nvml.get("devices", []):
        console.print(f"NVML device {echo(d['nvml_index'])}: {echo(d['name'])} {echo(d['uuid'])}, used {d['used_bytes'] / MB:,.0f} of "
                      f"{d['total_bytes'] / MB:,.0f} MiB, per-process memory {echo(d['per_process_memory'])}", highlight=False)
    if "probe_error" in report:
        errors.print(f"[red]probe failed:[/] {echo(report['probe_error'])}", highlight=False)
        return
    formats = Table(title=plain(f"weight formats on {report['formats_device']} (quantize + forward + backward, compute "
                                f"{report['formats_compute_dtype']})"))
    for column in ("precision", "works", "output error vs fp32", "seconds", "error"):
        formats.add_column(column)
    for name, result in report["formats"].items():
        ok = result["status"] == "ok"
        formats.add_row(
            plain(name), Text("yes", style="green") if ok else Text("no", style="red"),
            plain(f"{result['output_rel_error']:.2%}" if ok else "—"), plain(f"{result['seconds']:.2f}"), plain(result.get("error", "")),
        )
    console.print(formats)


def comparison(result: Comparison) -> None:
    """The gate's verdict in the terminal: one line per regression, the notes, then the count."""
    from qbench.analysis.gate.markdown import checks_table

    if result.problems:
        for problem in result.problems:
            errors.print(f"[red]unusable:[/] {echo(problem)}", highlight=False, soft_wrap=True)
        return
    regressions = result.regressions
    # one line per regression: metric names are long, a table would cut them in a narrow terminal
    for _, row in checks_table(regressions).iterrows():
        detail = f"{row['baseline']} -> {row['new']} ({row['change']}; allowed {row['allowed worse by'] or '—'})"
        if row["verdict"] in ("failed", "missing") and row["note"]:
            detail = row["note"]
        console.print(f"[red]{echo(row['verdict'])}[/] {echo(row.get('arm', row.get('precision')))} {echo(row['metric'])}: {echo(detail)}",
                      highlight=False)
    speed_checks(result)
    for note in result.notes:
        console.print(f"[dim]note: {echo(note)}[/]", highlight=False)
    if len(regressions):
        errors.print(f"[red]regression:[/] {len(regressions)} check(s) failed (exit 1)")
    else:
        console.print(f"[green]no regression[/] in {len(result.checks)} checks")


def budget_verdicts(records: list[dict[str, Any]]) -> None:
    """A suite with a [fit] table: each cell's peak against the budget (qbench.cell.budget)."""
    from qbench.contract import sizes

    for record in records:
        if record.get("fit.budget_bytes") is None or "fit.within_budget" not in record:
            continue
        verdict = {True: "[green]within[/]", False: "[yellow]over[/]", None: "not judged:"}[record["fit.within_budget"]]
        why = f" {echo(str(record.get('fit.verdict_reason')))}" if record["fit.within_budget"] is None else ""
        console.print(f"{echo(record['cell_id'])}: peak {echo(sizes.label(record.get('fit.peak_bytes')))} "
                      f"({echo(record.get('fit.peak_bytes'))} bytes), {verdict:s}{why:s} the limit of {record['fit.limit_bytes']:,} bytes",
                      highlight=False)
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
        line = f"{echo(block.side)} run {block.turn + 1:d}: {block.seconds:.0f} s"
        if block.exit_code != 0:
            line += f" [red](qbench run exited {block.exit_code:d}: {echo(block.log)})[/]"
        self.progress.console.print(line + (f"  {echo(block.run_dir)}" if block.run_dir else ""), highlight=False)


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
        console.print(f"[dim]judged by: {echo(judged.iloc[0])}[/]", highlight=False)


def _ms(value: Any) -> str:
    return f"{value * 1e3:.2f} ms" if isinstance(value, float) and value == value else "—"


def gate_end(result: Any) -> None:
    """The gate's last line: how long it took, and where its runs are."""
    runs = [b.run_dir for b in result.runs.blocks if b.run_dir is not None]
    where = runs[0].parents[3] if runs else None  # OUT/<side>/<turn>/<suite>/<run-id>
    console.print(f"gate: {len(result.runs.blocks)} runs against commit {echo(result.commit[:12])} in {result.seconds:.0f} s"
                  + (f"; runs kept in {echo(where)}" if where else ""), highlight=False)


def history(table: pd.DataFrame, runs: pd.DataFrame, found: list[Any], plot: Path) -> None:
    """Each figure over the gate runs (columns: run id and commit), then the steps, then where the plot is."""
    labels = {int(r["id"]): f"{r['id']} {(r['git_commit'] or '?')[:7]}" for _, r in runs.iterrows()}
    shown = Table(title=f"gate history: {len(runs)} run(s), oldest first")
    for column in ("arm", "figure", *(labels.get(int(c), str(c)) for c in table.columns)):
        shown.add_column(plain(column), overflow="fold")
    for (_machine, arm, name), values in table.iterrows():
        shown.add_row(plain(arm), plain(name), *(plain(_value(name, v)) for v in values))
    console.print(shown)
    for step in found:
        console.print(f"[yellow]step[/] {echo(step.arm)} {echo(step.figure)}: {step.change:+.1%} "
                      f"({echo(_value(step.figure, step.before))} -> {echo(_value(step.figure, step.after))}) starting at gate run "
                      f"{echo(step.run)}, commit {echo((step.commit or '?')[:12])}", highlight=False)
    if not found:
        console.print("no step change in these runs")
    console.print(f"plot: {echo(plot)}", highlight=False)


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
