"""A suite's committed baseline: the records of finished runs, copied to results/baselines/<suite>/<run-id>/.

Several runs of the same suite (repeats) make a steadier baseline: `qbench compare` averages them
and takes their spread as the noise floor, which matters most for speed ratios on a busy machine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from qbench.results import records as results

DEFAULT_DIR = Path("results") / "baselines"
# what a baseline keeps of a run directory (logs and reports stay behind: they are large and local)
KEPT = ("run.json", results.RECORDS_DIR, "results.csv", "summary.md")


# beside the runs: which commit the baseline measured, and whether its tree was clean
MANIFEST = "baseline.json"


class BaselineError(RuntimeError):
    """The run cannot become a baseline (a cell did not finish, or the code is not a commit)."""


def check_commit(commit: str | None, allow_dirty: bool = False) -> None:
    """BaselineError unless `commit` (environment.git_commit()) is a clean commit: a baseline made from
    uncommitted changes measures code no one can check out again. `allow_dirty` lets it through."""
    if allow_dirty:
        return
    if commit is None:
        raise BaselineError("the qbench source is not in a git checkout, so the baseline could not say which code it measured "
                            "(--allow-dirty makes it anyway)")
    if commit.endswith("+dirty"):
        raise BaselineError(f"the working tree has uncommitted changes ({commit}): a baseline must measure a commit; commit "
                            "or stash them first (--allow-dirty makes it anyway, and the baseline says so)")


def _commits(run_dirs: list[Path]) -> set[str]:
    return {str(r.get("env.git_commit")) for run_dir in run_dirs for r in results.read_records(run_dir)}


def install(run_dirs: list[Path], baselines_dir: Path, suite_name: str, allow_dirty: bool = False) -> Path:
    """Replace `baselines_dir/suite_name` with the records of `run_dirs` (one folder each) and a baseline.json
    naming the commit they measured. Every cell must be ok, and every record of one clean commit unless
    `allow_dirty` (BaselineError otherwise; the old baseline is then left as it was)."""
    for run_dir in run_dirs:
        records = results.read_records(run_dir)
        not_ok = [f"{r['cell_id']} ({r['status']})" for r in records if r["status"] != "ok"]
        if not records or not_ok:
            raise BaselineError(f"{run_dir}: not every cell finished ({', '.join(not_ok) or 'no records'}); the baseline is left as it was")
    commits = _commits(run_dirs)
    if len(commits) > 1 and not allow_dirty:
        raise BaselineError(f"the runs measured different code ({', '.join(sorted(commits))}); the baseline is left as it was")
    for commit in commits:
        check_commit(None if commit == "None" else commit, allow_dirty)
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
        manifest = {
            "suite": suite_name,
            "commit": sorted(commits)[0] if len(commits) == 1 else sorted(commits),
            "clean": all(not c.endswith("+dirty") and c != "None" for c in commits),
            "made": datetime.now(UTC).isoformat(timespec="seconds"),
            "runs": [Path(run_dir).name for run_dir in run_dirs],
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
