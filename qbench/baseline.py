"""A suite's committed baseline: the records of one finished run, copied to results/baselines/<suite>/."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from qbench import results

DEFAULT_DIR = Path("results") / "baselines"
# what a baseline keeps of a run directory (logs and reports stay behind: they are large and local)
KEPT = ("run.json", results.RECORDS_DIR, "results.csv", "summary.md")


class BaselineError(RuntimeError):
    """The run cannot become a baseline (a cell did not finish)."""


def install(run_dir: Path, baselines_dir: Path, suite_name: str) -> Path:
    """Replace `baselines_dir/suite_name` with the records of `run_dir`; every cell must be ok."""
    records = results.read_records(run_dir)
    not_ok = [f"{r['cell_id']} ({r['status']})" for r in records if r["status"] != "ok"]
    if not records or not_ok:
        raise BaselineError(f"{run_dir}: not every cell finished ({', '.join(not_ok) or 'no records'}); the baseline is left as it was")
    target = Path(baselines_dir) / suite_name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{suite_name}.", dir=target.parent))
    try:
        for name in KEPT:
            source = Path(run_dir) / name
            if source.is_dir():
                shutil.copytree(source, staging / name)
            elif source.is_file():
                shutil.copy2(source, staging / name)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
