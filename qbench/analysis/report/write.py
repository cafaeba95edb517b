"""`qbench report`: run directories -> report.csv / .parquet, summary.csv, report.md, plots and report.html, and the
list of sections every rendering of a report shows (summary.md after a run, report.md, the HTML page, the terminal)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from qbench.analysis import stats
from qbench.analysis.load import exportable
from qbench.analysis.report import grid, merge, paper, sections
from qbench.analysis.report.sections import ReportData, Section
from qbench.contract import fields, files

if TYPE_CHECKING:
    from qbench.analysis.gate.compare import Settings

# what a report says, in order: the verdict first, then the tables; add a part by adding its maker here
SECTIONS = (
    sections.answer_section,
    sections.verdict_section,
    sections.base_origin_section,
    sections.nonfinite_section,
    sections.warnings_section,
    sections.relative_section,
    sections.per_precision_section,
    sections.quality_section,
    sections.damage_section,
    merge.init_section,
    merge.merge_section,
    sections.weight_bytes_section,
    sections.memory_section,
    grid.scaling_section,
    grid.optimizer_state_section,
    sections.time_section,
    sections.contended_section,
    sections.failures_section,
    paper.paper_section,
    sections.provenance_section,
)
# the ones before the plots in report.md and the HTML page
LEADING = ("answer", "verdict", "base_origin", "nonfinite", "warnings")
PLOTS_DIR = "plots"


def report_sections(frame: pd.DataFrame, settings: Settings | None = None) -> list[Section]:
    """Every section of the report of `frame`, in SECTIONS order (`settings`: the suite's [compare] table)."""
    return sections.build(ReportData(frame, settings), SECTIONS)


def markdown_document(title: str, shown: list[Section], plot_files: list[tuple[str, str]] = ()) -> str:
    """The sections as one Markdown document: the leading ones, the plots (caption, relative path), the rest."""
    lines = [f"# {title}", ""]
    lines += [s.markdown() for s in shown if s.key in LEADING]
    for caption, file_name in plot_files:
        lines += [f"![{caption}]({file_name})", ""]
    lines += [s.markdown() for s in shown if s.key not in LEADING]
    return "\n".join(lines)


def default_report_dir(inputs: list[Path]) -> Path:
    """`RUN_DIR/report` for one run folder, `<name>-report` beside an exported table (`results.csv` ->
    `results-report/`); for several inputs, `report-<n>-runs` beside the first."""
    first = Path(inputs[0])
    if len(inputs) > 1:
        return first.parent / f"report-{len(inputs)}-runs"
    return first / "report" if first.is_dir() else first.with_name(f"{first.stem}-report")


def report_folder_problem(folder: Path) -> str | None:
    """Why `folder` may not be replaced by a new report, or None: it is new, empty, or holds only an earlier
    report as qbench wrote it (its marker, qbench.contract.files.OWNED_MARKER, lists every file; names alone
    prove nothing, a person's own report.md is theirs)."""
    problem = files.ownership_problem(folder)
    if problem:
        return f"{problem}; give --out a new or empty folder, or an earlier report's folder"
    return None


def _writable_for_parquet(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns as strings (None kept): records may hold a number in one cell and text in another."""
    fixed = frame.copy()
    for column in fixed.columns:
        if fixed[column].dtype == object:
            fixed[column] = fixed[column].map(lambda v: v if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
    return fixed


def write_report(frame: pd.DataFrame, out_dir: Path, title: str | None = None, settings: Settings | None = None,
                 shown: list[Section] | None = None) -> dict[str, Path]:
    """report.csv / report.parquet (every record field, plus within-run speed ratios), summary.csv, report.md,
    plots/*.png and a self-contained report.html (plots embedded) in `out_dir`; `shown`: the sections, when
    the caller made them already.

    The report is written in a folder beside `out_dir` and moved into place when complete, so a reader (or
    another `qbench report` at the same moment) sees an earlier report or this whole one. An existing
    `out_dir` is replaced only if it holds nothing but an earlier report as qbench wrote it (files.NotOwned otherwise, before
    anything is written); OutputError when a file cannot be written (a full disk), `out_dir` left as it was."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise files.NotOwned(f"{out_dir} is not a folder; give --out a new or empty folder")
    if out_dir.is_dir():
        problem = report_folder_problem(out_dir)
        if problem:
            raise files.NotOwned(f"{out_dir}: {problem}")
    staging = files.staging_dir(out_dir)
    try:
        written = _write_into(staging, frame, title, settings, shown)
    except OSError as error:  # name the file as the user knows it, not its place in the staging folder
        shutil.rmtree(staging, ignore_errors=True)
        failed = Path(error.filename) if error.filename else None
        where = out_dir / failed.relative_to(staging) if failed and failed.is_relative_to(staging) else out_dir
        raise files.OutputError(where, error.strerror or str(error), error.errno) from None
    try:
        files.publish_dir(staging, out_dir, written_by="qbench report")
    except files.NotOwned as problem:
        raise files.NotOwned(f"{problem}; give --out a new or empty folder, or an earlier report's folder") from None
    return {key: out_dir / path.relative_to(staging) for key, path in written.items()}


def _write_into(out_dir: Path, frame: pd.DataFrame, title: str | None, settings: Settings | None,
                shown: list[Section] | None) -> dict[str, Path]:
    from qbench.analysis.report import page as html  # matplotlib is imported only when a report is written
    from qbench.analysis.report import plots

    (out_dir / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    throughput = [c for c in fields.HEADLINE_THROUGHPUT if c in frame.columns]
    flat = stats.add_speed_ratios(frame, tuple(throughput)) if throughput else frame
    suites = ", ".join(dict.fromkeys(str(s) for s in frame.get("suite", pd.Series(["?"])).dropna()))
    title = title or f"qbench report — {suites}"
    paths = {
        "csv": out_dir / "report.csv",
        "parquet": out_dir / "report.parquet",
        "summary_csv": out_dir / "summary.csv",
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
    }
    exportable(flat).to_csv(paths["csv"], index=False)
    _writable_for_parquet(exportable(flat)).to_parquet(paths["parquet"], index=False)
    numeric = [c for c in flat.columns if fields.spec_for(c) is not None]
    stats.mean_and_spread(flat, numeric).to_csv(paths["summary_csv"])
    shown = shown if shown is not None else report_sections(frame, settings)
    figures = plots.all_plots(frame) + grid.grid_plots(frame)
    plot_files = []
    for plot in figures:
        path = out_dir / PLOTS_DIR / f"{plot.name}.png"
        path.write_bytes(plot.png)
        paths[f"plot:{plot.name}"] = path
        plot_files.append((plot.title, f"{PLOTS_DIR}/{plot.name}.png"))
    paths["markdown"].write_text(markdown_document(title, shown, plot_files), encoding="utf-8")
    paths["html"].write_text(html.page(title, shown, figures, LEADING), encoding="utf-8")
    return paths
