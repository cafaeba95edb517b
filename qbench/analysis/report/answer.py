"""The run's answer in one line, written from its figures: what each precision saves against the baseline, what
it costs in quality (with the interval), and what this device could not measure. A grid gets one line per value
of its other axes (each arm against its baseline arm, as in the verdict)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pandas as pd

from qbench.analysis import stats
from qbench.analysis.report.tables import format_value
from qbench.analysis.report.verdict import MIXED_MARK, Verdict, smaller_by
from qbench.contract import fields


def _names(arms: list[str]) -> str:
    """"int8", "int8 and nf4", "int8, fp4 and nf4"."""
    return arms[0] if len(arms) == 1 else f"{', '.join(arms[:-1])} and {arms[-1]}"


def _precision_of(arm: str) -> str:
    return arm.split(" ", 1)[0]


def _rest_of(arm: str) -> str:
    """The other axes' part of an arm label (`nf4-dq adamw8bit` -> `adamw8bit`); "" in a suite without them."""
    return arm.split(" ", 1)[1] if " " in arm else ""


def _sizes(table: pd.DataFrame, arms: list[str], bases: dict[str, str], column: str, verb: tuple[str, str] = ("", "")) -> str:
    """"int8 stores the base 46 % smaller than dense; fp4 and nf4 69 % smaller": arms with the same rounded
    figure against the same baseline arm named together, the largest saving first."""
    clusters: dict[tuple[str, str], list[str]] = defaultdict(list)
    largest: dict[tuple[str, str], float] = {}
    for arm in arms:
        value = table.loc[arm, column] if column in table.columns else float("nan")
        if pd.isna(value):
            continue
        key = (smaller_by(value), bases[arm])
        clusters[key].append(_precision_of(arm))
        largest[key] = max(largest.get(key, float("-inf")), float(value))
    parts, first_base = [], None
    for words, base in sorted(clusters, key=lambda key: -largest[key]):
        names = clusters[(words, base)]
        versus = f" than {base}" if base != first_base else ""
        if first_base is None:
            said = verb[len(names) > 1]
            parts.append(f"{_names(names)} {said + ' ' if said else ''}" + (f"{words}{versus}" if words != "the same" else f"the same as {base}"))
            first_base = base
        else:
            parts.append(f"{_names(names)} " + (words + versus if words != "the same" else f"the same as {base}"))
    return "; ".join(parts)


def _quality(comparison: stats.QualityComparison, arms: list[str]) -> str:
    """"in mean recall@1 after fine-tuning, int8 and nf4-dq show no difference the eval can detect (95 %
    intervals of the differences within ±7.9 points); nf4 is better by 7.8 points [+0.1, +15.5]"."""
    factor, unit = fields.scale(comparison.column)
    points = "points" if unit == "%" else ""
    level = f"{100 * comparison.confidence:g} %"
    table = comparison.table
    same, judged, unjudged = [], [], []
    reach = 0.0
    for arm in arms:
        if arm not in table.index:
            continue
        row = table.loc[arm]
        verdict = row["verdict"]
        if verdict == stats.NO_DIFFERENCE:
            same.append(_precision_of(arm))
            if pd.notna(row["delta_low"]):
                reach = max(reach, abs(row["delta_low"]) * factor, abs(row["delta_high"]) * factor)
        elif verdict in (stats.BETTER, stats.WORSE, stats.DIFFERS):
            word = "differs" if verdict == stats.DIFFERS else f"is {verdict}"
            judged.append(f"{_precision_of(arm)} {word} by {format_value(abs(row['delta']) * factor, 1)} {points}".rstrip()
                          + f" [{format_value(row['delta_low'] * factor, 1, True)}, {format_value(row['delta_high'] * factor, 1, True)}]")
        elif verdict == stats.NO_INTERVAL:
            unjudged.append(f"{_precision_of(arm)} {format_value(row['delta'] * factor, 1, True)} {points}".rstrip())
    parts = []
    if same:
        verb = "shows" if len(same) == 1 else "show"
        within = f" (differences up to {format_value(reach, 1)} {points} cannot be ruled out at {level})".replace("  ", " ") if reach else ""
        parts.append(f"{_names(same)} {verb} {stats.NO_DIFFERENCE}{within}")
    parts += judged
    if unjudged:
        parts.append(f"{', '.join(unjudged)} ({stats.NO_INTERVAL})")  # why: in the verdict's notes, once
    if not parts:
        return ""
    return f"in {fields.quality_name(comparison.column)}, " + "; ".join(parts)


def _line(frame: pd.DataFrame, relative: stats.Relative, verdict: Verdict, arms: list[str]) -> str:
    status = stats.arm_status(frame)
    bases = {arm: relative.base_of(arm) for arm in arms}
    compared = [arm for arm in arms if bases[arm] not in (None, arm)]
    failed = [arm for arm in compared if status.get(arm, "ok") != "ok" and not (stats.arms(frame)[stats.ok_rows(frame).index] == arm).any()]
    measured = [arm for arm in compared if arm not in failed]
    table = relative.table
    said = set(verdict.not_meaningful_everywhere) & set(DEVICE_FIGURES)
    sentences = []
    sizes = _sizes(table, measured, bases, "weights_less_pct", ("stores the base", "store the base"))
    if sizes:
        sentences.append(sizes)
    if "peak memory" not in said and "memory_less_pct" in table.columns:
        memory = _sizes(table, measured, bases, "memory_less_pct")
        if memory:
            sentences.append(f"peak memory: {memory}")
    if "speed" not in said and "speed_x" in table.columns:
        mixed = table["speed_mixed"] if "speed_mixed" in table.columns else pd.Series(False, index=table.index)
        speeds = [f"{_precision_of(a)} {format_value(table.loc[a, 'speed_x'], 2)}×" + (f" ({MIXED_MARK})" if mixed.get(a) else "")
                  for a in measured if pd.notna(table.loc[a, "speed_x"])]
        if speeds:
            sentences.append(f"train at {', '.join(speeds)} {bases[measured[0]]}'s speed")
    if relative.quality is not None:
        quality = _quality(relative.quality, measured)
        if quality:
            sentences.append(quality)
    if failed:
        sentences.append(f"{_names([_precision_of(a) for a in failed])}: no figures ({', '.join(status[a] for a in failed)})")
    return "; ".join(sentences) if sentences else ""


# what a device may be unable to measure meaningfully (a CPU: memory under the runtime's, speed of CPU kernels)
DEVICE_FIGURES = ("peak memory", "speed")


def _unmeasured(verdict: Verdict) -> str:
    """"this CPU could not measure peak memory or speed meaningfully (measure them on a GPU)", or ""."""
    said = [name for name in DEVICE_FIGURES if name in verdict.not_meaningful_everywhere]
    if not said:
        return ""
    device = {"cpu": "CPU", "cuda": "GPU"}.get(verdict.device, verdict.device)
    elsewhere = " (measure them on a GPU)" if verdict.device == "cpu" else ""
    return f"this {device} could not measure {' or '.join(said)} meaningfully{elsewhere}"


@dataclass(frozen=True)
class Answer:
    """The answer: one line per value of a grid's other axes (one line for a suite of precisions and seeds), and
    what this device could not measure, said once."""

    lines: tuple[str, ...]
    unmeasured: str = ""

    def markdown(self) -> str:
        """One sentence for one line; a grid's lines as a list, then the device's limit."""
        if len(self.lines) == 1:
            return f"{self.lines[0]}; {self.unmeasured}." if self.unmeasured else f"{self.lines[0]}."
        listed = "\n".join(f"- {line}." for line in self.lines)
        return listed + (f"\n\n{self.unmeasured[0].upper()}{self.unmeasured[1:]}." if self.unmeasured else "")


def answer(frame: pd.DataFrame, verdict: Verdict) -> Answer | None:
    """The answer of `frame` (speed ratios added), from its verdict and its figures against the baseline; one line
    saying why there is none when no cell of the baseline precision finished; None without records."""
    if frame.empty or "precision" not in frame.columns:
        return None
    relative = stats.relative(frame)
    if relative is None:
        baseline = stats.baseline_precision(frame)
        if not baseline:
            return None
        if (stats.ok_rows(frame)["precision"] == baseline).any():  # ok, but none of the figures an answer compares
            return Answer((f"No answer: the cells of the baseline precision {baseline} finished without base weights, peak "
                           "memory or speed figures, so nothing could be compared with them",))
        return Answer((f"No answer: no cell of the baseline precision {baseline} finished, so nothing could be compared "
                       "with it",))
    groups: dict[str, list[str]] = defaultdict(list)
    for arm in stats.arm_order(frame):
        groups[_rest_of(arm)].append(arm)
    lines = []
    for rest, arms in groups.items():
        line = _line(frame, relative, verdict, arms)
        if line:
            lines.append(f"{rest}: {line}" if rest else line)
    return Answer(tuple(lines), _unmeasured(verdict)) if lines else None
