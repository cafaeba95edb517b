"""A suite's committed baseline: the records of finished runs, copied to results/baselines/<suite>/<run-id>/.

Several runs of the same suite (repeats) make a steadier baseline: `qbench compare` averages them
and takes their spread as the noise floor, which matters most for speed ratios on a busy machine.

Replacing a baseline removes the old one, so it is done only after proving that the old folder holds
nothing but an earlier baseline of the same suite, and by moving the new one in whole (see results.files).
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

from qbench.contract import files
from qbench.contract import records as results

DEFAULT_DIR = Path("results") / "baselines"
# what a baseline keeps of a run directory (logs and reports stay behind: they are large and local)
KEPT = ("run.json", results.RECORDS_DIR, "results.csv", "summary.md")


# beside the runs: which commit the baseline measured, and whether its tree was clean
MANIFEST = "baseline.json"


class BaselineError(RuntimeError):
    """The run cannot become a baseline (a cell did not finish, or the code is not a commit), or the old
    baseline cannot be replaced."""


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


def target_dir(baselines_dir: Path | str, suite_name: str) -> Path:
    """`baselines_dir/<suite>`; BaselineError when the suite name is not one folder name."""
    try:
        return files.child(baselines_dir, suite_name, "suite name")
    except ValueError as error:
        raise BaselineError(str(error)) from None


def replace_problem(target: Path, suite_name: str) -> str | None:
    """Why the folder `target` may not be replaced by a baseline of `suite_name`, or None: it does not exist,
    is empty, or holds only what an earlier `baseline refresh` wrote there (its marker lists every file as
    written: qbench.contract.files.ownership_problem), a baseline.json and run folders of that suite (their
    records and run.json say so)."""
    if not target.exists() and not target.is_symlink():
        return None
    if target.is_symlink() or not target.is_dir():
        return f"{target} is not a baseline folder (not a folder)"
    owned = files.ownership_problem(target)
    if owned:
        return f"{target} {owned}"
    try:
        for run in sorted(target.iterdir()):
            if run.name == files.OWNED_MARKER:
                continue
            if run.name == MANIFEST and run.is_file() and not run.is_symlink():
                manifest = results.read_record(run)
                if manifest is None or manifest.get("suite", suite_name) != suite_name:
                    return f"{run} is not the baseline.json of suite {suite_name!r}"
                continue
            if run.is_symlink() or not run.is_dir():
                return f"{target} holds {run.name}, which is not a baseline's run folder"
            extra = [entry.name for entry in run.iterdir() if entry.name not in KEPT]
            if extra:
                return f"{run} holds {', '.join(extra[:3])}, which a baseline does not keep"
            suites = {str(r.get("suite")) for r in results.read_records(run)}
            manifest = results.read_manifest(run) or {}
            if "suite" in manifest:
                suites.add(str(manifest["suite"]))
            if suites != {suite_name}:
                found = f"suite {', '.join(sorted(suites))[:60]!r}" if suites else "no records"
                return f"{run} is not a run of suite {suite_name!r} ({found})"
    except results.ResultsError as problem:
        return f"{problem}, which a baseline does not hold"
    except OSError as error:
        return f"{target} cannot be read ({error.strerror or error})"
    return None


def install(run_dirs: list[Path], baselines_dir: Path, suite_name: str, allow_dirty: bool = False) -> Path:
    """Replace `baselines_dir/suite_name` with the records of `run_dirs` (one folder each) and a baseline.json
    naming the commit they measured. Every cell must be ok and of `suite_name`, every record of one clean
    commit unless `allow_dirty`, and the old folder must hold only an earlier baseline of that suite
    (BaselineError otherwise; the old baseline is then left as it was). OutputError when the new baseline
    cannot be written: the old one is then left as it was too."""
    target = target_dir(baselines_dir, suite_name)
    if not run_dirs:
        raise BaselineError("no finished run to make a baseline of; the baseline is left as it was")
    for run_dir in run_dirs:
        try:
            records = results.read_records(run_dir)
        except results.ResultsError as problem:
            raise BaselineError(f"{problem}; the baseline is left as it was") from None
        not_ok = [f"{r['cell_id']} ({r['status']})" for r in records if r["status"] != "ok"]
        if not records or not_ok:
            raise BaselineError(f"{run_dir}: not every cell finished ({', '.join(not_ok) or 'no records'}); the baseline is left as it was")
        other = sorted({str(r.get("suite")) for r in records} - {suite_name})
        if other:
            raise BaselineError(f"{run_dir}: holds records of suite {', '.join(other)}, not {suite_name}; the baseline is left as it was")
    commits = _commits(run_dirs)
    if len(commits) > 1 and not allow_dirty:
        raise BaselineError(f"the runs measured different code ({', '.join(sorted(commits))}); the baseline is left as it was")
    for commit in commits:
        check_commit(None if commit == "None" else commit, allow_dirty)
    problem = replace_problem(target, suite_name)
    if problem:
        raise BaselineError(f"{problem}; the baseline is left as it was (move it away to replace it)")
    staging = files.staging_dir(target)
    try:
        for run_dir in run_dirs:
            into = staging / Path(run_dir).name
            into.mkdir()
            for name in KEPT:
                source = Path(run_dir) / name
                if source.is_dir():  # records only: attempt tokens and stray files stay behind
                    shutil.copytree(source, into / name, ignore=shutil.ignore_patterns(".*"))
                elif source.is_file():
                    shutil.copy2(source, into / name)
        manifest = {
            "suite": suite_name,
            "commit": sorted(commits)[0] if len(commits) == 1 else sorted(commits),
            "clean": all(not c.endswith("+dirty") and c != "None" for c in commits),
            "made": datetime.now(UTC).isoformat(timespec="seconds"),
            "runs": [Path(run_dir).name for run_dir in run_dirs],
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise files.OutputError(target, error.strerror or str(error), error.errno) from None
    try:
        return files.publish_dir(staging, target, lambda folder: replace_problem(folder, suite_name),
                                 written_by="qbench baseline refresh")
    except files.NotOwned as problem:
        raise BaselineError(f"{problem}; the baseline is left as it was") from None
