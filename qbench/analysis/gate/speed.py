"""Speed judged by a rank test: the two sides' samples of each arm (per-process figures, or steps), Mann–Whitney U.

One process's speed level on a shared CPU moves by tens of percent (memory layout, what else runs, its
caches), so a speed figure means something only against figures of the same kind measured beside it: the
gate runs the baseline's code and the new code in the same job, in turns (A B A B ...), and compares the
two sides' samples of each arm with a one-sided Mann–Whitney U test (scipy.stats.mannwhitneyu), as asv
continuous does. A change is declared only when the test rejects (p < alpha) *and* the medians differ by
more than `change`: the first keeps noise from failing the gate, the second keeps a real but negligible
difference from failing it. A side with too few samples for the test to reach p < alpha at all is "not
judged" — never "ok" — and the verdict says how many samples stood behind it.

What a sample is depends on the device (POLICIES): on a CPU each cell process gives one (its median
step), because the level of a process is the noise to average out; on a GPU the steps of one process
are stable enough to be the samples, so fewer processes are run.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Any, Literal

import pandas as pd

from qbench.analysis import stats

# a step's wall time less the time its thread waited for a core; where the kernel does not say, its wall time
FIGURE = "speed.step_unqueued_time_p50_s"
WALL_FIGURE = "speed.step_time_p50_s"
STEPS = "speed.step_unqueued_times_s"
NOT_JUDGED = "not judged"

Unit = Literal["process", "step"]


@dataclass(frozen=True)
class SpeedPolicy:
    """How the gate measures and judges speed on one kind of device.

    processes: cells per arm and side; blocks: runs per side, in turns with the other side's (A B A B ...),
    each running processes / blocks seeds; unit: what one sample of the rank test is (`process`: a cell's
    median step; `step`: every timed step); alpha: the test's one-sided level; change: the smallest
    relative difference of the medians that counts.
    """

    processes: int
    blocks: int
    unit: Unit
    alpha: float = 0.01
    change: float = 0.10

    @property
    def seeds_per_block(self) -> int:
        return max(1, math.ceil(self.processes / self.blocks))

    def describe(self) -> str:
        sample = "a cell process's median step" if self.unit == "process" else "one timed step"
        return (f"{self.blocks} runs per side in turns, {self.seeds_per_block * self.blocks} cell processes per arm and side; "
                f"one sample = {sample}; one-sided Mann–Whitney U at p < {self.alpha:g} and a median change beyond "
                f"{self.change:.0%}")


# cpu: benchmarks/speed_gate_trials.py measured these on a shared 2-core machine (docs/speed-gate.md);
# cuda: a GPU's step times within one process are steady, so its steps are the samples and two processes a side
POLICIES: dict[str, SpeedPolicy] = {
    "cpu": SpeedPolicy(processes=8, blocks=2, unit="process"),
    "cuda": SpeedPolicy(processes=2, blocks=2, unit="step"),
}


def policy_for(device: str, processes: int | None = None, blocks: int | None = None, unit: Unit | None = None,
               change: float | None = None, alpha: float | None = None) -> SpeedPolicy:
    """The policy of `device` (`cpu`, `cuda`, `cuda:1`), with any setting given here over it."""
    chosen = POLICIES["cuda" if device.startswith("cuda") else "cpu"]
    given = {"processes": processes, "blocks": blocks, "unit": unit, "change": change, "alpha": alpha}
    chosen = replace(chosen, **{k: v for k, v in given.items() if v is not None})
    if chosen.blocks > chosen.processes:
        chosen = replace(chosen, blocks=chosen.processes)
    return chosen


def smallest_p(n_a: int, n_b: int) -> float:
    """The smallest one-sided p-value an exact Mann–Whitney test can give with n_a and n_b samples (every
    sample of one side beyond every sample of the other): 1 / C(n_a + n_b, n_a); 1 without samples."""
    if n_a < 1 or n_b < 1:
        return 1.0
    return 1.0 / math.comb(n_a + n_b, n_a)


def fewest_samples(alpha: float) -> int:
    """The fewest samples per side (equal sides) with which the test can reach p < alpha."""
    n = 1
    while smallest_p(n, n) >= alpha:
        n += 1
    return n


@dataclass(frozen=True)
class Judgement:
    """One arm's figure: each side's median and sample count, the new over the baseline median, the one-sided
    p-values (new worse; new better), the verdict (ok / regression / improved / not judged) and why."""

    verdict: str
    baseline: float
    new: float
    n_baseline: int
    n_new: int
    ratio: float
    p_worse: float
    p_better: float
    note: str


def judge(baseline: list[float], new: list[float], alpha: float, change: float, lower_is_better: bool = True,
          what: str = "samples") -> Judgement:
    """Judge `new` against `baseline` (samples of one figure, e.g. step times): a regression when the test says
    new is worse (p < alpha) and its median is worse by more than `change`; improved the other way; ok when
    neither; not judged when a side has too few samples for the test to reject at all."""
    from scipy.stats import mannwhitneyu

    a, b = [float(v) for v in baseline if _finite(v)], [float(v) for v in new if _finite(v)]
    median_a = statistics.median(a) if a else float("nan")
    median_b = statistics.median(b) if b else float("nan")
    ratio = median_b / median_a if a and b and median_a else float("nan")
    if smallest_p(len(a), len(b)) >= alpha:
        need = fewest_samples(alpha)
        return Judgement(NOT_JUDGED, median_a, median_b, len(a), len(b), ratio, float("nan"), float("nan"),
                         f"{len(a)} baseline and {len(b)} new {what}: a rank test cannot reach p < {alpha:g} with so few "
                         f"(it needs {need} a side), so no verdict is given")
    worse, better = ("greater", "less") if lower_is_better else ("less", "greater")
    p_worse = float(mannwhitneyu(b, a, alternative=worse).pvalue)
    p_better = float(mannwhitneyu(b, a, alternative=better).pvalue)
    worse_by = (ratio - 1) if lower_is_better else (1 - ratio)
    shown = f"{worse_by:+.1%} worse" if worse_by >= 0 else f"{-worse_by:.1%} better"
    if p_worse < alpha and worse_by > change:
        verdict, why = "regression", f"{shown} (median), p = {p_worse:.2g} < {alpha:g}"
    elif p_better < alpha and -worse_by > change:
        verdict, why = "improved", f"{shown} (median), p = {p_better:.2g} < {alpha:g}"
    else:
        p = min(p_worse, p_better)
        verdict = "ok"
        why = (f"{shown} (median), p = {p:.2g}" + (f" but within the {change:.0%} that counts" if p < alpha else
                                                   f" >= {alpha:g}: no difference the test can tell"))
    return Judgement(verdict, median_a, median_b, len(a), len(b), ratio, p_worse, p_better,
                     f"{why}; {len(a)} baseline and {len(b)} new {what}")


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def figure_of(reference: pd.DataFrame, new: pd.DataFrame) -> str | None:
    """The per-process figure both sides have: the step's unqueued time, else its wall time (None: neither)."""
    for column in (FIGURE, WALL_FIGURE):
        if all(column in f.columns and pd.to_numeric(stats.ok_rows(f)[column], errors="coerce").notna().any()
               for f in (reference, new)):
            return column
    return None


def samples(frame: pd.DataFrame, labels: pd.Series, arm: str, unit: Unit, figure: str) -> list[float]:
    """An arm's samples in `frame`: each ok cell's `figure` (unit process) or each of its timed steps (unit step)."""
    ok = stats.ok_rows(frame)
    cells = ok[labels[ok.index] == arm]
    if unit == "process":
        return [float(v) for v in pd.to_numeric(cells[figure], errors="coerce").dropna()]
    steps: list[float] = []
    for value in cells.get(STEPS, pd.Series(dtype=object)):
        if isinstance(value, (list, tuple)):
            steps += [float(v) for v in value if _finite(v)]
    return steps


def speed_rows(reference: pd.DataFrame, new: pd.DataFrame, policy: SpeedPolicy, axes: list[str]) -> list[dict[str, Any]]:
    """One check row per arm of `reference` (the baseline's code, run in this job) against `new` (this code, run
    in turns with it): the per-arm judgement of the step time, in the rows `qbench compare` makes."""
    figure = figure_of(reference, new)
    unit = policy.unit
    if unit == "step" and not all(STEPS in f.columns for f in (reference, new)):
        unit = "process"  # records without each step's time: each process's median is the sample
    what = "cell processes" if unit == "process" else "timed steps"
    judged_by = ("same-job A/B, one-sided Mann–Whitney U over " + ("each process's median step" if unit == "process"
                                                                  else "every timed step") + f" ({figure})")
    ref_labels, new_labels = stats.arms(reference, axes), stats.arms(new, axes)
    precision = dict(zip(ref_labels, reference["precision"], strict=True)) if "precision" in reference.columns else {}
    rows = []
    for arm in stats.arm_order(reference, axes):
        row = {"precision": precision.get(arm, arm), "arm": arm, "metric": figure or FIGURE, "kind": "speed",
               "direction": "lower", "judged_by": judged_by, "tolerance": f"{policy.change:.0%} and p < {policy.alpha:g}"}
        if figure is None:
            rows.append({**row, "verdict": NOT_JUDGED, "note": "the records of one side hold no step time"})
            continue
        a = samples(reference, ref_labels, arm, unit, figure)
        b = samples(new, new_labels, arm, unit, figure)
        result = judge(a, b, policy.alpha, policy.change, what=what)
        rows.append({**row, "verdict": result.verdict, "baseline": result.baseline, "new": result.new,
                     "n_baseline": result.n_baseline, "n_new": result.n_new, "ratio": result.ratio,
                     "p_value": result.p_worse, "note": result.note})
    return rows
