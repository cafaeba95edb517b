"""The report's view of a grid: how memory and throughput grow along the numeric axes (batch size,
sequence length, LoRA rank), one line per precision, and what each optimizer's state takes.

Tables and plots here appear only when the records vary the axes they are about (qbench.contract.grid);
a suite of precisions and seeds alone gets none of them.
"""

from __future__ import annotations

import itertools

import pandas as pd

from qbench.analysis import stats
from qbench.analysis.report.plots import Plot, axis_label, colours_for, png, pyplot
from qbench.analysis.report.sections import ReportData, Section
from qbench.contract import fields, grid

NUMERIC_AXES = tuple(a for a in grid.SETTING_AXES if a.kind is int)  # lora_r, batch_size, max_length
SERIES_AXES = tuple(a for a in grid.SETTING_AXES if a.kind is not int)  # optimizer, gradient_checkpointing
OPTIMIZER = grid.BY_NAME["optimizer"].record_key
# what a grid is measured by: the headline peak memory and the throughput that grows with the work
THROUGHPUT_ORDER = ("speed.train_tokens_per_s", "speed.train_samples_per_s")


def arm_points(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per arm (in arm order): the value of each axis that varies, as plain Python values."""
    columns = stats.axis_columns(frame)
    if frame.empty or not columns:
        return pd.DataFrame()
    plain = frame[columns].apply(lambda column: column.map(stats.plain_value))
    plain.index = stats.arms(frame).to_numpy()
    points = plain[~plain.index.duplicated()].reindex(stats.arm_order(frame))
    points.index.name = stats.arm_index_name(frame)
    return points


def _varying(points: pd.DataFrame, axes: tuple[grid.Axis, ...]) -> list[grid.Axis]:
    return [a for a in axes if a.record_key in points.columns]


def _series_label(point: pd.Series, series: list[grid.Axis]) -> str:
    return " ".join([str(point["precision"]), *(a.id_part(point[a.record_key]) for a in series)])


def _panel_label(values: tuple, axes: list[grid.Axis]) -> str:
    return ", ".join(f"{a.name.replace('_', ' ')} {a.id_part(v) if a.kind is bool else v}" for a, v in zip(axes, values, strict=True))


def _metrics(frame: pd.DataFrame) -> list[str]:
    memory = fields.first_present(frame, fields.HEADLINE_PEAK_MEMORY)
    throughput = fields.first_present(frame, THROUGHPUT_ORDER)
    return [c for c in (memory, throughput) if c]


def scaling_tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Peak memory and throughput with a row per point of the numeric axes (batch size, sequence
    length, LoRA rank) and a column per precision (with the other varying axes); empty without numeric axes."""
    points = arm_points(frame)
    numeric, series = _varying(points, NUMERIC_AXES), _varying(points, SERIES_AXES)
    if not numeric:
        return {}
    agg = stats.aggregate(frame, _metrics(frame))
    shown = {}
    for metric in agg.mean.columns:
        factor, unit = fields.scale(metric)
        rows: dict[str, dict[str, float]] = {}
        for arm, point in points.iterrows():
            row = " ".join(a.id_part(point[a.record_key]) for a in numeric)
            rows.setdefault(row, {})[_series_label(point, series)] = agg.mean.loc[arm, metric] * factor
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = " ".join(a.name for a in numeric)
        shown[f"{fields.label(metric)} across the grid" + (f" ({unit})" if unit and unit not in fields.label(metric) else "")] = table
    return shown


def optimizer_state_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per arm: the optimizer, its exact state bytes after the first step by dtype, that state over
    torch AdamW's for the same number of trainable parameters (measured in the same records), how many
    parameters got 8-bit moments, and whether paging was in effect (with the reason when it was not).
    Empty unless the records use an optimizer other than AdamW or several."""
    if "optimizer.state_bytes" not in frame.columns or OPTIMIZER not in frame.columns:
        return pd.DataFrame()
    ok = stats.ok_rows(frame)
    used = set(ok[OPTIMIZER].dropna())
    if not used or used == {"adamw"} or ok["optimizer.state_bytes"].isna().all():
        return pd.DataFrame()
    byte_columns = ["optimizer.state_bytes", *sorted(c for c in ok.columns if c.startswith("optimizer.state.") and c.endswith("_bytes"))]
    agg = stats.aggregate(frame, [*byte_columns, "params.trainable", "optimizer.params", "optimizer.params_with_8bit_state"])
    labels = stats.arms(frame)[ok.index]  # labelled over every cell, as the aggregate is
    first = ok.groupby(labels).first().reindex(agg.mean.index)
    adamw = ok[ok[OPTIMIZER] == "adamw"]
    adamw_bytes = adamw["optimizer.state_bytes"].astype(float).groupby(adamw["params.trainable"]).mean() \
        if "params.trainable" in adamw.columns else pd.Series(dtype=float)
    measured = agg.count["optimizer.state_bytes"] > 0
    agg = stats.Aggregate(agg.mean[measured], agg.std[measured], agg.count[measured])
    first = first[measured]
    table = pd.DataFrame(index=agg.mean.index)
    table["optimizer"] = first[OPTIMIZER]
    table["class"] = first.get("optimizer.class")
    for column in byte_columns:
        name = column.removeprefix("optimizer.").replace("state.", "").replace("_bytes", " bytes")
        table[name] = agg.mean[column].round().astype("Int64")
    reference = agg.mean["params.trainable"].map(adamw_bytes) if "params.trainable" in agg.mean.columns else float("nan")
    table["÷ adamw state"] = agg.mean["optimizer.state_bytes"] / reference
    if "optimizer.params" in agg.mean.columns:
        table["params with 8-bit state"] = [f"{eight:.0f} of {count:.0f}" if pd.notna(count) else "—" for eight, count in
                                            zip(agg.mean["optimizer.params_with_8bit_state"], agg.mean["optimizer.params"], strict=True)]
    table["paged"] = first.get("optimizer.paged")
    table["why not paged"] = first.get("optimizer.paged_reason")
    return table


def scaling_section(data: ReportData) -> Section | None:
    """Peak memory and throughput across the numeric axes (one table each), as a report section."""
    shown = scaling_tables(data.frame)
    if not shown:
        return None
    parts = [f"### {title}\n\n" + table.to_markdown(floatfmt=".1f") for title, table in shown.items()]
    return Section("scaling", "Peak memory and throughput across the grid", text="\n\n".join(parts),
                   note="Each row a point of the grid's numeric axes, each column a precision (with the other axes that vary).")


def optimizer_state_section(data: ReportData) -> Section | None:
    """The optimizer state table as a report section."""
    table = optimizer_state_table(data.frame)
    if table.empty:
        return None
    return Section("optimizer_state", "Optimizer state after the first step (exact bytes)",
                   table=data.display(table, {"÷ adamw state": 3}),
                   note="÷ adamw state: this state over torch AdamW's for the same trainable parameters in these records. "
                        "bitsandbytes pages optimizer state only on CUDA, and only for parameters of at least 100,000 elements.")


def scaling_plots(frame: pd.DataFrame) -> list[Plot]:
    """For each numeric axis that varies: peak memory (top) and throughput (bottom) against it, one line
    per precision (with the other categorical axes), one column of panels per value of the other numeric axes."""
    points = arm_points(frame)
    numeric, series = _varying(points, NUMERIC_AXES), _varying(points, SERIES_AXES)
    metrics = _metrics(frame)
    if not numeric or not metrics:
        return []
    agg = stats.aggregate(frame, metrics)
    made = []
    for x_axis in numeric:
        others = [a for a in numeric if a is not x_axis]
        panels = list(itertools.product(*(list(dict.fromkeys(points[a.record_key])) for a in others))) or [()]
        plt = pyplot()
        figure, axes = plt.subplots(len(metrics), len(panels), figsize=(4.2 * len(panels) + 1, 3.4 * len(metrics)), squeeze=False)
        names = list(dict.fromkeys(_series_label(p, series) for _, p in points.iterrows()))
        colours = colours_for(names)
        for column, panel in enumerate(panels):
            in_panel = points[[all(p[a.record_key] == v for a, v in zip(others, panel, strict=True)) for _, p in points.iterrows()]]
            for row, metric in enumerate(metrics):
                axis = axes[row][column]
                factor, _ = fields.scale(metric)
                for name in names:
                    line = in_panel[[_series_label(p, series) == name and stats.is_number(p[x_axis.record_key])
                                     for _, p in in_panel.iterrows()]]  # a value that is no number has no place on it
                    line = line.sort_values(x_axis.record_key, key=lambda values: values.map(stats.value_order))
                    y = agg.mean.loc[line.index, metric] * factor
                    err = agg.std.loc[line.index, metric] * factor
                    if y.notna().any():
                        axis.errorbar(line[x_axis.record_key], y, yerr=None if err.isna().all() else err.fillna(0),
                                      marker="o", capsize=3, color=colours[name], label=name)
                axis.set_xlabel(x_axis.name.replace("_", " "))
                axis.set_ylabel(axis_label(metric))
                axis.set_xticks(sorted({v for v in points[x_axis.record_key] if stats.is_number(v)}))
                if panel:
                    axis.set_title(_panel_label(panel, others), fontsize=9)
                axis.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        figure.suptitle(f"peak memory and throughput against {x_axis.name.replace('_', ' ')}, one line per precision", fontsize=10)
        made.append(Plot(f"scaling_{x_axis.name}", f"Peak memory and throughput against {x_axis.name.replace('_', ' ')}",
                         png(figure)))
    return made


def optimizer_state_plot(frame: pd.DataFrame) -> Plot | None:
    """Optimizer state bytes per arm, split by dtype, each bar labelled with its share of AdamW's; and the
    peak memory of the train phase beside it."""
    table = optimizer_state_table(frame)
    if table.empty:
        return None
    dtype_columns = [c for c in table.columns if c.endswith(" bytes") and c != "state bytes"]
    memory = fields.first_present(frame, ("memory.train.torch_allocated_peak_bytes", "memory.train.nvml_process_peak_bytes",
                                          "memory.train.rss_peak_bytes"))
    plt = pyplot()
    panels = 2 if memory else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 0.45 * len(table) + 2.2), squeeze=False)
    names = list(table.index)
    axis = axes[0][0]
    left = pd.Series(0.0, index=table.index)
    for colour, column in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), dtype_columns, strict=False):
        values = table[column].astype(float).fillna(0) / 1024
        axis.barh(names, values, left=left, color=colour, label=column.removesuffix(" bytes"))
        left += values
    for name in names:
        ratio = table.loc[name, "÷ adamw state"]
        if pd.notna(ratio):
            axis.annotate(f"{ratio:.3f}× adamw", (left[name], name), textcoords="offset points", xytext=(4, -3), fontsize=8)
    axis.set_xlabel("optimizer state after the first step (KiB)")
    axis.invert_yaxis()
    axis.legend(fontsize=7, loc="lower right")
    axis.grid(axis="x", alpha=0.3)
    axis.set_xlim(0, left.max() * 1.3 or 1)
    if memory:
        agg = stats.aggregate(frame, [memory])
        axis = axes[0][1]
        axis.barh(names, agg.mean.reindex(names)[memory].fillna(0) / 2**20, color=[colours_for(names)[n] for n in names])
        axis.set_xlabel(axis_label(memory))
        axis.invert_yaxis()
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle("optimizer state per optimizer (8-bit state: one byte per element plus a float32 absmax per 256)", fontsize=10)
    return Plot("optimizer_state", "Optimizer state bytes per optimizer, and the train phase's peak memory", png(figure))


def grid_plots(frame: pd.DataFrame) -> list[Plot]:
    """The grid's figures, in report order; none for a suite without axes beyond precision and seed."""
    made = scaling_plots(frame)
    state = optimizer_state_plot(frame)
    return made + ([state] if state is not None else [])
