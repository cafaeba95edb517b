"""Figures of a report (matplotlib, Agg backend): quality vs memory, throughput, memory per phase, vs baseline."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pandas as pd

from qbench.analysis import stats
from qbench.contract import fields, schema


@dataclass(frozen=True)
class Plot:
    """One rendered figure: a file stem, a caption, and the PNG bytes."""

    name: str
    title: str
    png: bytes


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # never a window: reports are rendered on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot().close(figure)
    return buffer.getvalue()


def axis_label(column: str) -> str:
    _, unit = fields.scale(column)
    name = fields.label(column)
    return name if not unit or unit in name or name.endswith("/s") else f"{name} ({unit})"


def _spread(std: float) -> float | None:
    """An error bar only where there is a spread (several seeds); one seed has none to draw."""
    return None if pd.isna(std) else std


def _spreads(std: pd.Series) -> pd.Series | None:
    return None if std.isna().all() else std.fillna(0)


def colours_for(names: list[str]) -> dict[str, object]:
    cmap = pyplot().get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def quality_vs_memory(frame: pd.DataFrame) -> Plot | None:
    """Headline quality against peak memory and against base weight bytes, Pareto front marked."""
    quality = fields.first_present(frame, fields.HEADLINE_QUALITY)
    costs = [c for c in (fields.first_present(frame, fields.HEADLINE_PEAK_MEMORY), fields.first_present(frame, (fields.HEADLINE_WEIGHTS,))) if c]
    if quality is None or not costs:
        return None
    agg = stats.aggregate(frame, costs)
    intervals = stats.quality_intervals(frame, quality).reindex(agg.mean.index)
    spec = fields.spec_for(quality)
    higher = spec is None or spec.direction != "lower"
    q_factor, _ = fields.scale(quality)
    plt = pyplot()
    figure, axes = plt.subplots(1, len(costs), figsize=(5.2 * len(costs), 4.2), squeeze=False)
    colours = colours_for(list(agg.mean.index))
    y = intervals["mean"] * q_factor
    # the quality's interval as the error bar (asymmetric: a bootstrap interval need not be centred)
    below, above = (y - intervals["low"] * q_factor), (intervals["high"] * q_factor - y)
    for axis, cost in zip(axes[0], costs, strict=True):
        c_factor, _ = fields.scale(cost)
        x = agg.mean[cost] * c_factor
        x_err = agg.std[cost] * c_factor  # NaN with one seed: no bar
        # on the front only for a cost saved or a quality difference the intervals can tell
        front = stats.pareto_front(x, y, higher, se=intervals["se"] * q_factor, confidence=stats.confidence_of(frame))
        for name in agg.mean.index:
            if pd.isna(x[name]) or pd.isna(y[name]):
                continue
            y_err = None if pd.isna(below[name]) or pd.isna(above[name]) else [[below[name]], [above[name]]]
            axis.errorbar(
                x[name], y[name], xerr=_spread(x_err[name]), yerr=y_err, fmt="o", markersize=9 if front[name] else 7,
                color=colours[name], markerfacecolor=colours[name] if front[name] else "white", capsize=3, label=name,
            )
            axis.annotate(name, (x[name], y[name]), textcoords="offset points", xytext=(6, 6), fontsize=8)
        on_front = pd.DataFrame({"x": x[front], "y": y[front]}).sort_values("x")
        if len(on_front) > 0:
            axis.step(on_front["x"], on_front["y"], where="post", linestyle="--", color="grey", linewidth=1, label="Pareto front")
        axis.set_xlabel(axis_label(cost))
        axis.set_ylabel(axis_label(quality) + (" ↑ better" if higher else " ↓ better"))
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    if intervals["se"].notna().any():
        heading = f"quality vs memory per precision, bars: {stats.confidence_label(frame)} (filled: on the Pareto front, within noise)"
    else:
        heading = "quality vs memory per precision (filled: on the Pareto front; no intervals recorded: bare means)"
    figure.suptitle(heading, fontsize=10)
    return Plot("quality_vs_memory", "Quality vs peak memory and base weights, Pareto front marked", png(figure))


def throughput(frame: pd.DataFrame) -> Plot | None:
    """Training throughput per precision (mean, spread over seeds), with the within-run ratio to the baseline."""
    column = fields.first_present(frame, fields.HEADLINE_THROUGHPUT)
    if column is None:
        return None
    with_ratio = stats.add_speed_ratios(frame, (column,))
    agg = stats.aggregate(with_ratio, [column, fields.ratio_column(column)])
    values = agg.mean[column]
    if values.dropna().empty:
        return None
    plt = pyplot()
    names = list(values.index)
    figure, axis = plt.subplots(figsize=(max(6.5, 0.6 * len(names) + 2), 3.8))
    colours = colours_for(names)
    bars = axis.bar(names, values.fillna(0), yerr=_spreads(agg.std[column]), capsize=3, color=[colours[n] for n in names])
    for bar, name in zip(bars, names, strict=True):
        ratio = agg.mean.loc[name, fields.ratio_column(column)]
        if pd.notna(ratio):
            axis.annotate(f"{ratio:.2f}× {stats.baseline_precision(frame)}", (bar.get_x() + bar.get_width() / 2, 0),
                          textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8, color="white", weight="bold")
    axis.set_ylabel(axis_label(column) + " ↑ better")
    if len(names) > 6 or any(" " in name for name in names):  # a grid's arm labels: turned, so they do not overlap
        axis.tick_params(axis="x", labelrotation=35)
        plt.setp(axis.get_xticklabels(), ha="right")
    axis.set_title("training throughput (timed steps after warm-up)", fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    return Plot("throughput", "Training throughput per precision", png(figure))


def memory_by_phase(frame: pd.DataFrame) -> Plot | None:
    """Peak memory of each phase (load, prepare, eval, train, ...) per precision, from the best source present."""
    for source in schema.PHASE_MEMORY_PREFERENCE:
        columns = [c for c in fields.phase_columns(frame.columns, source) if frame[c].notna().any()]
        if columns:
            break
    else:
        return None
    agg = stats.aggregate(frame, columns)
    phases = [c.split(".")[1] for c in columns]
    names = list(agg.mean.index)
    colours = colours_for(names)
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6.5, 1.3 * len(phases) + 2), 3.8))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        positions = [p + (i - (len(names) - 1) / 2) * width for p in range(len(phases))]
        axis.bar(positions, agg.mean.loc[name, columns].fillna(0) / 2**20, width, yerr=_spreads(agg.std.loc[name, columns] / 2**20),
                 capsize=2, label=name, color=colours[name])
    process = schema.process_baseline_key(source)
    if process in frame.columns and frame[process].notna().any():
        held = stats.aggregate(frame, [process]).mean[process].mean() / 2**20
        axis.axhline(held, color="black", linestyle=":", linewidth=1, label=f"before model load ({held:,.0f} MiB)")
    axis.set_xticks(range(len(phases)), phases)
    axis.set_ylabel(f"peak {fields.SOURCE_LABELS.get(source, source)} (MiB)")
    axis.set_title("peak memory per phase", fontsize=10)
    axis.legend(fontsize=7, ncols=min(len(names), 6))
    axis.grid(axis="y", alpha=0.3)
    return Plot("memory_by_phase", f"Peak memory per phase ({fields.SOURCE_LABELS.get(source, source)})", png(figure))


def versus_baseline(frame: pd.DataFrame) -> Plot | None:
    """Each precision against the baseline: % less weights and memory, × of its speed, the quality difference
    with its interval as an error bar."""
    table = stats.relative_to_baseline(frame)
    numeric = [c for c in table.columns
               if pd.api.types.is_numeric_dtype(table[c]) and not c.endswith((" low", " high")) and table[c].notna().any()]
    if table.empty or not numeric:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, len(numeric), figsize=(3.3 * len(numeric), 3.4), squeeze=False)
    names = list(table.index)
    colours = colours_for(names)
    for axis, column in zip(axes[0], numeric, strict=True):
        error = None
        if f"{column} low" in table.columns and table[f"{column} low"].notna().any():
            error = [(table[column] - table[f"{column} low"]).fillna(0), (table[f"{column} high"] - table[column]).fillna(0)]
        ratio = "× of" in column
        # a ratio's bar starts at 1 (the baseline), so that below 1 reads as less and above as more
        values = table[column] - 1 if ratio else table[column]
        axis.barh(names, values.fillna(0), left=1 if ratio else 0, xerr=error, capsize=3, color=[colours[n] for n in names])
        axis.axvline(1 if ratio else 0, color="black", linewidth=0.8)
        axis.set_title(column, fontsize=9, wrap=True)
        axis.invert_yaxis()
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle(f"relative to the baseline precision ({stats.baseline_precision(frame)})", fontsize=10)
    return Plot("versus_baseline", "Each precision relative to the baseline precision", png(figure))


def all_plots(frame: pd.DataFrame) -> list[Plot]:
    """Every figure the frame has data for, in report order."""
    made = (quality_vs_memory(frame), throughput(frame), memory_by_phase(frame), versus_baseline(frame))
    return [plot for plot in made if plot is not None]
