"""The verdict: per precision, in words, what it saves and costs against the baseline precision, and which figure
this device could not measure meaningfully (and where to measure it instead). On a grid (qbench.contract.grid) a line
is an arm — the precision with every other axis that varies, `nf4-dq adamw8bit` — against its baseline arm.

This is the one source of the verdict every renderer shows (terminal, summary.md, report.md, HTML):
they format `Verdict`, they never compute one.

Conventions, the same in every table: a size is "smaller / larger than the baseline by" a percentage; a
ratio is a multiple of the baseline's figure (above 1: more of it, e.g. faster for samples/s); a quality
difference carries its interval, and a precision is called better or worse only when the interval
excludes 0 — else "no difference the eval can detect".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from qbench.analysis import stats
from qbench.analysis.report.tables import MB, format_value
from qbench.contract import fields

# a peak of which the process held this share before the model was loaded says little about the format
RUNTIME_DOMINATED_SHARE = 0.5
# a record key the speed measurement may set when the machine's load disturbed a cell's timing
CONTENDED_FLAG = "speed.contended"
# how a speed ratio of cells timed in different sessions of a resumed run is marked, wherever it is shown
MIXED_MARK = "mixed sessions"


@dataclass(frozen=True)
class Figure:
    """One figure of a verdict line: what it is, the words, and whether this device measured it meaningfully."""

    name: str  # weights, peak memory, quality, speed
    text: str
    meaningful: bool = True
    named: bool = True  # the sentence puts the name before the text (a quality figure names its metric itself)


@dataclass(frozen=True)
class Line:
    """One precision's verdict."""

    precision: str
    baseline: bool
    status: str  # "ok", or what went wrong, e.g. "failed in 1 of 2 cells (OutOfMemoryError)"
    figures: tuple[Figure, ...] = ()

    @property
    def not_meaningful(self) -> list[str]:
        return [f.name for f in self.figures if not f.meaningful]

    def sentence(self, said: tuple[str, ...] = ()) -> str:
        """The line in words, without markup: "nf4-dq: weights 61 % smaller than bf16 (...); ...; not measured
        meaningfully here: peak memory, speed" (`said`: figures the verdict says once for every line)."""
        head = f"{self.precision}" + (" (the baseline)" if self.baseline else "")
        if not self.figures:
            return f"{head}: {self.status}"
        text = f"{head}: " + "; ".join(f"{f.name} {f.text}" if f.named else f.text for f in self.figures)
        if self.status != "ok":
            text += f" ({self.status})"
        unsaid = [name for name in self.not_meaningful if name not in said]
        if unsaid:
            text += f" — not measured meaningfully here: {', '.join(unsaid)}"
        return text

    def markdown(self, said: tuple[str, ...] = ()) -> str:
        return f"**{self.precision}**" + self.sentence(said).removeprefix(self.precision)


@dataclass(frozen=True)
class Verdict:
    """The verdict of a frame of records: one line per precision, then notes on where to measure what this
    device could not (each note once), and the conventions the figures follow."""

    baseline: str | None
    device: str
    lines: tuple[Line, ...]
    notes: tuple[str, ...] = ()
    conventions: str = ""
    warnings: tuple[str, ...] = field(default=())

    @property
    def not_meaningful_everywhere(self) -> tuple[str, ...]:
        """The figures no line could measure meaningfully on this device (said once, not on every line)."""
        measured = [line for line in self.lines if line.figures]
        if len(measured) < 2:
            return ()
        common = set(measured[0].not_meaningful).intersection(*(line.not_meaningful for line in measured[1:]))
        return tuple(name for name in measured[0].not_meaningful if name in common)

    def markdown(self) -> str:
        said = self.not_meaningful_everywhere
        parts = ["\n".join(f"- {line.markdown(said)}" for line in self.lines)]
        if said:
            device = {"cpu": "CPU", "cuda": "GPU"}.get(self.device, self.device)
            listed = said[0] if len(said) == 1 else f"{', '.join(said[:-1])} and {said[-1]}"
            parts.append(f"Not measured meaningfully on this {device}, for any precision: {listed} (why, below).")
        parts += list(self.notes)
        if self.conventions:
            parts.append(f"*{self.conventions}*")
        return "\n\n".join(p for p in parts if p)


def _device(frame: pd.DataFrame) -> str:
    """"cuda" when every cell ran on a GPU, "cpu" when one ran on a CPU (figures are judged by the weakest)."""
    if "env.device" not in frame.columns:
        return "unknown"
    kinds = {str(v).split(":")[0] for v in frame["env.device"].dropna()}
    if "cpu" in kinds:
        return "cpu"
    return "cuda" if kinds == {"cuda"} else (", ".join(sorted(kinds)) or "unknown")


def _mib(value: float) -> str:
    return f"{value / MB:,.2f} MiB" if value < 10 * MB else f"{value / MB:,.0f} MiB"


def smaller_by(percent: float, versus: str | None = None) -> str:
    """"61 % smaller than bf16" / "4 % larger than bf16" / "the same as bf16" from a % smaller (negative:
    larger); without `versus`: "61 % smaller", ... A missing figure is "—"."""
    if pd.isna(percent):
        return "—"
    shown = format_value(abs(percent), 0 if abs(percent) >= 10 else 1)
    if float(shown) == 0:
        return f"the same as {versus}" if versus else "the same"
    return f"{shown} % {'smaller' if percent > 0 else 'larger'}" + (f" than {versus}" if versus else "")


def _status(frame: pd.DataFrame, arm: str) -> str:
    cells = frame[stats.arms(frame) == arm]
    bad = cells[cells["status"] != "ok"]
    if bad.empty:
        return "ok"
    kinds = ", ".join(sorted({str(t) for t in bad.get("error_type", pd.Series(dtype=object)).dropna()})) or ", ".join(sorted(set(bad["status"])))
    if len(bad) == len(cells):
        return f"no cell finished ({kinds}): no figures"
    return f"{len(bad)} of {len(cells)} cells did not finish ({kinds}); figures from the others"


class _Builder:
    """Works out the figures of every line from one frame (speed ratios already added)."""

    def __init__(self, frame: pd.DataFrame, warnings: list[str]):
        self.frame = frame
        self.device = _device(frame)
        self.device_name = {"cpu": "CPU", "cuda": "GPU"}.get(self.device, self.device)
        self.relative = stats.relative(frame)
        self.baseline = self.relative.baseline if self.relative else stats.baseline_precision(frame)
        self.labels = stats.arms(frame)
        bases = self.relative.bases if self.relative is not None else None
        self.bases = bases if bases is not None else pd.Series(dtype=object)
        # the baseline precision's first arm that finished: what the notes on the whole run speak of
        self.baseline_arm = next((arm for arm, base in self.bases.items() if arm == base), self.baseline)
        memory = self.relative.memory_column if self.relative else fields.first_present(frame, fields.HEADLINE_PEAK_MEMORY)
        self.memory = memory
        self.process = fields.process_baseline_of(memory) if memory else None
        self.throughput = self.relative.throughput_column if self.relative else fields.first_present(frame, fields.HEADLINE_THROUGHPUT)
        columns = [c for c in (fields.HEADLINE_WEIGHTS, memory, self.process, self.throughput) if c]
        aggregated = stats.aggregate(frame, columns)
        self.means, self.counts = aggregated.mean, aggregated.count
        self.quality = self.relative.quality if self.relative else None
        self.warnings = warnings
        self.notes: dict[str, str] = {}

    def base_of(self, arm: str) -> str | None:
        """The arm `arm` is compared with (in a suite without other axes: the baseline precision)."""
        base = self.bases.get(arm)
        return None if base is None or pd.isna(base) else str(base)

    def is_base(self, arm: str) -> bool:
        return self.base_of(arm) == arm or (self.relative is None and arm == self.baseline)

    # --- memory -------------------------------------------------------------------------------------------
    def runtime_share(self) -> float | None:
        """Share of the baseline precision's peak that the process held before the model was loaded."""
        base = self.baseline_arm
        if not (self.memory and self.process and base in self.means.index and self.process in self.means.columns):
            return None
        peak, before = self.means.loc[base, self.memory], self.means.loc[base, self.process]
        return None if pd.isna(peak) or pd.isna(before) or not peak else float(before / peak)

    def memory_meaningful(self) -> bool:
        if self.device == "cuda":
            return True
        share = self.runtime_share()
        return share is not None and share < RUNTIME_DOMINATED_SHARE

    def memory_figure(self, precision: str) -> Figure | None:
        if not self.memory or precision not in self.means.index or pd.isna(self.means.loc[precision, self.memory]):
            return None
        source = fields.memory_source_label(self.memory)
        peak = self.means.loc[precision, self.memory]
        before = self.means.loc[precision, self.process] if self.process in self.means.columns else float("nan")
        meaningful = self.memory_meaningful()
        if not meaningful:
            self.note_memory()
        base = self.base_of(precision)
        if self.is_base(precision) or self.relative is None or base is None:
            text = f"{_mib(peak)} ({source})"
            if pd.notna(before):
                text += f", {_mib(before)} of it before the model was loaded"
            return Figure("peak memory", text, meaningful)
        row = self.relative.table.loc[precision]
        text = (f"{smaller_by(row['memory_less_pct'], base)} ({source}: {_mib(peak)} vs "
                f"{_mib(self.means.loc[base, self.memory])}")
        if pd.notna(row.get("increase_less_pct", float("nan"))):
            text += f"; above what the process held before the model was loaded: {smaller_by(row['increase_less_pct'])}"
        return Figure("peak memory", text + ")", meaningful)

    def note_memory(self) -> None:
        share = self.runtime_share()
        source = fields.memory_source_label(self.memory)
        if share is not None:
            base = self.baseline_arm
            held = (f"{_mib(self.means.loc[base, self.process])} of {base}'s {_mib(self.means.loc[base, self.memory])} "
                    f"peak ({share:.0%}) was held before the model was loaded: the Python and torch runtime and the data")
        else:
            held = "the records do not say how much of it the process held before the model was loaded (most of it, on a CPU)"
        self.notes["memory"] = (
            f"**Peak memory on this {self.device_name}** is the process's {source}: {held}. A weight format changes only the part "
            "above that, so the percentages say little about the format. Its own effect is in the weights saved (exact "
            "bytes of the base) and the increase over the process baseline (per-precision table); for the memory a fine-tune "
            "needs, run the suite on a GPU (`qbench run SUITE --device cuda`), where torch counts its tensors alone."
        )

    # --- speed --------------------------------------------------------------------------------------------
    def contended(self, precision: str) -> bool:
        if CONTENDED_FLAG not in self.frame.columns:
            return False
        cells = self.frame[self.labels.isin([precision, self.base_of(precision) or self.baseline])]
        return bool(cells[CONTENDED_FLAG].fillna(False).astype(bool).any())

    def speed_figure(self, precision: str) -> Figure | None:
        if not self.throughput or precision not in self.means.index or pd.isna(self.means.loc[precision, self.throughput]):
            return None
        label = fields.label(self.throughput)
        meaningful = self.device == "cuda" and not self.contended(precision)
        if self.device != "cuda":
            self.notes["speed"] = (
                f"**Speed on this {self.device_name}** times bitsandbytes' CPU kernels on this machine, not the CUDA kernels a "
                "GPU fine-tune runs, and on a shared machine the load of other processes too: its ratios say little about "
                "a format's speed on a GPU. Measure speed on the GPU you will train on."
            )
        elif not meaningful:
            self.notes["speed"] = (
                "**Speed**: the machine was busy with other work while some cells were timed (`speed.contended`): "
                "their ratios measure the load as much as the format. Run again on a quiet machine."
            )
        value = self.means.loc[precision, self.throughput]
        base = self.base_of(precision)
        if self.is_base(precision) or base is None or self.relative is None or "speed_x" not in self.relative.table.columns:
            return Figure("speed", f"{format_value(value, 1)} {label}", meaningful)
        ratio = self.relative.table.loc[precision, "speed_x"]
        cells = int(self.counts.loc[precision, self.throughput]) if self.throughput in self.counts.columns else 0
        # shown, never tested here: one cell process's speed level is noise of its own (qbench gate judges speed)
        text = f"{format_value(ratio, 2)}× {base}'s {label} (the mean of {cells} within-run ratio{'s' if cells != 1 else ''}, untested)"
        if bool(self.relative.table.loc[precision].get("speed_mixed", False)):
            text += f" ({MIXED_MARK}: {precision} and {base} were timed in different sessions of a resumed run)"
            self.notes["mixed"] = (
                f"**Speed ratios marked {MIXED_MARK}** divide figures timed in different sessions of a resumed run "
                "(one arm before the interrupt, the other after), at two moments' machine load: run the suite again in "
                "one session for speed ratios to go by."
            )
            meaningful = False
        return Figure("speed", text, meaningful)

    # --- quality ------------------------------------------------------------------------------------------
    def quality_figure(self, precision: str) -> Figure | None:
        if self.quality is None or precision not in self.quality.table.index:
            return None
        row = self.quality.table.loc[precision]
        if pd.isna(row["mean"]):
            return None
        column = self.quality.column
        factor, unit = fields.scale(column)
        suffix, points = (" %", "points") if unit == "%" else ("", unit)
        name = fields.quality_name(column)
        level = f"{100 * self.quality.confidence:g} %"
        metric = column.split(".")[-1].replace("_", " ")
        frozen = [w for w in self.warnings if w.startswith(f"{metric} is the same before and after")]
        if frozen:
            self.notes["frozen"] = f"**Quality**: {frozen[0]}."
        base = row.get("baseline_arm")
        base = self.baseline if base is None or pd.isna(base) else base
        if row["verdict"] == stats.BASELINE or pd.isna(row["delta"]):
            text = f"{name} {format_value(row['mean'] * factor)}{suffix}"
            if pd.notna(row["low"]):
                text += f" ({level} interval {format_value(row['low'] * factor)} to {format_value(row['high'] * factor)})"
            else:
                self.note_no_interval()
            text, broken = self.with_nonfinite(precision, text)
            return Figure("quality", text, not frozen and not broken and pd.notna(row["se"]), named=False)
        delta = format_value(row["delta"] * factor, 2, signed=True)
        text = f"{name} {format_value(row['mean'] * factor)}{suffix} ({delta} {points} vs {base}".replace("  ", " ")
        if pd.notna(row["delta_low"]):
            text += f" [{format_value(row['delta_low'] * factor, 2, True)}, {format_value(row['delta_high'] * factor, 2, True)}]"
        verdict = row["verdict"]
        text += f": {verdict})"
        if verdict == stats.NO_INTERVAL:
            self.note_no_interval()
        text, broken = self.with_nonfinite(precision, text)
        return Figure("quality", text, verdict != stats.NO_INTERVAL and not frozen and not broken, named=False)

    def with_nonfinite(self, precision: str, text: str) -> tuple[str, bool]:
        """The quality text, saying so when this precision's model gave NaN or infinite outputs in evaluation
        (`quality.<phase>.nonfinite_*` of its ok cells): such a figure is the broken model's, not the format's cost."""
        columns = [c for c in self.frame.columns if c.startswith("quality.") and ".nonfinite_" in c]
        cells = stats.ok_rows(self.frame)
        cells = cells[self.labels[cells.index] == precision] if "precision" in cells.columns else cells.iloc[0:0]  # this arm's
        count = int(cells[columns].astype(float).fillna(0).to_numpy().sum()) if columns else 0
        if not count:
            return text, False
        return text + f", from a model that gave {count:,} NaN or infinite outputs in evaluation (see below)", True

    def note_no_interval(self) -> None:
        self.notes["interval"] = (
            "**Quality** differences here carry no interval: the records hold no bootstrap interval and each precision "
            "has one seed, so a difference cannot be told from noise. Run several seeds (`qbench run SUITE --seeds 0,1,2`)."
        )

    # --- weights ------------------------------------------------------------------------------------------
    def weights_figure(self, precision: str) -> Figure | None:
        column = fields.HEADLINE_WEIGHTS
        if column not in self.means.columns or precision not in self.means.index or pd.isna(self.means.loc[precision, column]):
            return None
        value = self.means.loc[precision, column]
        base = self.base_of(precision)
        if self.is_base(precision) or base is None or self.relative is None or "weights_less_pct" not in self.relative.table.columns:
            return Figure("weights", _mib(value))
        return Figure("weights", f"{smaller_by(self.relative.table.loc[precision, 'weights_less_pct'], base)} "
                                 f"({_mib(value)} vs {_mib(self.means.loc[base, column])})")

    def line(self, precision: str) -> Line:
        status = _status(self.frame, precision)
        if status.startswith("no cell finished"):
            return Line(precision, self.is_base(precision), status)
        made = (self.weights_figure(precision), self.memory_figure(precision), self.quality_figure(precision),
                self.speed_figure(precision))
        return Line(precision, self.is_base(precision), status, tuple(f for f in made if f is not None))


def verdict(frame: pd.DataFrame, warnings: list[str] | None = None) -> Verdict:
    """The verdict of `frame` (records of one suite; shards and seeds merged), per precision in registry order.

    `warnings` are the eval set's (`eval_checks.eval_set_warnings`): a quality figure that fine-tuning
    moved in no cell is not a measurement of the format either.
    """
    if frame.empty or "precision" not in frame.columns:
        return Verdict(None, "unknown", ())
    throughput = [c for c in fields.HEADLINE_THROUGHPUT if c in frame.columns]
    frame = stats.add_speed_ratios(frame, tuple(throughput)) if throughput else frame
    builder = _Builder(frame, warnings or [])
    lines = tuple(builder.line(arm) for arm in stats.arm_order(frame))  # arms: precisions, unless the grid has more axes
    b = builder.baseline or "the baseline"
    conventions = (
        f"Sizes are smaller or larger than {b}'s by a percentage; speeds are multiples of {b}'s (above 1: faster); a "
        "quality difference comes with its interval and is called better or worse only when the interval excludes 0, "
        f"else \"{stats.NO_DIFFERENCE}\"."
    )
    if builder.relative is None and builder.baseline:
        builder.notes["no_baseline"] = (f"**No comparison**: no cell of the baseline precision {builder.baseline} finished in "
                                        "these records, so every figure above is absolute.")
    order = ("no_baseline", "memory", "speed", "mixed", "interval", "frozen")
    notes = tuple(builder.notes[k] for k in order if k in builder.notes)
    return Verdict(builder.baseline, builder.device, lines, notes, conventions, tuple(warnings or ()))
