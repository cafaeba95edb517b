"""A run's own outputs: results.csv (every field of every record) and summary.md (the report's sections, without
plots: the same story `qbench report` tells)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from qbench.analysis.load import exportable
from qbench.contract import files

if TYPE_CHECKING:
    from qbench.analysis.gate.compare import Settings
    from qbench.analysis.report.sections import Section


def write_run_outputs(run_dir: Path, frame: pd.DataFrame, settings: Settings | None = None,
                      shown: list[Section] | None = None) -> dict[str, Path]:
    """results.csv (every field of every record) and summary.md (every report section) in `run_dir`, each
    written atomically: a full disk leaves the old file (or none), never a torn one (OutputError)."""
    from qbench.analysis.report.write import markdown_document, report_sections

    run_dir = Path(run_dir)
    paths = {"csv": run_dir / "results.csv", "summary": run_dir / "summary.md"}
    files.write_text_atomic(paths["csv"], exportable(frame).to_csv(index=False))
    shown = shown if shown is not None else report_sections(frame, settings)
    title = f"{frame['suite'].iloc[0]} — run {run_dir.name}" if not frame.empty and "suite" in frame.columns else run_dir.name
    files.write_text_atomic(paths["summary"], markdown_document(title, shown))
    return paths
