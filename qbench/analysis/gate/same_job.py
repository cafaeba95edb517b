"""The gate's verdict when the baseline's code ran again in the same job: the committed records judge exact
figures, quality, memory and health; the baseline side run here judges speed (qbench.analysis.gate.speed).

The committed baseline's speed was measured on another machine or at another moment, so it is never gated;
the new side's cells that the committed baseline has (arm and seed) are compared with it, the rest of the new
side's cells (more seeds, more runs) are speed samples only.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from qbench.analysis import load, stats
from qbench.analysis.gate import compare, speed
from qbench.contract import records as results


def cells_of(frame: pd.DataFrame, committed: pd.DataFrame) -> pd.DataFrame:
    """The rows of `frame` whose seed the committed baseline has (quality depends on the seed; the extra seeds
    the gate runs are speed samples)."""
    if "seed" not in frame.columns or "seed" not in committed.columns:
        return frame
    return frame[frame["seed"].isin(set(committed["seed"].dropna()))]


def speed_note(policy: speed.SpeedPolicy, reference_runs: int, new_runs: int) -> str:
    return (f"speed is judged against the baseline's code re-run in this job ({reference_runs} baseline and {new_runs} new "
            f"runs in turns): {policy.describe()}; the committed baseline's own speed figures (another machine or "
            "moment) and the within-run ratios are not gated")


def judge(committed_dir: Path | str, reference_dirs: list[Path], new_dirs: list[Path], policy: speed.SpeedPolicy,
          settings: compare.Settings | None = None, baseline_label: str = "baseline",
          new_label: str = "new") -> compare.Comparison:
    """The gate's verdict: `new_dirs` (this code's runs) against the committed baseline in `committed_dir` for
    every figure but speed, and against `reference_dirs` (the baseline's code, run in turns with them) for
    speed."""
    try:
        committed = load.load_results([committed_dir])
        new = load.load_results(new_dirs) if new_dirs else pd.DataFrame()
        reference = load.load_results(reference_dirs) if reference_dirs else pd.DataFrame()
        settings = settings or compare.settings_of_runs(new_dirs)
    except (results.ResultsError, ValueError) as problem:
        return compare.Comparison.unusable([str(problem)], baseline_label, new_label)
    if new.empty:
        return compare.Comparison.unusable(["the new side's runs wrote no record (see their logs)"], baseline_label, new_label)
    verdict = compare.compare(committed, cells_of(new, committed), replace(settings, speed_ratios=()),
                              str(committed_dir), new_label)
    if verdict.problems:
        return verdict
    rows, notes = _speed(reference, new, policy)
    checks = pd.concat([verdict.checks, pd.DataFrame(rows)], ignore_index=True) if rows else verdict.checks
    return compare.Comparison(checks, [], [*notes, *verdict.notes], baseline_label, new_label)


def _speed(reference: pd.DataFrame, new: pd.DataFrame, policy: speed.SpeedPolicy) -> tuple[list[dict], list[str]]:
    """The speed rows of every arm, and the notes that say how they were judged (or why not)."""
    runs = (reference["run_id"].nunique() if "run_id" in reference.columns else 0,
            new["run_id"].nunique() if "run_id" in new.columns else 0)
    if reference.empty:
        why = "not judged: the baseline's code wrote no record in this job (see its runs' logs)"
        return [_not_judged(new, arm, why) for arm in stats.arm_order(new)], [f"speed {why}"]
    axes = compare.grid_axes(reference, new)
    differs = compare.identity_problems(reference, new, axes)[:-1]
    if differs:
        why = "not judged: the baseline's code ran another experiment (" + "; ".join(differs[:3]) + ")"
        return [_not_judged(reference, arm, why) for arm in stats.arm_order(reference, axes)], [f"speed {why}"]
    return speed.speed_rows(reference, new, policy, axes), [speed_note(policy, *runs)]


def _not_judged(frame: pd.DataFrame, arm: str, why: str) -> dict:
    return {"precision": arm.split(" ")[0], "arm": arm, "metric": speed.FIGURE, "kind": "speed", "direction": "lower",
            "verdict": speed.NOT_JUDGED, "note": why}
