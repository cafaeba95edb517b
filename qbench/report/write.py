"""`qbench report`: run directories -> report.csv / .parquet, summary.csv, report.md, plots and report.html, and the
list of sections every rendering of a report shows (summary.md after a run, report.md, the HTML page, the terminal)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from qbench.report import paper, sections
from qbench.report.sections import ReportData, Section
from qbench.results import fields, stats

if TYPE_CHECKING:
    from qbench.gate.compare import Settings

# what a report says, in order: the verdict first, then the tables; add a part by adding its maker here
SECTIONS = (
    sections.verdict_section,
    sections.base_origin_section,
    sections.nonfinite_section,
    sections.warnings_section,
    sections.relative_section,
    sections.per_precision_section,
    sections.quality_section,
    sections.damage_section,
    sections.weight_bytes_section,
    sections.memory_section,
    sections.time_section,
    sections.contended_section,
    sections.failures_section,
    paper.paper_section,
    sections.provenance_section,
)
# the ones before the plots in report.md and the HTML page
LEADING = ("verdict", "base_origin", "nonfinite", "warnings")


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


def default_report_dir(run_dirs: list[Path]) -> Path:
    """`RUN_DIR/report` for one run; for several, `report-<n>-runs` beside the first."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    return Path(run_dirs[0]).parent / f"report-{len(run_dirs)}-runs"


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
    the caller made them already."""
    from qbench.report import page as html  # matplotlib is imported only when a report is written
    from qbench.report import plots

    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
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
    flat.to_csv(paths["csv"], index=False)
    _writable_for_parquet(flat).to_parquet(paths["parquet"], index=False)
    numeric = [c for c in flat.columns if fields.spec_for(c) is not None]
    stats.mean_and_spread(flat, numeric).to_csv(paths["summary_csv"])
    shown = shown if shown is not None else report_sections(frame, settings)
    figures = plots.all_plots(frame)
    plot_files = []
    for plot in figures:
        path = out_dir / "plots" / f"{plot.name}.png"
        path.write_bytes(plot.png)
        paths[f"plot:{plot.name}"] = path
        plot_files.append((plot.title, f"plots/{plot.name}.png"))
    paths["markdown"].write_text(markdown_document(title, shown, plot_files), encoding="utf-8")
    paths["html"].write_text(html.page(title, shown, figures, LEADING), encoding="utf-8")
    return paths
