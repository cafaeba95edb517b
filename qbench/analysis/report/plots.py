"""Figures of a report (matplotlib, Agg backend): quality vs memory, throughput, memory per phase, vs baseline."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
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


def label_points(axis, xs: list[float], ys: list[float], names: list[str]) -> None:
    """Name each point beside it, labels moved apart (adjustText) with a leader line where they had to move,
    so that points on top of each other (four 4-bit bases of the same bytes) keep readable names."""
    from adjustText import adjust_text

    # room around what is drawn (points and their bars) for the names; a flat axis gets a unit either side
    for values, get, put in ((xs, axis.get_xlim, axis.set_xlim), (ys, axis.get_ylim, axis.set_ylim)):
        if not values:
            continue
        low, high = get()
        low, high = min(low, *values), max(high, *values)
        span = high - low
        if span <= 1e-6 * max(abs(high), 1.0):
            put(min(values) - max(abs(high) * 0.05, 1.0), max(values) + max(abs(high) * 0.05, 1.0))
        else:
            put(low - 0.06 * span, high + 0.06 * span)
    texts = [axis.text(x, y, name, fontsize=8) for x, y, name in zip(xs, ys, names, strict=True)]
    if texts:
        adjust_text(texts, x=xs, y=ys, ax=axis, arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6},
                    expand=(1.3, 1.6), ensure_inside_axes=True)


def quality_vs_memory(frame: pd.DataFrame) -> Plot | None:
    """Headline quality against peak memory and against base weight bytes; the points on the Pareto front
    filled, and the front drawn as a line where it has two points or more."""
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
    figure, axes = plt.subplots(1, len(costs), figsize=(5.6 * len(costs), 4.6), squeeze=False)
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
        shown = [name for name in agg.mean.index if pd.notna(x[name]) and pd.notna(y[name])]
        for name in shown:
            y_err = None if pd.isna(below[name]) or pd.isna(above[name]) else [[below[name]], [above[name]]]
            axis.errorbar(
                x[name], y[name], xerr=_spread(x_err[name]), yerr=y_err, fmt="o", markersize=9 if front[name] else 7,
                color=colours[name], markerfacecolor=colours[name] if front[name] else "white", capsize=3,
            )
        label_points(axis, [float(x[n]) for n in shown], [float(y[n]) for n in shown], shown)
        on_front = pd.DataFrame({"x": x[front], "y": y[front]}).dropna().sort_values(["x", "y"], ascending=[True, not higher])
        if len(on_front):
            # the front as a staircase: from each point on it to the next cheaper-to-dearer one, then on to the
            # axis' edge, where a dearer point would have to be better to join it
            right = axis.get_xlim()[1]
            best = on_front["y"].cummax() if higher else on_front["y"].cummin()  # ties within the noise: the better one
            xs, ys = [*on_front["x"], right], [*best, best.iloc[-1]]
            axis.step(xs, ys, where="post", linestyle="--", color="grey", linewidth=1, label="Pareto front (filled points)")
            axis.set_xlim(right=right)
            axis.legend(fontsize=7, loc="best")
        axis.set_xlabel(axis_label(cost))
        axis.set_ylabel(axis_label(quality) + (" ↑ better" if higher else " ↓ better"))
        axis.grid(alpha=0.3)
    if intervals["se"].notna().any():
        heading = f"quality vs cost per precision, bars: {stats.confidence_label(frame)} (filled: on the Pareto front, judged beyond the noise)"
    else:
        heading = "quality vs cost per precision (filled: on the Pareto front; no intervals recorded: bare means)"
    figure.suptitle(heading, fontsize=10)
    return Plot("quality_vs_memory", "Quality vs peak memory and base weights, Pareto front marked", png(figure))


def _loss_curve(value: object) -> list[float] | None:
    """A record's `train.loss_curve` as floats, however the frame got it (a list, or JSON text from a CSV)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, list | tuple | np.ndarray) or len(value) == 0:
        return None
    return [float(v) for v in value]


def loss_curves(frame: pd.DataFrame) -> Plot | None:
    """Each cell's training loss against the optimizer step (`train.loss_curve`), one colour per arm and one line
    style per seed: thin, every point the record holds; bold, a moving mean that shows the trend."""
    if "train.loss_curve" not in frame.columns:
        return None
    curves = [(row, _loss_curve(row["train.loss_curve"])) for _, row in frame.iterrows()]
    curves = [(row, curve) for row, curve in curves if curve]
    if not curves:
        return None
    labels = stats.arms(frame)
    names = [a for a in stats.arm_order(frame) if a in set(labels[[row.name for row, _ in curves]])]
    colours = colours_for(stats.arm_order(frame))
    styles = ["-", "--", ":", "-."]
    seeds = sorted({row.get("seed", 0) for row, _ in curves}, key=str)
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(9, 4.4))
    window = 1
    for row, curve in curves:
        every = int(row.get("train.loss_curve_every_steps") or 1)
        steps = np.arange(1, len(curve) + 1) * every
        window = max(1, len(curve) // 20)
        arm = labels[row.name]
        style = styles[seeds.index(row.get("seed", 0)) % len(styles)]
        axis.plot(steps, curve, color=colours[arm], linewidth=0.6, alpha=0.35, linestyle=style)
        trend = pd.Series(curve).rolling(window, min_periods=1).mean()
        seed = f" seed {row.get('seed')}" if len(seeds) > 1 else ""
        axis.plot(steps, trend, color=colours[arm], linewidth=1.8, linestyle=style, label=f"{arm}{seed}")
        if row.get("status") != "ok":
            axis.annotate(f"{arm}: {row.get('status')}", (steps[-1], curve[-1]), fontsize=7, color=colours[arm])
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss ↓")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncols=min(3, len(names)), loc="upper right")
    axis.set_title(f"training loss per cell (thin: as recorded; bold: moving mean over {window} points)", fontsize=10)
    return Plot("loss_curves", "Training loss per cell", png(figure))


def before_after(frame: pd.DataFrame) -> Plot | None:
    """The headline quality per arm before fine-tuning (the damage quantization does) and after it (what LoRA
    recovers), each with its interval, an arrow from one to the other; the baseline arm's after-figure and its
    interval as a band to hold the others against."""
    after = fields.first_present(frame, tuple(c for c in fields.HEADLINE_QUALITY if c.startswith("quality.eval_after.")))
    before = after.replace(".eval_after.", ".eval_before.") if after else None
    if after is None or before not in frame.columns or pd.to_numeric(frame[before], errors="coerce").isna().all():
        return None
    factor, _ = fields.scale(after)
    spec = fields.spec_for(after)
    higher = spec is None or spec.direction != "lower"
    phases = {phase: stats.quality_intervals(frame, column) for phase, column in (("before", before), ("after", after))}
    names = [n for n in phases["after"].index if pd.notna(phases["after"].loc[n, "mean"]) or pd.notna(phases["before"].loc[n, "mean"])]
    if not names:
        return None
    colours = colours_for(list(phases["after"].index))
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6.5, 1.1 * len(names) + 2.5), 4.4))
    baseline = stats.baseline_precision(frame)
    if baseline in phases["after"].index and pd.notna(phases["after"].loc[baseline, "mean"]):
        base = phases["after"].loc[baseline]
        axis.axhline(base["mean"] * factor, color="grey", linestyle="--", linewidth=1, label=f"{baseline} after")
        if pd.notna(base["low"]):
            axis.axhspan(base["low"] * factor, base["high"] * factor, color="grey", alpha=0.12,
                         label=f"{baseline} after, {stats.confidence_label(frame)}")
    for i, name in enumerate(names):
        points = {}
        for phase, offset, face in (("before", -0.12, "white"), ("after", 0.12, colours[name])):
            row = phases[phase].loc[name]
            if pd.isna(row["mean"]):
                continue
            value = row["mean"] * factor
            error = None if pd.isna(row["low"]) else [[value - row["low"] * factor], [row["high"] * factor - value]]
            axis.errorbar(i + offset, value, yerr=error, fmt="o", color=colours[name], markerfacecolor=face, capsize=3,
                          markersize=7)
            points[phase] = (i + offset, value)
        if len(points) == 2:
            axis.annotate("", xy=points["after"], xytext=points["before"],
                          arrowprops={"arrowstyle": "->", "color": colours[name], "lw": 1.2, "shrinkA": 5, "shrinkB": 5})
    axis.scatter([], [], marker="o", facecolor="white", edgecolor="black", label="before fine-tuning")
    axis.scatter([], [], marker="o", color="black", label="after fine-tuning")
    axis.set_xticks(range(len(names)), names)
    if len(names) > 6 or any(" " in name for name in names):
        axis.tick_params(axis="x", labelrotation=35)
        plt.setp(axis.get_xticklabels(), ha="right")
    metric = fields.quality_name(after, short=True).removesuffix(" after")
    axis.set_ylabel(axis_label(after).replace("after ", "") + (" ↑ better" if higher else " ↓ better"))
    axis.legend(fontsize=7, loc="best")
    axis.grid(axis="y", alpha=0.3)
    axis.set_title(f"{metric} before → after fine-tuning per precision, bars: {stats.confidence_label(frame)}\n"
                   "(the damage quantization does, then what the fine-tune recovers)", fontsize=10)
    return Plot("before_after", f"{metric} before and after fine-tuning per precision", png(figure))


def _contended(frame: pd.DataFrame) -> pd.Series:
    """Arm -> True when one of its cells waited for a core while it trained (`speed.contended`)."""
    if "speed.contended" not in frame.columns:
        return pd.Series(False, index=stats.arm_order(frame))
    flags = frame["speed.contended"].map(lambda v: v is True or str(v).lower() == "true")
    return flags.groupby(stats.arms(frame)).any().reindex(stats.arm_order(frame)).fillna(False)


def throughput(frame: pd.DataFrame) -> Plot | None:
    """Training throughput per arm (mean, spread over seeds) with its within-run ratio to the baseline above each
    bar. On a CPU whose cells waited for a core the bars are samples per CPU-second (what a busy machine moves
    least), and the contended arms are hatched."""
    column = fields.first_present(frame, fields.HEADLINE_THROUGHPUT)
    if column is None:
        return None
    contended = _contended(frame)
    cpu_column = fields.cpu_time_field(column)
    per_cpu = bool(contended.any()) and cpu_column in frame.columns and pd.to_numeric(frame[cpu_column], errors="coerce").notna().any()
    if per_cpu:
        column = cpu_column
    with_ratio = stats.add_speed_ratios(frame, (column,))
    agg = stats.aggregate(with_ratio, [column, fields.ratio_column(column)])
    values = agg.mean[column]
    if values.dropna().empty:
        return None
    plt = pyplot()
    names = list(values.index)
    figure, axis = plt.subplots(figsize=(max(6.5, 0.9 * len(names) + 2), 4.0))
    colours = colours_for(names)
    bars = axis.bar(names, values.fillna(0), yerr=_spreads(agg.std[column]), capsize=3, color=[colours[n] for n in names],
                    hatch=["//" if contended.get(n, False) else "" for n in names], edgecolor="black", linewidth=0.5)
    rotate = len(names) > 6 or any(" " in name for name in names)
    baseline = stats.baseline_precision(frame)
    for bar, name in zip(bars, names, strict=True):
        ratio = agg.mean.loc[name, fields.ratio_column(column)]
        if pd.notna(ratio):
            axis.annotate(f"{ratio:.2f}×", (bar.get_x() + bar.get_width() / 2, bar.get_height()), textcoords="offset points",
                          xytext=(0, 3), ha="center", va="bottom", fontsize=8)
    axis.set_ylim(0, float(values.max()) * 1.18)
    if contended.any():
        from matplotlib.patches import Patch

        axis.legend(handles=[Patch(facecolor="white", hatch="//", edgecolor="black", label="contended: its threads waited for a core")],
                    fontsize=7, loc="upper right")
    axis.set_ylabel(axis_label(column) + " ↑ better")
    if rotate:
        axis.tick_params(axis="x", labelrotation=35)
        plt.setp(axis.get_xticklabels(), ha="right")
    what = "per CPU-second of the cell's process\n(the CPU was busy: wall-clock speed measured its load)" if per_cpu \
        else "over the timed steps after warm-up"
    axis.set_title(f"training throughput {what}; above each bar: × {baseline}'s", fontsize=9)
    axis.grid(axis="y", alpha=0.3)
    return Plot("throughput", "Training throughput per precision" + (" per CPU-second" if per_cpu else ""), png(figure))


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
    numeric = [c for c in table.columns if c != stats.MIXED and not pd.api.types.is_bool_dtype(table[c])
               and pd.api.types.is_numeric_dtype(table[c]) and not c.endswith((" low", " high")) and table[c].notna().any()]
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
        ratio = column.endswith(stats.TIMES)
        # a ratio's bar starts at 1 (the baseline), so that below 1 reads as less and above as more
        values = table[column] - 1 if ratio else table[column]
        axis.barh(names, values.fillna(0), left=1 if ratio else 0, xerr=error, capsize=3, color=[colours[n] for n in names])
        axis.axvline(1 if ratio else 0, color="black", linewidth=0.8)
        axis.set_title(column, fontsize=9, wrap=True)
        if column.endswith(stats.SMALLER):
            axis.set_xlabel("← larger    smaller →", fontsize=8)
        elif ratio:
            axis.set_xlabel("← less    more →", fontsize=8)
        axis.invert_yaxis()
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle(f"relative to the baseline precision ({stats.baseline_precision(frame)})", fontsize=10)
    return Plot("versus_baseline", "Each precision relative to the baseline precision", png(figure))


def all_plots(frame: pd.DataFrame) -> list[Plot]:
    """Every figure the frame has data for, in report order."""
    made = (before_after(frame), loss_curves(frame), quality_vs_memory(frame), throughput(frame), memory_by_phase(frame),
            versus_baseline(frame))
    return [plot for plot in made if plot is not None]
