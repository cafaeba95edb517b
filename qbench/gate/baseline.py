"""A suite's committed baseline: the records of finished runs, copied to results/baselines/<suite>/<run-id>/.

Several runs of the same suite (repeats) make a steadier baseline: `qbench compare` averages them
and takes their spread as the noise floor, which matters most for speed ratios on a busy machine.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from qbench.results import records as results

DEFAULT_DIR = Path("results") / "baselines"
# what a baseline keeps of a run directory (logs and reports stay behind: they are large and local)
KEPT = ("run.json", results.RECORDS_DIR, "results.csv", "summary.md")


class BaselineError(RuntimeError):
    """The run cannot become a baseline (a cell did not finish)."""


def install(run_dirs: list[Path], baselines_dir: Path, suite_name: str) -> Path:
    """Replace `baselines_dir/suite_name` with the records of `run_dirs` (one folder each); every cell must be ok."""
    for run_dir in run_dirs:
        records = results.read_records(run_dir)
        not_ok = [f"{r['cell_id']} ({r['status']})" for r in records if r["status"] != "ok"]
        if not records or not_ok:
            raise BaselineError(f"{run_dir}: not every cell finished ({', '.join(not_ok) or 'no records'}); the baseline is left as it was")
    target = Path(baselines_dir) / suite_name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{suite_name}.", dir=target.parent))
    try:
        for run_dir in run_dirs:
            for name in KEPT:
                source = Path(run_dir) / name
                if source.is_dir():
                    shutil.copytree(source, staging / Path(run_dir).name / name)
                elif source.is_file():
                    (staging / Path(run_dir).name).mkdir(exist_ok=True)
                    shutil.copy2(source, staging / Path(run_dir).name / name)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
