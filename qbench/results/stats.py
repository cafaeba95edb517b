"""Per-precision figures from a frame of records: ratios within a run, mean and spread over seeds, deltas to the baseline."""

from __future__ import annotations

from dataclasses import dataclass

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


def relative_to_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Each precision against the baseline precision: memory and weights saved, quality delta, slowdown.

    Slowdown is the baseline's throughput over this precision's, measured within one run (the mean of
    the per-run ratios), so it holds across machines; > 1 means slower than the baseline.
    """
    baseline = baseline_precision(frame)
    if frame.empty or baseline is None:
        return pd.DataFrame()
    quality = fields.first_present(frame, fields.HEADLINE_QUALITY)
    memory = fields.first_present(frame, fields.HEADLINE_PEAK_MEMORY)
    throughput = fields.first_present(frame, fields.HEADLINE_THROUGHPUT)
    with_ratios = add_speed_ratios(frame, (throughput,)) if throughput else frame
    wanted = [c for c in (fields.HEADLINE_WEIGHTS, memory, quality) if c]
    if throughput:
        wanted.append(fields.ratio_column(throughput))
    stats = aggregate(with_ratios, wanted)
    if baseline not in stats.mean.index:
        return pd.DataFrame()
    base = stats.mean.loc[baseline]
    table = pd.DataFrame(index=stats.mean.index)
    table.index.name = "precision"
    if fields.HEADLINE_WEIGHTS in stats.mean.columns:
        table["weights saved %"] = 100 * (1 - stats.mean[fields.HEADLINE_WEIGHTS] / base[fields.HEADLINE_WEIGHTS])
    if memory:
        source = memory.split(".")[-1].removesuffix("_bytes").replace("_", " ")
        table[f"peak memory saved % ({source})"] = 100 * (1 - stats.mean[memory] / base[memory])
    if quality:
        factor, unit = fields.scale(quality)
        unit = "points" if unit == "%" else ("" if unit in fields.label(quality) else unit)
        delta = delta_to(stats.mean[quality], base[quality])
        table[f"Δ {fields.label(quality)} ({unit})".replace(" ()", "")] = delta * factor
        spec = fields.spec_for(quality)
        if spec is not None and spec.direction is not None:
            better = delta > 0 if spec.direction == "higher" else delta < 0
            table["quality vs baseline"] = better.map({True: "better", False: "worse"}).where(delta != 0, "same")
    if throughput:
        table["slowdown ×"] = 1 / stats.mean[fields.ratio_column(throughput)]
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


def pareto_front(cost: pd.Series, quality: pd.Series, higher_is_better: bool) -> pd.Series:
    """True for the points no other point beats: as cheap or cheaper and as good or better, one strictly."""
    goodness = quality if higher_is_better else -quality
    on_front = pd.Series(False, index=cost.index)
    valid = cost.notna() & quality.notna()
    for name in cost.index[valid]:
        others = valid & (cost.index != name)
        dominated = others & (cost <= cost[name]) & (goodness >= goodness[name]) & (
            (cost < cost[name]) | (goodness > goodness[name])
        )
        on_front[name] = not dominated.any()
    return on_front
