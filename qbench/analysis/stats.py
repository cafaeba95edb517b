"""Per-arm figures from a frame of records: ratios within a run, mean and spread over seeds, deltas to the baseline.

An *arm* is a cell without its seed: the precision plus the value of every other grid axis
(qbench.contract.grid: optimizer, LoRA rank, batch size, ...) that takes more than one value among the
frame's records. A suite that varies only precisions and seeds has one arm per precision, labelled
with the precision's name; a grid's arms are labelled `nf4-dq adamw8bit`, `bf16 bs4 len64`. Cells
are never averaged across arms: only seeds (and repeated runs) of one arm are.

Each arm is compared with its *baseline arm*: the suite's baseline precision with the same values on
the other axes, except on an axis where every cell of the baseline precision has one value (a suite
that runs bf16 with AdamW only, against NF4 with three optimizers): there the baseline arm keeps that value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from qbench.contract import fields, grid, optimizers, precisions

DEFAULT_SPEED_RATIOS = ("speed.train_samples_per_s",)
ARM = "arm"  # the index name of per-arm tables when arms are more than precisions


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


def plain_value(value: object) -> object:
    """An axis value as one Python value, however the frame got it (JSON, CSV, Parquet): 16.0 -> 16, 'True' -> True."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)) or str(value) in ("True", "False"):
        return str(value) == "True"
    if isinstance(value, (int, float, np.integer, np.floating)) and float(value).is_integer():
        return int(value)
    return value


def axis_columns(frame: pd.DataFrame) -> list[str]:
    """The record columns of the grid axes an arm is made of: precision, then every other axis (but the
    seed) that takes more than one value among the frame's rows."""
    columns = ["precision"] if "precision" in frame.columns else []
    for axis in grid.SETTING_AXES:
        if axis.record_key in frame.columns and frame[axis.record_key].map(plain_value).dropna().nunique() > 1:
            columns.append(axis.record_key)
    return columns


def _label(values: tuple[object, ...], columns: list[str]) -> str:
    parts = [str(values[0])]
    for column, value in zip(columns[1:], values[1:], strict=True):
        axis = next(a for a in grid.SETTING_AXES if a.record_key == column)
        if (value is None or value != value) and not axis.applies_to(str(values[0])):  # None, or NaN in a float column
            continue  # an axis of another kind of precision (LLM.int8's threshold of a dense arm): nothing to name
        parts.append("?" if value is None else axis.id_part(value))
    return " ".join(parts)


def arms(frame: pd.DataFrame, axes: list[str] | None = None) -> pd.Series:
    """Each row's arm label: the precision, then the other varying axes' values as a cell id names them
    (`axes`: these axis columns instead of those that vary in `frame`, to label two frames alike)."""
    columns = axis_columns(frame) if axes is None else [c for c in axes if c in frame.columns]
    if not columns:
        return pd.Series("?", index=frame.index, dtype=object)
    plain = frame[columns].apply(lambda column: column.map(plain_value))
    return pd.Series([_label(tuple(row), columns) for row in plain.itertuples(index=False)], index=frame.index, dtype=object)


def arm_index_name(frame: pd.DataFrame, axes: list[str] | None = None) -> str:
    """`precision` while arms are precisions (a suite without other axes), else `arm`."""
    return "precision" if len(axis_columns(frame) if axes is None else axes) <= 1 else ARM


def value_order(value: object) -> tuple[int, float, str]:
    """A sort key for any mix of values a record may hold where one type belongs (16, "sixteen", 16.5, True,
    None, a list): numbers ascending, then false before true, then text, then anything else by its text, None
    last; values of unlike types are never compared with each other."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (4, 0.0, "")
    if isinstance(value, (bool, np.bool_)):
        return (1, float(value), "")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return (0, float(value), "")
    if isinstance(value, str):
        return (2, 0.0, value)
    return (3, 0.0, str(value))


def is_number(value: object) -> bool:
    """Whether `value` can stand on a numeric axis (a finite int or float, not a bool)."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(float(value)))


def _sort_key(column: str, value: object) -> tuple[int, tuple[int, float, str]]:
    if column == "precision":
        order = list(precisions.REGISTRY)
        return (0, (0, float(order.index(value)), "")) if isinstance(value, str) and value in order else (1, value_order(value))
    if column == grid.BY_NAME["optimizer"].record_key:
        order = list(optimizers.REGISTRY)
        return (0, (0, float(order.index(value)), "")) if isinstance(value, str) and value in order else (1, value_order(value))
    return (1, value_order(value))


def arm_order(frame: pd.DataFrame, axes: list[str] | None = None) -> list[str]:
    """The frame's arms: precisions in registry order (bf16 ... nf4-dq), then the other axes' values in
    order (optimizers in registry order, numbers ascending, false before true)."""
    columns = axis_columns(frame) if axes is None else [c for c in axes if c in frame.columns]
    if not columns:
        return []
    plain = frame[columns].apply(lambda column: column.map(plain_value)).drop_duplicates()
    rows = sorted((tuple(row) for row in plain.itertuples(index=False)),
                  key=lambda row: tuple(_sort_key(c, v) for c, v in zip(columns, row, strict=True)))
    return list(dict.fromkeys(_label(row, columns) for row in rows))


def baseline_arms(frame: pd.DataFrame) -> pd.Series:
    """Each row's baseline arm label (see the module docstring), or None where the frame has no such arm."""
    baseline = baseline_precision(frame)
    columns = axis_columns(frame)
    if baseline is None or not columns:
        return pd.Series(None, index=frame.index, dtype=object)
    plain = frame[columns].apply(lambda column: column.map(plain_value))
    is_base = plain["precision"] == baseline
    fixed = {c: plain.loc[is_base, c].dropna().unique() for c in columns[1:]}
    fixed = {c: values[0] for c, values in fixed.items() if len(values) == 1}
    # an axis the baseline precision has no value on (LLM.int8's threshold when the baseline is dense): none
    fixed.update({axis.record_key: None for axis in grid.SETTING_AXES
                  if axis.record_key in columns and not axis.applies_to(baseline)})
    present = set(arms(frame)[is_base])
    labels = []
    for row in plain.itertuples(index=False):
        values = dict(zip(columns, row, strict=True))
        values.update(fixed, precision=baseline)
        label = _label(tuple(values[c] for c in columns), columns)
        labels.append(label if label in present else None)
    return pd.Series(labels, index=frame.index, dtype=object)


def _run_keys(frame: pd.DataFrame) -> list[str]:
    return [key for key in ("run_id", "seed") if key in frame.columns]


def add_speed_ratios(frame: pd.DataFrame, columns: tuple[str, ...] = DEFAULT_SPEED_RATIOS) -> pd.DataFrame:
    """A copy of `frame` with `ratio.<column>`: each cell's value over its baseline arm's (the baseline
    precision's cell with the same other axes) in the same run and seed.

    Absolute times move from machine to machine (and with the load on one machine); a ratio of two
    cells measured back to back in one run mostly does not.
    """
    frame = frame.copy()
    keys = _run_keys(frame)
    own, base = arms(frame), baseline_arms(frame)
    is_base = frame["precision"] == baseline_precision(frame) if "precision" in frame.columns else own.isna()
    for column in columns:
        target = fields.ratio_column(column)
        frame[target] = float("nan")
        if column not in frame.columns or base.isna().all():
            continue
        values = frame[column].astype(float)
        if "status" in frame.columns:
            values = values.where(frame["status"] == "ok")
        if keys:
            base_values = values[is_base].groupby([frame.loc[is_base, k] for k in keys] + [own[is_base]]).mean()
            lookup = pd.MultiIndex.from_arrays([frame[k] for k in keys] + [base.fillna("")])
        else:
            base_values = values[is_base].groupby(own[is_base]).mean()
            lookup = pd.Index(base.fillna(""))
        denominators = pd.Series(base_values.reindex(lookup).to_numpy(), index=frame.index)
        frame[target] = values / denominators
    return frame


@dataclass(frozen=True)
class Aggregate:
    """Mean, sample standard deviation and count of ok cells per precision (rows) and field (columns)."""

    mean: pd.DataFrame
    std: pd.DataFrame
    count: pd.DataFrame


def aggregate(frame: pd.DataFrame, columns: list[str] | None = None, axes: list[str] | None = None) -> Aggregate:
    """Mean and spread over seeds (and repeated runs) of the ok cells, one row per arm (see the module
    docstring; `axes` as for `arms`)."""
    order = arm_order(frame, axes)
    ok = ok_rows(frame)
    if columns is None:
        columns = [c for c in frame.columns if fields.spec_for(c) is not None]
    columns = [c for c in columns if c in frame.columns]
    numeric = ok[columns].astype(float) if columns else pd.DataFrame(index=ok.index)
    grouped = numeric.groupby(arms(frame, axes)[ok.index], sort=False)
    index = pd.Index(order, name=arm_index_name(frame, axes))
    return Aggregate(
        grouped.mean().reindex(index),
        grouped.std(ddof=1).reindex(index),
        grouped.count().reindex(index).fillna(0).astype(int),
    )


def arm_baselines(frame: pd.DataFrame) -> pd.Series:
    """Arm label -> its baseline arm's label (None where the frame has none), in arm order."""
    pairs = pd.DataFrame({"arm": arms(frame), "base": baseline_arms(frame)}).drop_duplicates("arm").set_index("arm")["base"]
    return pairs.reindex(arm_order(frame))


def delta_to(values: pd.Series, reference: float | pd.Series) -> pd.Series:
    """`values - reference`, with differences of float rounding alone (a mean of two recalls summed in
    another order) made exactly 0, so that equal figures never read as "-0.00, worse". A missing value or
    reference gives a missing difference (NaN), never 0: a figure that was not measured is not "the same"."""
    delta = values - reference
    rounding = delta.abs() <= 1e-9 * np.maximum(np.abs(reference), 1.0)
    return delta.mask(rounding & delta.notna(), 0.0)


def arm_status(frame: pd.DataFrame) -> pd.Series:
    """Arm -> "ok" when every cell of it finished, else what became of them: "failed", "2 interrupted",
    "1 failed of 2", "running" (a run still going, or one that died without a word), in arm order."""
    order = arm_order(frame)
    if "status" not in frame.columns:
        return pd.Series("ok", index=order, dtype=object)
    shown = {}
    for arm, statuses in frame["status"].astype(str).groupby(arms(frame), sort=False):
        bad = statuses[statuses != "ok"]
        if bad.empty:
            shown[arm] = "ok"
        elif len(statuses) == 1:
            shown[arm] = bad.iloc[0]
        else:
            counted = ", ".join(f"{n} {status}" for status, n in bad.value_counts().sort_index().items())
            shown[arm] = counted if len(bad) == len(statuses) else f"{counted} of {len(statuses)}"
    return pd.Series(shown, dtype=object).reindex(order)


def absent_reason(frame: pd.DataFrame, arm: str, column: str | None = None) -> str:
    """Why `arm` has no figure (of `column`): none of its cells finished (and what became of them), or they
    did and their records hold none."""
    status = arm_status(frame).get(arm)
    if status is None or pd.isna(status):
        return "no cell in the records"
    if not (arms(frame)[ok_rows(frame).index] == arm).any():
        return f"no cell finished ({status})"
    return "no figure in the records" + (f" ({column})" if column else "")


# the words of a quality comparison, the same in every table and sentence
BASELINE = "baseline"
from qbench.contract.intervals import NO_DIFFERENCE  # noqa: E402  (the one wording, shared with the cell)

NO_INTERVAL = "no interval to judge by"
BETTER, WORSE, DIFFERS = "better", "worse", "differs"
NOT_MEASURED = "not measured"


NOT_COMPARABLE = "not comparable"
DATA_FINGERPRINT = "data.fingerprint.sha256"


def data_sets(frame: pd.DataFrame) -> pd.Series:
    """Arm -> the data fingerprints of its ok cells (`data.fingerprint.sha256`; an empty set where the
    records do not say: records of a qbench before fingerprints)."""
    order = arm_order(frame)
    if DATA_FINGERPRINT not in frame.columns:
        return pd.Series([frozenset()] * len(order), index=order, dtype=object)
    ok = ok_rows(frame)
    found = ok[DATA_FINGERPRINT].groupby(arms(frame)[ok.index], sort=False).agg(lambda v: frozenset(v.dropna().astype(str)))
    return found.reindex(order).map(lambda v: v if isinstance(v, frozenset) else frozenset())


def _other_data(data: pd.Series, arm: str, base: str) -> str:
    """Why `arm` and its baseline arm were not measured on one data set ("" when they were, or when unknown)."""
    own, theirs = data.get(arm, frozenset()), data.get(base, frozenset())
    if len(own) > 1:
        return f"its cells were trained or evaluated on {len(own)} different data sets (data fingerprint)"
    if own and theirs and own != theirs:
        return f"trained and evaluated on other data than {base} (data fingerprint)"
    return ""


def not_measured(reason: str) -> str:
    """"not measured: no cell finished (failed)": the verdict of a figure that is absent, with why."""
    return f"{NOT_MEASURED}: {reason}"


def session_of(frame: pd.DataFrame) -> pd.Series:
    """Each row's measuring session: `run_session` (the `qbench run` or `--resume` that ran the cell) within its
    run, "" where the records do not say."""
    session = frame["run_session"].astype(object).where(frame["run_session"].notna(), "") if "run_session" in frame.columns \
        else pd.Series("", index=frame.index, dtype=object)
    run = frame["run_id"].astype(str) if "run_id" in frame.columns else pd.Series("", index=frame.index)
    return run + "|" + session.astype(str)


def mixed_sessions(frame: pd.DataFrame) -> pd.Series:
    """Arm -> True when its ok cells and its baseline arm's ok cells in the same run were measured in different
    sessions (a run resumed after an interrupt): their speed ratio sets two moments' machine load side by side."""
    order = arm_order(frame)
    if "run_session" not in frame.columns:
        return pd.Series(False, index=order)
    ok = ok_rows(frame)
    own, base, session = arms(frame)[ok.index], baseline_arms(frame)[ok.index], session_of(frame)[ok.index]
    run = ok["run_id"].astype(str) if "run_id" in ok.columns else pd.Series("", index=ok.index)
    mixed = {}
    for arm in order:
        rows = own == arm
        base_arm = base[rows].dropna()
        if base_arm.empty:
            mixed[arm] = False
            continue
        together = rows | ((own == base_arm.iloc[0]) & run.isin(set(run[rows])))
        mixed[arm] = bool(session[together].groupby(run[together]).nunique().gt(1).any())
    return pd.Series(mixed).reindex(order).fillna(False).astype(bool)


DEFAULT_CONFIDENCE = 0.95


def z_for(confidence: float) -> float:
    """The two-sided normal quantile of a confidence level: 1.96 for 0.95."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def confidence_of(frame: pd.DataFrame) -> float:
    """The confidence level the records' intervals were made at (`interval.confidence`), else 0.95."""
    if "interval.confidence" in frame.columns:
        levels = frame["interval.confidence"].astype(float).dropna()
        if not levels.empty:
            return float(levels.mode().iloc[0])
    return DEFAULT_CONFIDENCE


def confidence_label(frame: pd.DataFrame | None = None) -> str:
    """"95 % interval": how tables head a column of intervals."""
    level = confidence_of(frame) if frame is not None else DEFAULT_CONFIDENCE
    return f"{100 * level:g} % interval"


def interval_column(column: str, part: str) -> str:
    """`quality.eval_after.mean_recall@1`, "low" -> `interval.eval_after.mean_recall@1.low` (the record's bootstrap interval)."""
    return f"interval.{column.removeprefix('quality.')}.{part}"


def quality_intervals(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per arm (per precision in a suite without other axes): a quality figure's mean over ok cells and
    its uncertainty, in the stored unit.

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
    order = arm_order(frame)
    table = pd.DataFrame(index=pd.Index(order, name=arm_index_name(frame)), columns=["mean", "se", "low", "high", "cells", "source"],
                         dtype=object)
    if column not in frame.columns:
        return table.iloc[0:0]
    ok = ok_rows(frame)
    labels = arms(frame)[ok.index]  # labelled over every cell, as every per-arm table is
    z = z_for(confidence_of(frame))

    def numeric(name: str) -> pd.Series:
        return ok[name].astype(float) if name in ok.columns else pd.Series(float("nan"), index=ok.index)

    values, se, low, high = (numeric(c) for c in (column, interval_column(column, "se"), interval_column(column, "low"),
                                                 interval_column(column, "high")))
    seeds = ok["seed"] if "seed" in ok.columns else pd.Series(range(len(ok)), index=ok.index)
    for arm in order:
        mask = (labels == arm) & values.notna()
        cells = int(mask.sum())
        if cells == 0:
            table.loc[arm] = [float("nan"), float("nan"), float("nan"), float("nan"), 0, None]
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
        table.loc[arm] = [mean, total, lo, hi, cells, source]
    for name in ("mean", "se", "low", "high"):
        table[name] = pd.to_numeric(table[name])
    return table


@dataclass(frozen=True)
class QualityComparison:
    """A quality figure of every arm against its baseline arm's (the baseline precision's, in a suite without
    other axes), with the noise of the difference.

    table columns: mean, se, low, high (of the figure, stored unit), baseline_arm, delta, delta_low, delta_high
    (this arm minus its baseline arm's), verdict: BASELINE, NO_DIFFERENCE (equal figures, or the difference's
    interval holds 0), BETTER / WORSE (it does not), NO_INTERVAL (the records give no noise to judge by:
    neither a bootstrap interval nor several seeds), or `not_measured(why)` where this arm or its baseline
    arm has no figure (a failed, interrupted or running cell): no difference is made up for it;
    "not comparable: why" (no difference either) where the two were trained or evaluated on other data.
    """

    column: str
    baseline: str
    confidence: float
    table: pd.DataFrame


def compare_quality(frame: pd.DataFrame, column: str) -> QualityComparison | None:
    """Each arm's `column` against its baseline arm's: difference, its interval and a word for it.

    The difference's standard error is sqrt(se_a² + se_b²): the two arms' errors are taken as
    independent, which overstates the noise of a difference measured on one shared eval set (a
    paired bootstrap would need every query's hit in the record) — so a word "better" or "worse"
    is never given on a difference the data cannot separate, at the price of sometimes saying
    "same within noise" where a paired test could tell.
    """
    baseline = baseline_precision(frame)
    intervals = quality_intervals(frame, column)
    if baseline is None or intervals.empty:
        return None
    bases = arm_baselines(frame).reindex(intervals.index)
    base_mean = pd.Series(intervals["mean"].reindex(bases.fillna("")).to_numpy(), index=intervals.index)
    base_se = pd.Series(intervals["se"].reindex(bases.fillna("")).to_numpy(), index=intervals.index)
    if base_mean.isna().all():
        return None
    confidence = confidence_of(frame)
    z = z_for(confidence)
    spec = fields.spec_for(column)
    table = intervals.copy()
    table["baseline_arm"] = bases
    table["delta"] = delta_to(intervals["mean"], base_mean)
    noise = (intervals["se"] ** 2 + base_se**2) ** 0.5
    table["delta_low"] = table["delta"] - z * noise
    table["delta_high"] = table["delta"] + z * noise
    verdicts = []
    data = data_sets(frame)
    for arm, row in table.iterrows():
        base = bases[arm]
        differ = isinstance(base, str) and arm != base and pd.notna(row["mean"]) and _other_data(data, arm, base)
        if differ:
            table.loc[arm, ["delta", "delta_low", "delta_high"]] = float("nan")
            verdicts.append(f"{NOT_COMPARABLE}: {differ}")
        elif arm == base:
            verdicts.append(BASELINE if pd.notna(row["mean"]) else not_measured(absent_reason(frame, arm, column)))
        elif pd.isna(row["mean"]):
            verdicts.append(not_measured(absent_reason(frame, arm, column)))
        elif base is None or pd.isna(base) or pd.isna(row["delta"]):
            verdicts.append(not_measured(f"its baseline arm {base} has no figure" if isinstance(base, str) else "no baseline arm"))
        elif row["delta"] == 0:
            verdicts.append(NO_DIFFERENCE)
        elif pd.isna(noise[arm]):
            verdicts.append(NO_INTERVAL)
        elif abs(row["delta"]) <= z * noise[arm]:
            verdicts.append(NO_DIFFERENCE)
        elif spec is None or spec.direction is None:
            verdicts.append(DIFFERS)
        else:
            verdicts.append(BETTER if (row["delta"] > 0) == (spec.direction == "higher") else WORSE)
    table["verdict"] = verdicts
    table.loc[table["verdict"] == BASELINE, ["delta_low", "delta_high"]] = float("nan")
    return QualityComparison(column, baseline, confidence, table)


@dataclass(frozen=True)
class Relative:
    """Each arm against its baseline arm (rows; in a suite without other axes: each precision against the
    baseline precision), numeric columns in the report's conventions:

    weights_less_pct, memory_less_pct, increase_less_pct: % smaller than the baseline (negative: larger; the
    renderers say "smaller by" / "larger by"); speed_x: this precision's throughput as a multiple of the
    baseline's (above 1: faster), from ratios measured within one run; speed_mixed: that ratio sets cells of
    different sessions side by side (a resumed run); quality: the headline quality comparison.
    """

    baseline: str
    table: pd.DataFrame
    memory_column: str | None
    throughput_column: str | None
    quality: QualityComparison | None
    bases: pd.Series | None = None  # arm -> its baseline arm (the arm itself for a baseline arm; None: it has none)

    def base_of(self, arm: str) -> str | None:
        """The baseline arm `arm` is compared with (the baseline precision in a suite without other axes)."""
        if self.bases is None:
            return self.baseline
        base = self.bases.get(arm)
        return None if base is None or pd.isna(base) else str(base)


def _less_pct(values: pd.Series, reference: float | pd.Series) -> pd.Series:
    """% less than `reference` (one value, or one per row), with float rounding alone made exactly 0 (no "-0.00")."""
    reference = pd.Series(reference, index=values.index, dtype=float)
    usable = reference.notna() & (reference != 0)
    less = delta_to(100 * (1 - values / reference.where(usable)), 0.0)
    return less.where(usable & values.notna())


def relative(frame: pd.DataFrame) -> Relative | None:
    """Weights, peak memory (the frame's headline source, and its increase over the process baseline),
    speed and headline quality of every arm against its baseline arm; None without one."""
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
    bases = arm_baselines(frame).reindex(agg.mean.index)
    measured = agg.count.max(axis=1) > 0
    bases = bases.where(bases.isin(agg.mean.index[measured]))  # a baseline arm without an ok cell is no baseline
    if bases.isna().all():
        return None

    def base(values: pd.Series) -> pd.Series:
        """Each arm's baseline arm's value."""
        return pd.Series(values.reindex(bases.fillna("")).to_numpy(), index=values.index)

    table = pd.DataFrame(index=agg.mean.index)
    if fields.HEADLINE_WEIGHTS in agg.mean.columns:
        table["weights_less_pct"] = _less_pct(agg.mean[fields.HEADLINE_WEIGHTS], base(agg.mean[fields.HEADLINE_WEIGHTS]))
    if memory:
        table["memory_less_pct"] = _less_pct(agg.mean[memory], base(agg.mean[memory]))
        increase = agg.mean[memory] - agg.mean[process] if process in agg.mean.columns else None
        if increase is not None and base(increase).notna().any():
            table["increase_less_pct"] = _less_pct(increase, base(increase))
    if throughput:
        table["speed_x"] = agg.mean[fields.ratio_column(throughput)]
        table["speed_mixed"] = mixed_sessions(frame).reindex(table.index).fillna(False) & table["speed_x"].notna()
    return Relative(baseline, table, memory, throughput, compare_quality(frame, quality) if quality else None, bases)


# how relative_to_baseline's headers end: a % smaller (negative: larger) or a multiple of the baseline's figure
SMALLER = "(% smaller)"
TIMES = "(×)"
MIXED = "speed ratio mixes sessions"  # a boolean column: the ratio's cells were measured in different sessions


def relative_to_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """`relative(frame)` as one numeric table with the report's column names (empty without a baseline):
    "... (% smaller)" columns (negative: larger), "... (×)" columns, the headline quality difference with its
    interval (`Δ ...`, `... low`, `... high`) and its verdict word."""
    result = relative(frame)
    if result is None:
        return pd.DataFrame()
    b = result.baseline
    names = {"weights_less_pct": f"base weights vs {b} {SMALLER}"}
    if result.memory_column:
        names["memory_less_pct"] = f"peak {fields.memory_source_label(result.memory_column)} vs {b} {SMALLER}"
        names["increase_less_pct"] = f"peak above the process baseline vs {b} {SMALLER}"
    if result.throughput_column:
        names["speed_x"] = f"{fields.label(result.throughput_column)} vs {b} {TIMES}"
        names["speed_mixed"] = MIXED
    table = result.table.rename(columns=names)
    if len(axis_columns(frame)) > 1:  # a grid: say which arm each row is compared with
        table.insert(0, "baseline arm", result.bases)
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
    """One row per arm: `<column>` mean, `<column> std` and `<column> n`, in the stored units."""
    stats = aggregate(frame, columns)
    parts = []
    for column in stats.mean.columns:
        parts += [stats.mean[column], stats.std[column].rename(f"{column} std"), stats.count[column].rename(f"{column} n")]
    table = pd.concat(parts, axis=1) if parts else pd.DataFrame(index=stats.mean.index)
    table.index.name = arm_index_name(frame)
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
