"""`qbench report`: several run directories -> report.csv / .parquet, summary.csv, report.md, plots and report.html."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qbench.report.tables import report_tables
from qbench.results import fields, stats


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


def _markdown(title: str, tables_shown: dict[str, pd.DataFrame], plot_files: list[tuple[str, str]]) -> str:
    lines = [f"# {title}", ""]
    for caption, file_name in plot_files:
        lines += [f"![{caption}]({file_name})", ""]
    for heading, table in tables_shown.items():
        lines += [f"## {heading}", "", table.to_markdown(floatfmt=".2f"), ""]
    return "\n".join(lines)


def write_report(frame: pd.DataFrame, out_dir: Path, title: str | None = None) -> dict[str, Path]:
    """report.csv / report.parquet (every record field, plus within-run speed ratios), summary.csv, report.md,
    plots/*.png and a self-contained report.html (plots embedded) in `out_dir`."""
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
    shown = report_tables(frame)
    figures = plots.all_plots(frame)
    plot_files = []
    for plot in figures:
        path = out_dir / "plots" / f"{plot.name}.png"
        path.write_bytes(plot.png)
        paths[f"plot:{plot.name}"] = path
        plot_files.append((plot.title, f"plots/{plot.name}.png"))
    paths["markdown"].write_text(_markdown(title, shown, plot_files), encoding="utf-8")
    paths["html"].write_text(html.page(title, shown, figures), encoding="utf-8")
    return paths
