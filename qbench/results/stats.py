"""Per-precision figures from a frame of records: ratios within a run, mean and spread over seeds, deltas to the baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import pandas as pd

from qbench.results import fields
from qbench.suite import precisions

DEFAULT_SPEED_RATIOS = ("speed.train_samples_per_s",)


def ok_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"] if "status" in frame.columns else frame


def precision_order(frame: pd.DataFrame) -> list[str]:
    """Precisions of the frame in registry order (bf16 ... nf4-dq), unknown names after them."""
    present = list(dict.fromkeys(frame["precision"])) if "precision" in frame.columns else []
    known = [p for p in precisions.REGISTRY if p in present]
    return known + [p for p in present if p not in known]


def baseline_precision(frame: pd.DataFrame) -> str | None:
    """The suite's baseline precision, as the records say (the most common value if shards disagree)."""
    if "baseline_precision" not in frame.columns or frame["baseline_precision"].dropna().empty:
        return None
    return str(frame["baseline_precision"].dropna().mode().iloc[0])


def _run_keys(frame: pd.DataFrame) -> list[str]:
    return [key for key in ("run_id", "seed") if key in frame.columns]


def add_speed_ratios(frame: pd.DataFrame, columns: tuple[str, ...] = DEFAULT_SPEED_RATIOS) -> pd.DataFrame:
    """A copy of `frame` with `ratio.<column>`: each cell's value over the baseline precision's in the same run and seed.

    Absolute times move from machine to machine (and with the load on one machine); a ratio of two
    cells measured back to back in one run mostly does not.
    """
    frame = frame.copy()
    baseline = baseline_precision(frame)
    keys = _run_keys(frame)
    for column in columns:
        target = fields.ratio_column(column)
        frame[target] = float("nan")
        if column not in frame.columns or baseline is None:
            continue
        values = pd.to_numeric(frame[column], errors="coerce")
        if "status" in frame.columns:
            values = values.where(frame["status"] == "ok")
        is_base = frame["precision"] == baseline
        if keys:
            base_values = values[is_base].groupby([frame.loc[is_base, k] for k in keys]).mean()
            lookup = pd.MultiIndex.from_frame(frame[keys]) if len(keys) > 1 else pd.Index(frame[keys[0]])
            denominators = pd.Series(base_values.reindex(lookup).to_numpy(), index=frame.index)
        else:
            denominators = pd.Series(values[is_base].mean(), index=frame.index)
        frame[target] = values / denominators
    return frame


@dataclass(frozen=True)
class Aggregate:
    """Mean, sample standard deviation and count of ok cells per precision (rows) and field (columns)."""

    mean: pd.DataFrame
    std: pd.DataFrame
    count: pd.DataFrame


def aggregate(frame: pd.DataFrame, columns: list[str] | None = None) -> Aggregate:
    """Mean and spread over seeds (and repeated runs) of the ok cells, one row per precision."""
    order = precision_order(frame)
    ok = ok_rows(frame)
    if columns is None:
        columns = [c for c in frame.columns if fields.spec_for(c) is not None]
    columns = [c for c in columns if c in frame.columns]
    numeric = ok[columns].apply(pd.to_numeric, errors="coerce") if columns else pd.DataFrame(index=ok.index)
    grouped = numeric.groupby(ok["precision"], sort=False)
    return Aggregate(
        grouped.mean().reindex(order),
        grouped.std(ddof=1).reindex(order),
        grouped.count().reindex(order).fillna(0).astype(int),
    )


def delta_to(values: pd.Series, reference: float) -> pd.Series:
    """`values - reference`, with differences of float rounding alone (a mean of two recalls summed in
    another order) made exactly 0, so that equal figures never read as "-0.00, worse"."""
    delta = values - reference
    return delta.where(delta.abs() > 1e-9 * max(abs(reference), 1.0), 0.0)


DEFAULT_CONFIDENCE = 0.95


def z_for(confidence: float) -> float:
    """The two-sided normal quantile of a confidence level: 1.96 for 0.95."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def confidence_of(frame: pd.DataFrame) -> float:
    """The confidence level the records' intervals were made at (`interval.confidence`), else 0.95."""
    if "interval.confidence" in frame.columns:
        levels = pd.to_numeric(frame["interval.confidence"], errors="coerce").dropna()
        if not levels.empty:
            return float(levels.mode().iloc[0])
    return DEFAULT_CONFIDENCE


def confidence_label(frame: pd.DataFrame | None = None) -> str:
    """"95 % interval": how tables head a column of intervals."""
    level = confidence_of(frame) if frame is not None else DEFAULT_CONFIDENCE
    return f"{100 * level:g} % interval"


def interval_column(column: str, part: str) -> str:
    """`quality.after.mean_recall@1`, "low" -> `interval.after.mean_recall@1.low` (the record's bootstrap interval)."""
    return f"interval.{column.removeprefix('quality.')}.{part}"


def quality_intervals(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per precision: a quality figure's mean over ok cells and its uncertainty, in the stored unit.

    Columns: mean, se, low, high, cells, source. Two kinds of noise are combined, each where the
    records have it: the eval set's sampling error (the cell's bootstrap standard error over eval
    queries or windows, `interval.<phase>.<name>.se`; cells share the eval set, so it does not shrink
    with more seeds: the root mean square of theirs is used) and the seeds' spread (the standard
    error of the mean, sample std / sqrt(n), from two or more cells). se = sqrt(eval² + seeds²).
    One cell keeps its own bootstrap interval (percentile, not symmetric); otherwise the interval is
    mean ± z·se at the records' confidence (`interval.confidence`, else 95 %). se is NaN when the
    records give neither kind of noise: then nothing can be said about a difference. Repeated runs of
    one seed count once (their mean): they repeat the same training, they do not sample its noise.
    """
    order = precision_order(frame)
    table = pd.DataFrame(index=pd.Index(order, name="precision"), columns=["mean", "se", "low", "high", "cells", "source"], dtype=object)
    if column not in frame.columns:
        return table.iloc[0:0]
    ok = ok_rows(frame)
    z = z_for(confidence_of(frame))

    def numeric(name: str) -> pd.Series:
        return pd.to_numeric(ok[name], errors="coerce") if name in ok.columns else pd.Series(float("nan"), index=ok.index)

    values, se, low, high = (numeric(c) for c in (column, interval_column(column, "se"), interval_column(column, "low"),
                                                 interval_column(column, "high")))
    seeds = ok["seed"] if "seed" in ok.columns else pd.Series(range(len(ok)), index=ok.index)
    for precision in order:
        mask = (ok["precision"] == precision) & values.notna()
        cells = int(mask.sum())
        if cells == 0:
            table.loc[precision] = [float("nan"), float("nan"), float("nan"), float("nan"), 0, None]
            continue
        mean = float(values[mask].mean())
        eval_se = float(math.sqrt((se[mask] ** 2).dropna().mean())) if se[mask].notna().any() else float("nan")
        # repeated runs of one seed are not independent draws of training noise (on a CPU they are bit-identical):
        # the spread is taken over the seeds' means
        per_seed = values[mask].groupby(seeds[mask]).mean()
        seeds_se = float(per_seed.std(ddof=1) / math.sqrt(len(per_seed))) if len(per_seed) >= 2 else float("nan")
        parts = [p for p in (eval_se, seeds_se) if not math.isnan(p)]
        total = math.sqrt(sum(p * p for p in parts)) if parts else float("nan")
        source = " + ".join(name for name, p in (("bootstrap", eval_se), ("seeds", seeds_se)) if not math.isnan(p)) or None
        if cells == 1 and low[mask].notna().all() and high[mask].notna().all():
            lo, hi = float(low[mask].iloc[0]), float(high[mask].iloc[0])
        elif parts:
            lo, hi = mean - z * total, mean + z * total
        else:
            lo = hi = float("nan")
        table.loc[precision] = [mean, total, lo, hi, cells, source]
    for name in ("mean", "se", "low", "high"):
        table[name] = pd.to_numeric(table[name])
    return table


@dataclass(frozen=True)
class QualityComparison:
    """A quality figure of every precision against the baseline precision's, with the noise of the difference.

    table columns: mean, se, low, high (of the figure, stored unit), delta, delta_low, delta_high (this
    precision minus the baseline's), verdict: "baseline", "same" (equal figures), "same within noise"
    (the difference's interval holds 0), "better" / "worse" (it does not), "no interval" (the records
    give no noise to judge by: neither a bootstrap interval nor several seeds).
    """

    column: str
    baseline: str
    confidence: float
    table: pd.DataFrame


def compare_quality(frame: pd.DataFrame, column: str) -> QualityComparison | None:
    """Each precision's `column` against the baseline precision's: difference, its interval and a word for it.

    The difference's standard error is sqrt(se_a² + se_b²): the two arms' errors are taken as
    independent, which overstates the noise of a difference measured on one shared eval set (a
    paired bootstrap would need every query's hit in the record) — so a word "better" or "worse"
    is never given on a difference the data cannot separate, at the price of sometimes saying
    "same within noise" where a paired test could tell.
    """
    baseline = baseline_precision(frame)
    intervals = quality_intervals(frame, column)
    if baseline is None or intervals.empty or baseline not in intervals.index or pd.isna(intervals.loc[baseline, "mean"]):
        return None
    confidence = confidence_of(frame)
    z = z_for(confidence)
    spec = fields.spec_for(column)
    base = intervals.loc[baseline]
    table = intervals.copy()
    table["delta"] = delta_to(intervals["mean"], float(base["mean"]))
    noise = (intervals["se"] ** 2 + float(base["se"]) ** 2) ** 0.5
    table["delta_low"] = table["delta"] - z * noise
    table["delta_high"] = table["delta"] + z * noise
    verdicts = []
    for precision, row in table.iterrows():
        if precision == baseline:
            verdicts.append("baseline")
        elif pd.isna(row["delta"]):
            verdicts.append(None)
        elif row["delta"] == 0:
            verdicts.append("same")
        elif pd.isna(noise[precision]):
            verdicts.append("no interval")
        elif abs(row["delta"]) <= z * noise[precision]:
            verdicts.append("same within noise")
        elif spec is None or spec.direction is None:
            verdicts.append("differs")
        else:
            verdicts.append("better" if (row["delta"] > 0) == (spec.direction == "higher") else "worse")
    table["verdict"] = verdicts
    table.loc[baseline, ["delta_low", "delta_high"]] = float("nan")
    return QualityComparison(column, baseline, confidence, table)


@dataclass(frozen=True)
class Relative:
    """Each precision against the baseline precision (rows), numeric columns in the report's conventions:

    weights_less_pct, memory_less_pct, increase_less_pct: % less than the baseline (positive: smaller;
    negative: larger); speed_x: this precision's throughput as a multiple of the baseline's (above 1:
    faster), from ratios measured within one run; quality: the headline quality comparison.
    """

    baseline: str
    table: pd.DataFrame
    memory_column: str | None
    throughput_column: str | None
    quality: QualityComparison | None


def _less_pct(values: pd.Series, reference: float) -> pd.Series:
    """% less than `reference`, with float rounding alone made exactly 0 (no "-0.00")."""
    if pd.isna(reference) or reference == 0:
        return pd.Series(float("nan"), index=values.index)
    return delta_to(100 * (1 - values / reference), 0.0)


def relative(frame: pd.DataFrame) -> Relative | None:
    """Weights, peak memory (the frame's headline source, and its increase over the process baseline),
    speed and headline quality of every precision against the baseline precision; None without one."""
    baseline = baseline_precision(frame)
    if frame.empty or baseline is None:
        return None
    quality = fields.first_present(frame, fields.HEADLINE_QUALITY)
    memory = fields.first_present(frame, fields.HEADLINE_PEAK_MEMORY)
    process = fields.process_baseline_of(memory) if memory else None
    throughput = fields.first_present(frame, fields.HEADLINE_THROUGHPUT)
    with_ratios = add_speed_ratios(frame, (throughput,)) if throughput else frame
    wanted = [c for c in (fields.HEADLINE_WEIGHTS, memory, process) if c]
    if throughput:
        wanted.append(fields.ratio_column(throughput))
    agg = aggregate(with_ratios, wanted)
    if baseline not in agg.mean.index or agg.count.loc[baseline].max() == 0:
        return None
    base = agg.mean.loc[baseline]
    table = pd.DataFrame(index=agg.mean.index)
    table.index.name = "precision"
    if fields.HEADLINE_WEIGHTS in agg.mean.columns:
        table["weights_less_pct"] = _less_pct(agg.mean[fields.HEADLINE_WEIGHTS], base[fields.HEADLINE_WEIGHTS])
    if memory:
        table["memory_less_pct"] = _less_pct(agg.mean[memory], base[memory])
        increase = agg.mean[memory] - agg.mean[process] if process in agg.mean.columns else None
        if increase is not None and pd.notna(increase.get(baseline)):
            table["increase_less_pct"] = _less_pct(increase, increase[baseline])
    if throughput:
        table["speed_x"] = agg.mean[fields.ratio_column(throughput)]
    return Relative(baseline, table, memory, throughput, compare_quality(frame, quality) if quality else None)


def relative_to_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """`relative(frame)` as one numeric table with the report's column names (empty without a baseline)."""
    result = relative(frame)
    if result is None:
        return pd.DataFrame()
    b = result.baseline
    names = {"weights_less_pct": f"weights (% less than {b})"}
    if result.memory_column:
        names["memory_less_pct"] = f"peak {fields.memory_source_label(result.memory_column)} (% less than {b})"
        names["increase_less_pct"] = f"increase over process baseline (% less than {b})"
    if result.throughput_column:
        names["speed_x"] = f"{fields.label(result.throughput_column)} (× of {b})"
    table = result.table.rename(columns=names)
    if result.quality is not None:
        factor, unit = fields.scale(result.quality.column)
        unit = "points" if unit == "%" else unit
        head = fields.headed(f"Δ {fields.quality_name(result.quality.column, short=True)}", unit)
        q = result.quality.table
        table[head] = q["delta"] * factor
        table[f"{head} low"] = q["delta_low"] * factor
        table[f"{head} high"] = q["delta_high"] * factor
        table[f"quality vs {b}"] = q["verdict"]
    return table


def mean_and_spread(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """One row per precision: `<column>` mean, `<column> std` and `<column> n`, in the stored units."""
    stats = aggregate(frame, columns)
    parts = []
    for column in stats.mean.columns:
        parts += [stats.mean[column], stats.std[column].rename(f"{column} std"), stats.count[column].rename(f"{column} n")]
    table = pd.concat(parts, axis=1) if parts else pd.DataFrame(index=stats.mean.index)
    table.index.name = "precision"
    return table


def pareto_front(cost: pd.Series, quality: pd.Series, higher_is_better: bool, se: pd.Series | None = None,
                 confidence: float = DEFAULT_CONFIDENCE) -> pd.Series:
    """True for the points no other point beats: as cheap or cheaper and as good or better, one strictly.

    With `se` (each point's quality standard error), "as good" means not worse beyond the noise and
    "better" means better beyond it: two qualities whose difference lies within z·sqrt(se_a² + se_b²)
    count as equal, so a point is on the front for a cost it saves or a quality difference the data
    can tell, never for a difference inside the noise. A missing se counts as 0 (exact values).
    """
    goodness = quality if higher_is_better else -quality
    noise = (se.reindex(cost.index).fillna(0.0) if se is not None else pd.Series(0.0, index=cost.index)).astype(float)
    z = z_for(confidence)
    on_front = pd.Series(False, index=cost.index)
    valid = cost.notna() & quality.notna()
    for name in cost.index[valid]:
        others = valid & (cost.index != name)
        margin = z * (noise**2 + noise[name] ** 2) ** 0.5
        not_worse = goodness >= goodness[name] - margin
        clearly_better = goodness > goodness[name] + margin
        dominated = others & (cost <= cost[name]) & not_worse & ((cost < cost[name]) | clearly_better)
        on_front[name] = not dominated.any()
    return on_front
