"""Baseline vs new results: direction-aware tolerances per metric, a noise floor from seeds, a Markdown verdict.

Cells are matched by every axis of the grid (qbench.contract.grid): each arm of the baseline (precision,
plus every other axis that varies: optimizer, LoRA rank, batch size, ...) is compared with the same arm
of the new results, averaged over seeds; a cell of the baseline (arm and seed) with no record in the
new results is a regression, as is a cell that failed.

What is compared comes from the metric registry (`qbench.contract.fields`):
- exact metrics (weight bytes, bits per parameter, parameter and module counts) must match;
- quality and memory may move the worse way by their tolerance (or by the seeds' noise, if larger);
- counts of non-finite model outputs in evaluation (`quality.<phase>.nonfinite_*`) must not rise;
- interval bounds (`interval.*`) describe a metric's noise and are not gated themselves;
- absolute times and rates are never compared (they move from machine to machine); speed is
  compared as ratios measured within one run, e.g. nf4-dq samples/s over dense samples/s, each judged by a
  one-sided rank test over its cells (qbench.analysis.gate.speed: a regression when the test rejects at
  p < RATIO_ALPHA and the median moved the worse way by more than the tolerance; not judged, never "ok", with
  fewer cells a side than the test needs). On a CPU the same ratios of CPU time are judged too (samples per
  CPU-second of the timed steps): a busy machine makes steps wait for a core, which moves wall time a lot
  and CPU time little. The wall-time ratios of a run in which a cell was contended (its threads waited for a
  core, see `speed.contended`) are not judged; no speed ratio is when a cell had a core less than half the
  time it wanted one (then its CPU time moved too); the verdict says why. A ratio cannot see a slowdown of
  every arm: `qbench gate` (qbench.analysis.gate.same_job) judges speed against the baseline's code re-run
  in the same job instead.
Tolerances: the command line's, then the suite's `[compare.tolerances]`, then DEFAULT_TOLERANCES;
for each field the first pattern that matches wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import pandas as pd
from pydantic import ValidationError

from qbench.analysis import stats
from qbench.analysis.gate import speed as rank
from qbench.contract import fields, grid
from qbench.contract.exitcodes import Exit
from qbench.contract.schema import SCHEMA_VERSION, STARVED_SHARE
from qbench.contract.suite import CompareSpec, ToleranceSpec

# quality tolerances are in the stored unit: recall is a fraction, so 0.03 is 3 points
DEFAULT_TOLERANCES: tuple[tuple[str, ToleranceSpec], ...] = (
    ("quality.*nonfinite_*", ToleranceSpec(abs=0.0)),  # one more NaN embedding or logit is a regression
    ("quality.*recall@*", ToleranceSpec(abs=0.03)),
    ("quality.*accuracy*", ToleranceSpec(abs=0.03)),
    ("quality.*perplexity*", ToleranceSpec(rel=0.03)),
    ("quality.*bits_per_byte*", ToleranceSpec(rel=0.02)),
    ("quality.*nll*", ToleranceSpec(rel=0.02)),
    ("quality.*loss*", ToleranceSpec(rel=0.05)),
    ("train.*loss", ToleranceSpec(rel=0.05)),
    ("memory.*fork_server_share_bytes", ToleranceSpec(ignore=True)),  # a part of the PSS figure, judged there
    ("memory.*torch_*_bytes", ToleranceSpec(rel=0.05)),
    ("memory.*nvml_*_bytes", ToleranceSpec(rel=0.10)),
    ("memory.*_bytes", ToleranceSpec(rel=0.15)),
    (fields.RATIO_PREFIX + "*", ToleranceSpec(rel=0.20)),
)
EXACT = ToleranceSpec(abs=0.0, rel=1e-9)  # float noise only: bits per parameter is a quotient
GATED_KINDS = ("exact", "quality", "health", "memory", "speed-ratio")
NO_NOISE_KINDS = ("exact", "health")  # deterministic or must-not-rise: no allowance from the seeds' spread
# what must agree for two sets of records to be comparable at all
# baseline_precision: every speed ratio and delta is taken against it, so both sides must name the same arm
IDENTITY_COLUMNS = ("suite", "task", "model", "data.source", "eval.protocol", "baseline_precision")

# how a cell's process started and how many ran side by side: a forked cell shares the fork server's pages
# (and its siblings'). Its PSS is recorded as its own process's (the server's share of the shared pages added:
# qbench.cell.measure.forked), so PSS compares across launchers when one cell ran at a time; RSS and the PSS as
# forked (tree_pss) do not, nor does anything when a different number of cells shared the server at once
PROCESS_SHAPE_COLUMNS = {"env.cell_launcher": "cells started differently", "env.cells_side_by_side": "a different number of cells ran side by side"}
# the memory figures that are the fine-tune's whatever started the cell (records that hold the PSS as forked
# beside them; older records counted only the forked tree's share)
LAUNCHER_FREE_MEMORY = ("pss_peak_bytes", "memory.all_phases.pss_peak_bytes", "memory.process_baseline.pss_bytes")


@dataclass(frozen=True)
class Settings:
    """Tolerance rules in priority order, the speed fields compared as ratios, the noise multiplier."""

    rules: tuple[tuple[str, ToleranceSpec, str], ...] = ()  # (pattern, tolerance, where it came from)
    speed_ratios: tuple[str, ...] = stats.DEFAULT_SPEED_RATIOS
    noise_sigmas: float = 3.0

    @classmethod
    def build(cls, suite: CompareSpec | None = None, overrides: list[tuple[str, ToleranceSpec]] | None = None,
              noise_sigmas: float | None = None, suite_source: str = "suite") -> Settings:
        suite = suite or CompareSpec()
        rules = [(p, t, "command line") for p, t in overrides or []]
        rules += [(p, t, suite_source) for p, t in suite.tolerances.items()]
        rules += [(p, t, "default") for p, t in DEFAULT_TOLERANCES]
        return cls(tuple(rules), suite.speed_ratios, suite.noise_sigmas if noise_sigmas is None else noise_sigmas)

    def tolerance_for(self, name: str, kind: str) -> tuple[ToleranceSpec, str]:
        for pattern, tolerance, source in self.rules:
            if source == "default" and kind == "exact":
                break
            if fnmatchcase(name, pattern):
                return tolerance, f"{source}: {pattern}"
        if kind == "exact":
            return EXACT, "exact"
        return ToleranceSpec(abs=0.0), "none (must not get worse)"


def settings_of_runs(paths: list, overrides: list[tuple[str, ToleranceSpec]] | None = None,
                     noise_sigmas: float | None = None) -> Settings:
    """The [compare] settings of the suite text stored in the first run directory's `run.json` under `paths`
    (then `overrides` over it); qbench's defaults when no run directory holds a suite text.
    SuiteError when that stored [compare] table is invalid."""
    from pathlib import Path

    from qbench.contract import records as results
    from qbench.contract.suite import parse_compare

    for path in map(Path, paths):
        for run_dir in results.find_run_dirs(path) if path.is_dir() else []:
            manifest = results.read_manifest(run_dir)
            if manifest and isinstance(manifest.get("suite_text"), str) and manifest["suite_text"]:
                spec = parse_compare(manifest["suite_text"], run_dir / "run.json")
                return Settings.build(spec, overrides, noise_sigmas, f"suite of {run_dir.name}")
    return Settings.build(None, overrides, noise_sigmas)


def parse_tolerance(text: str) -> tuple[str, ToleranceSpec]:
    """`PATTERN=abs:0.05,rel:0.1` or `PATTERN=ignore` (the command line's --tolerance) -> (pattern, tolerance)."""
    pattern, sep, spec = text.partition("=")
    if not sep or not pattern.strip():
        raise ValueError(f"--tolerance {text!r}: expected PATTERN=abs:X,rel:Y or PATTERN=ignore")
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, number = part.partition(":")
        if key == "ignore" and not number:
            values["ignore"] = True
        elif key in ("abs", "rel"):
            try:
                values[key] = float(number)
            except ValueError:
                raise ValueError(f"--tolerance {text!r}: {key} needs a number, got {number!r}") from None
        else:
            raise ValueError(f"--tolerance {text!r}: unknown part {part!r} (abs:X, rel:Y, ignore)")
    try:
        CompareSpec(tolerances={pattern.strip(): values})
        return pattern.strip(), ToleranceSpec(**values)
    except ValidationError as error:
        raise ValueError(f"--tolerance {text!r}: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None


@dataclass
class Comparison:
    """The verdict: one row per (arm, metric) checked, plus problems that made the input unusable."""

    checks: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    baseline_label: str = "baseline"
    new_label: str = "new"

    @classmethod
    def unusable(cls, problems: list[str], baseline_label: str = "baseline", new_label: str = "new") -> Comparison:
        return cls(pd.DataFrame(), problems, [], baseline_label, new_label)

    @property
    def regressions(self) -> pd.DataFrame:
        if self.checks.empty:
            return self.checks
        return self.checks[self.checks["verdict"].isin(REGRESSION_VERDICTS)]

    @property
    def exit_code(self) -> int:
        if self.problems:
            return Exit.BAD_INPUT
        return Exit.FAILED if len(self.regressions) else Exit.OK

    def markdown(self) -> str:
        from qbench.analysis.gate.markdown import render_markdown

        return render_markdown(self)


REGRESSION_VERDICTS = ("regression", "mismatch", "missing", "failed")
NOT_JUDGED = rank.NOT_JUDGED  # measured, shown, and deliberately left out of the verdict (the note says why)
# a speed ratio is judged by a one-sided rank test at this level over its cells; fewer cells than the test needs
# to reject (qbench.analysis.gate.speed.fewest_samples) leave it not judged
RATIO_ALPHA = 0.01


def _normalised(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return str(bool(value)).lower()
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def _shown(values: set[str]) -> str:
    return ", ".join(sorted(v.removesuffix(".0") for v in values))


def _values(frame: pd.DataFrame, column: str) -> set[str]:
    return {v for v in map(_normalised, frame[column]) if v is not None} if column in frame.columns else set()


def _threads(frame: pd.DataFrame) -> set[str]:
    """torch's thread count per cell: `env.torch_threads`, or `env.cpu_count` in records of schema 1, which
    held the same number under a name that said otherwise."""
    return _values(frame, "env.torch_threads") | _values(frame, "env.cpu_count")


def grid_axes(baseline: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """The axis columns cells are matched by: precision, and every other grid axis that varies in either side."""
    varying = set(stats.axis_columns(baseline)) | set(stats.axis_columns(new))
    return [c for c in grid.RECORD_KEYS if c in varying]


DATA_FINGERPRINTS = ("data.fingerprint.train_sha256", "data.fingerprint.eval_sha256")


def data_problems(baseline: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """The records were trained or evaluated on other data (their fingerprints differ, between the sides or
    within one): what that changes is the data's doing, neither a regression nor an improvement."""
    problems = []
    for column in DATA_FINGERPRINTS:
        old, now = _values(baseline, column), _values(new, column)
        split = column.removeprefix("data.fingerprint.").removesuffix("_sha256")
        if (old and now and old != now) or len(old) > 1 or len(now) > 1:
            short = lambda values: ", ".join(v[:12] for v in sorted(values)) or "none"  # noqa: E731
            problems.append(f"the {split} data differ (data.fingerprint.{split}_sha256: baseline {short(old)} vs new {short(now)}): "
                            "a change of data is neither a regression nor an improvement; compare runs on the same data")
    return problems


def identity_problems(baseline: pd.DataFrame, new: pd.DataFrame, axes: list[str] | None = None) -> list[str]:
    """Reasons the two sets of records measure different things (suite, model, data, configuration, device).
    The grid's `axes` are left out: cells are matched by them, and a value on one side only is a cell missing."""
    problems = []
    shared = [c for c in baseline.columns if c in new.columns and c not in (axes or ())]
    # a grid axis that does not vary is a setting like any other (LLM.int8's threshold is a precision.* key)
    settings = [axis.record_key for axis in grid.SETTING_AXES if not axis.record_key.startswith("config.")]
    columns = [c for c in IDENTITY_COLUMNS if c in shared] + [c for c in shared if c.startswith("config.") or c in settings]
    for column in columns:
        old, now = _values(baseline, column), _values(new, column)
        if old and now and old != now:
            problems.append(f"{column} differs: baseline {_shown(old)} vs new {_shown(now)}")
    problems += data_problems(baseline, new)
    devices_old = {v.split(":")[0] for v in _values(baseline, "env.device")}
    devices_new = {v.split(":")[0] for v in _values(new, "env.device")}
    if devices_old and devices_new and devices_old != devices_new:
        problems.append(f"measured on different devices: baseline {', '.join(sorted(devices_old))} vs new {', '.join(sorted(devices_new))}")
    threads_old, threads_new = _threads(baseline), _threads(new)
    if devices_old == devices_new == {"cpu"} and threads_old and threads_new and threads_old != threads_new:
        # on a CPU the work runs on these threads: speed ratios of different thread counts do not compare
        problems.append(
            f"torch threads differ on cpu: baseline {_shown(threads_old)} vs new {_shown(threads_new)} "
            "(make both with the same OMP_NUM_THREADS)"
        )
    if problems:
        problems.append("the baseline no longer describes this suite: refresh it deliberately (see docs/reports-and-gate.md, 'The CI suite and its baseline')")
    return problems


def _process_shape_difference(baseline: pd.DataFrame, new: pd.DataFrame) -> tuple[str, bool] | None:
    """Why memory figures of the two sides do not compare on a CPU (cells started differently, or a different
    number side by side: see PROCESS_SHAPE_COLUMNS), and whether the own-process PSS figures still do (only the
    launcher differs, and both sides' records hold the PSS as forked beside it); None when everything compares."""
    devices = {v.split(":")[0] for frame in (baseline, new) for v in _values(frame, "env.device")}
    if devices != {"cpu"}:
        return None
    for column, what in PROCESS_SHAPE_COLUMNS.items():
        old, now = _values(baseline, column), _values(new, column)
        if old and now and old != now:
            pss_compares = column == "env.cell_launcher" and all(
                "memory.all_phases.tree_pss_peak_bytes" in frame.columns and frame["memory.all_phases.tree_pss_peak_bytes"].notna().any()
                for frame in (baseline, new))
            why = (f"{what} ({column}: baseline {', '.join(sorted(old))} vs new {', '.join(sorted(now))}): a forked "
                   "cell's " + ("RSS and PSS as forked" if pss_compares else "PSS and RSS")
                   + " share pages with the fork server and its siblings, so "
                   + ("they do not compare (its PSS as its own process does)" if pss_compares else "memory does not compare"))
            return why, pss_compares
    return None


def _launcher_free(column: str) -> bool:
    return column in LAUNCHER_FREE_MEMORY or column.endswith("." + LAUNCHER_FREE_MEMORY[0])


def _noise(std_old: float, n_old: int, std_new: float, n_new: int) -> float:
    """Standard error of the difference of two means, from the seeds' spread (0 without repeated cells)."""
    variances = [(s, n) for s, n in ((std_old, n_old), (std_new, n_new)) if n >= 2 and pd.notna(s)]
    if not variances:
        return 0.0
    pooled = math.sqrt(sum(s * s * (n - 1) for s, n in variances) / sum(n - 1 for _, n in variances))
    return pooled * math.sqrt(1 / max(n_old, 1) + 1 / max(n_new, 1))


def _gated_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if getattr(fields.spec_for(c), "kind", None) in GATED_KINDS]


def compare(baseline: pd.DataFrame, new: pd.DataFrame, settings: Settings | None = None,
            baseline_label: str = "baseline", new_label: str = "new") -> Comparison:
    """Check every gated metric of every arm (cells matched by all the grid's axes) of `baseline` in `new`."""
    settings = settings or Settings.build()
    axes = grid_axes(baseline, new)
    problems = identity_problems(baseline, new, axes)
    if problems:
        return Comparison.unusable(problems, baseline_label, new_label)
    speed = _speed_plan(baseline, new, settings)
    old = stats.add_speed_ratios(baseline, speed.fields)
    now = stats.add_speed_ratios(new, speed.fields)
    columns = _gated_columns(old)
    shape = _process_shape_difference(baseline, new)
    memory_not_judged = {c: shape[0] for c in columns if shape and fields.spec_for(c).kind == "memory"
                         and not (shape[1] and _launcher_free(c))}
    not_judged = {**speed.not_judged, **memory_not_judged}
    both = _Stats(stats.aggregate(old, columns, axes), stats.aggregate(now, [c for c in columns if c in now.columns], axes),
                  stats.baseline_precision(old), _Arms(old, axes), _Arms(now, axes), not_judged, old, now)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    used_rules: set[str] = set()
    for arm in both.old_arms.order:
        if both.old.count.loc[arm].max() == 0:
            notes.append(f"{arm}: no ok cell in the baseline; not compared")
            continue
        rows += _check_arm(arm, now, both, columns, settings, used_rules)
    nothing = _nothing_compared(rows, old, columns)
    if nothing:  # a gate that checked nothing must not pass
        return Comparison.unusable([nothing], baseline_label, new_label)
    for arm in both.new_arms.order:
        if arm not in both.old.mean.index:
            precision = both.new_arms.precision[arm]
            rows += _failed_cell_rows(precision, arm, now[(both.new_arms.labels == arm) & (now["status"] != "ok")])
            notes.append(f"{arm}: in the new results only; no baseline to compare with")
    notes += _notes(baseline, new, settings, used_rules, both.base_precision, speed)
    return Comparison(pd.DataFrame(rows), [], notes, baseline_label, new_label)


def _nothing_compared(rows: list[dict[str, Any]], baseline: pd.DataFrame, columns: list[str]) -> str | None:
    """Why the baseline gave nothing to check (no ok cell, no gated metric, every metric ignored), or None."""
    if any(row["verdict"] != "ignored" for row in rows):
        return None
    if not len(stats.ok_rows(baseline)):
        why = "no cell of the baseline is ok"
    elif not any(baseline[column].notna().any() for column in columns):
        why = "the baseline holds no value of a metric the gate checks (exact, quality, memory or speed ratio)"
    else:
        why = "every metric of the baseline is ignored by the tolerances"
    return f"nothing was compared: {why}; a gate that checks nothing cannot pass"


class _Arms:
    """One side's arms, labelled with the axes both sides are matched by: each row's label, the arms in
    order, each arm's precision and the seeds each arm has a record of."""

    def __init__(self, frame: pd.DataFrame, axes: list[str]):
        self.labels = stats.arms(frame, axes)
        self.order = stats.arm_order(frame, axes)
        self.precision = dict(zip(self.labels, frame["precision"], strict=True)) if "precision" in frame.columns else {}
        seeds = frame["seed"] if "seed" in frame.columns else pd.Series(0, index=frame.index)
        self.cells: dict[str, dict[Any, str]] = {}
        ids = frame["cell_id"] if "cell_id" in frame.columns else self.labels
        for label, seed, cell_id in zip(self.labels, seeds, ids, strict=True):
            self.cells.setdefault(label, {})[seed] = str(cell_id)


@dataclass(frozen=True)
class _SpeedPlan:
    """Which speed fields are compared as ratios, and which ratios are not judged (column -> why)."""

    fields: tuple[str, ...]
    not_judged: dict[str, str]
    cpu_fields: tuple[str, ...] = ()
    contended: tuple[str, ...] = ()


def _has(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and frame[column].notna().any()


def contended_cells(frame: pd.DataFrame) -> list[str]:
    """The ok cells whose record says they were contended (`speed.contended`), as `cell_id (run)`."""
    if "speed.contended" not in frame.columns:
        return []
    flagged = stats.ok_rows(frame)
    flagged = flagged[flagged["speed.contended"].map(lambda v: v is True)]
    return [f"{row.get('cell_id', row.get('precision'))} ({row.get('run_id', '?')})" for _, row in flagged.iterrows()]


def starved_cells(frame: pd.DataFrame) -> list[str]:
    """The ok cells that had a core less than STARVED_SHARE of the time they wanted one while training."""
    if "cpu.train.share" not in frame.columns:
        return []
    ok = stats.ok_rows(frame)
    shares = ok["cpu.train.share"]
    return [f"{row.get('cell_id', row.get('precision'))} ({share:.0%})" for (_, row), share in zip(ok.iterrows(), shares, strict=True)
            if share < STARVED_SHARE]


def _speed_plan(baseline: pd.DataFrame, new: pd.DataFrame, settings: Settings) -> _SpeedPlan:
    """On a CPU: the CPU-time twins of the speed fields join them (where both sides have them); the wall-time
    ratios are not judged when a cell of either side was contended, and no speed ratio is when a cell had a
    core less than half the time it wanted one (its CPU time moved too). Elsewhere: as set."""
    devices = {v.split(":")[0] for frame in (baseline, new) for v in _values(frame, "env.device")}
    if devices != {"cpu"}:
        return _SpeedPlan(tuple(settings.speed_ratios), {})
    cpu_fields = tuple(
        twin for name in settings.speed_ratios
        if (twin := fields.cpu_time_field(name)) and _has(baseline, twin) and _has(new, twin)
    )
    contended = [f"baseline {c}" for c in contended_cells(baseline)] + [f"new {c}" for c in contended_cells(new)]
    starved = [f"baseline {c}" for c in starved_cells(baseline)] + [f"new {c}" for c in starved_cells(new)]
    not_judged = {}
    if starved:  # so little of a core that CPU time itself moved (cold caches after every slice, a busy SMT sibling)
        shown = ", ".join(starved[:4]) + (f" and {len(starved) - 4} more" if len(starved) > 4 else "")
        why = (f"not judged: some cells had a core less than {STARVED_SHARE:.0%} of the time they wanted one ({shown}); "
               "under such load CPU time moves as well as wall time (caches go cold at every time slice), so no speed "
               "ratio of these runs says anything about the formats: measure speed on a quieter machine")
        return _SpeedPlan(tuple(dict.fromkeys((*settings.speed_ratios, *cpu_fields))),
                          {fields.ratio_column(n): why for n in (*settings.speed_ratios, *cpu_fields)}, cpu_fields,
                          tuple(contended))
    if contended:
        shown = ", ".join(contended[:4]) + (f" and {len(contended) - 4} more" if len(contended) > 4 else "")
        why = (f"not judged: the CPU was contended ({shown}), so wall time measured the machine's load; "
               + ("the CPU-time ratio is judged instead" if cpu_fields else "the records have no CPU time to judge instead"))
        not_judged = {fields.ratio_column(name): why for name in settings.speed_ratios}
    return _SpeedPlan(tuple(dict.fromkeys((*settings.speed_ratios, *cpu_fields))), not_judged, cpu_fields, tuple(contended))


@dataclass(frozen=True)
class _Stats:
    """Per-arm mean, spread and count of both sides, the precision speed ratios are taken to, the arms, and
    the ratio columns not judged (column -> why)."""

    old: stats.Aggregate
    new: stats.Aggregate
    base_precision: str | None
    old_arms: _Arms
    new_arms: _Arms
    not_judged: dict[str, str] = field(default_factory=dict)
    old_values: pd.DataFrame | None = None  # every cell's values (with the ratio columns): a rank test's samples
    new_values: pd.DataFrame | None = None


def _row(precision: str, metric: str, verdict: str, arm: str | None = None, **extra: Any) -> dict[str, Any]:
    spec = fields.spec_for(metric)
    return {"precision": precision, "arm": arm or precision, "metric": metric, "kind": getattr(spec, "kind", ""),
            "direction": getattr(spec, "direction", None), "verdict": verdict, **extra}


def _failed_cell_rows(precision: str, arm: str, cells: pd.DataFrame) -> list[dict[str, Any]]:
    return [_row(precision, "status", "failed", arm, note=f"{cell.get('cell_id', arm)}: {cell['status']} — {cell.get('error')}")
            for _, cell in cells.iterrows()]


def _check_arm(arm: str, now: pd.DataFrame, both: _Stats, columns: list[str], settings: Settings,
               used_rules: set[str]) -> list[dict[str, Any]]:
    """The rows of one arm: missing cells, failed cells, then one per gated metric."""
    precision = both.old_arms.precision.get(arm, arm)
    cells = now[both.new_arms.labels == arm]
    if cells.empty:
        return [_row(precision, "cells", "missing", arm, note=f"no cell of {arm} in the new results")]
    rows = [
        _row(precision, "cells", "missing", arm, note=f"{cell_id}: in the baseline, not in the new results")
        for seed, cell_id in both.old_arms.cells.get(arm, {}).items()
        if seed not in both.new_arms.cells.get(arm, {})
    ]
    failed = cells[cells["status"] != "ok"]
    rows += _failed_cell_rows(precision, arm, failed)
    if len(failed) == len(cells):
        return rows
    for metric in columns:
        row = _check_metric(arm, precision, metric, both, settings, used_rules)
        if row is not None:
            rows.append(row)
    return rows


def _check_metric(arm: str, precision: str, metric: str, both: _Stats, settings: Settings,
                  used_rules: set[str]) -> dict[str, Any] | None:
    """One metric of one arm against its tolerance and the noise floor; None when there is nothing to check."""
    before = both.old.mean.loc[arm, metric]
    if pd.isna(before) or (metric.startswith(fields.RATIO_PREFIX) and precision == both.base_precision):
        return None
    spec = fields.spec_for(metric)
    present = metric in both.new.mean.columns and arm in both.new.mean.index
    after = both.new.mean.loc[arm, metric] if present else float("nan")
    n_old = int(both.old.count.loc[arm, metric])
    n_new = int(both.new.count.loc[arm, metric]) if not pd.isna(after) else 0
    tolerance, source = settings.tolerance_for(metric, spec.kind)
    used_rules.add(source)
    row = {"baseline": before, "new": after, "n_baseline": n_old, "n_new": n_new, "tolerance": source}
    if tolerance.ignore:
        return _row(precision, metric, "ignored", arm, **row)
    if metric in both.not_judged:
        return _row(precision, metric, NOT_JUDGED, arm, note=both.not_judged[metric], **row)
    if pd.isna(after):
        return _row(precision, metric, "missing", arm, note="the new results lack this metric", **row)
    if metric.startswith(fields.RATIO_PREFIX):
        return _check_ratio(arm, precision, metric, both, tolerance, row)
    allowed = max(tolerance.abs or 0.0, (tolerance.rel or 0.0) * abs(before))
    noise = 0.0
    if spec.kind not in NO_NOISE_KINDS:
        noise = settings.noise_sigmas * _noise(both.old.std.loc[arm, metric], n_old, both.new.std.loc[arm, metric], n_new)
    row.update(allowed=allowed, noise=noise)
    return _row(precision, metric, _verdict(spec, before, after, max(allowed, noise)), arm, **row)


def _arm_values(frame: pd.DataFrame | None, arms: _Arms, arm: str, metric: str) -> list[float]:
    if frame is None or metric not in frame.columns:
        return []
    ok = frame["status"] == "ok" if "status" in frame.columns else pd.Series(True, index=frame.index)
    return [float(v) for v in pd.to_numeric(frame.loc[ok & (arms.labels == arm), metric], errors="coerce").dropna()]


def _check_ratio(arm: str, precision: str, metric: str, both: _Stats, tolerance: ToleranceSpec,
                 row: dict[str, Any]) -> dict[str, Any]:
    """A speed ratio judged by a rank test over its cells (each seed of each run one sample): a regression only
    when the test rejects and the mean moved the worse way by more than the tolerance; with fewer cells than the
    test needs to reject, not judged (never "ok")."""
    spec = fields.spec_for(metric)
    change = tolerance.rel if tolerance.rel is not None else (tolerance.abs or 0.0) / abs(row["baseline"] or 1.0)
    result = rank.judge(_arm_values(both.old_values, both.old_arms, arm, metric),
                        _arm_values(both.new_values, both.new_arms, arm, metric), RATIO_ALPHA, change,
                        lower_is_better=spec.direction == "lower", what="cells")
    row.update(allowed=change * abs(row["baseline"]), noise=0.0, p_value=result.p_worse,
               judged_by="one-sided Mann–Whitney U over each cell's ratio (one run and seed each)")
    return _row(precision, metric, result.verdict, arm, note=result.note, **row)


def _verdict(spec: fields.FieldSpec, before: float, after: float, limit: float) -> str:
    if spec.kind == "exact":
        return "mismatch" if abs(after - before) > limit else "ok"
    worse_by = {"higher": before - after, "lower": after - before}.get(spec.direction, abs(after - before))
    return "regression" if worse_by > limit else ("improved" if -worse_by > limit and spec.direction else "ok")


def _short(commit: str) -> str:
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def _code_notes(baseline: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """Whether the code or the CPU's kernels changed since the baseline: the reasons a figure may move."""
    notes = []
    old, now = _values(baseline, "env.git_commit"), _values(new, "env.git_commit")
    if old and now and old != now:
        shown_old, shown_new = ", ".join(map(_short, sorted(old))), ", ".join(map(_short, sorted(now)))
        notes.append(f"code changed since the baseline: baseline made at {shown_old}, new at {shown_new}"
                     + (f" (git diff {min(old)[:12]} {min(now)[:12]})" if len(old) == len(now) == 1 else ""))
    dirty = sorted(c for c in old if c.endswith("+dirty"))
    if dirty:
        notes.append(f"the baseline was made from a tree with uncommitted changes ({', '.join(map(_short, dirty))}): the code "
                     "it measured is in no commit; refresh it from a clean one")
    for column in sorted(c for c in baseline.columns if c.startswith("kernels.") and c in new.columns
                         and fields.spec_for(c) is None):
        old_paths, new_paths = _values(baseline, column), _values(new, column)
        if old_paths and new_paths and old_paths != new_paths:  # another kernel computed: speed and last digits move
            notes.append(f"{column} differs (baseline {_shown(old_paths)}, new {_shown(new_paths)}): figures may move "
                         "for that reason alone")
    isa_old, isa_new = _values(baseline, "env.torch_cpu_capability"), _values(new, "env.torch_cpu_capability")
    if isa_old and isa_new and isa_old != isa_new:
        notes.append(f"torch computes with other CPU kernels (baseline {_shown(isa_old)}, new {_shown(isa_new)}): quality "
                     "figures are bit-identical only on the same level, and moved by up to 1.9 recall points between "
                     "AVX512 and AVX2 on the CI suite")
    return notes


def _schema_notes(baseline: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """Which side's records were converted from an older schema (qbench.contract.renames), and how many."""
    notes = []
    for side, frame in (("baseline", baseline), ("new", new)):
        if "converted_from_schema" not in frame.columns:
            continue
        converted = frame["converted_from_schema"].dropna()
        for version in sorted(set(converted)):
            count = int((converted == version).sum())
            notes.append(f"{count} {side} record(s) of schema {int(version)} converted to schema {SCHEMA_VERSION} (keys renamed "
                         "by qbench.contract.renames; a forked cell's PSS, which left out the fork server's share, as its tree_pss) and "
                         "compared as such")
    return notes


def _notes(baseline: pd.DataFrame, new: pd.DataFrame, settings: Settings, used_rules: set[str],
           base_precision: str | None, speed: _SpeedPlan | None = None) -> list[str]:
    """What a reader of the verdict should know: thread counts, what speed is gated as, unused tolerances."""
    notes = []
    threads_old, threads_new = _threads(baseline), _threads(new)
    if threads_old and threads_new and threads_old != threads_new:  # on a GPU: a note, the GPU does the work
        notes.append(
            f"torch threads differ (baseline {_shown(threads_old)}, new {_shown(threads_new)}): "
            "speed ratios may move for that reason alone (set OMP_NUM_THREADS as the baseline was made)"
        )
    if settings.speed_ratios and any(getattr(fields.spec_for(c), "kind", None) == "speed" for c in new.columns):
        judged = [c for c in (speed.fields if speed else settings.speed_ratios)
                  if not speed or fields.ratio_column(c) not in speed.not_judged]
        notes.append(
            "absolute times and rates are not gated (they move from machine to machine); speed is gated as "
            f"ratios to {base_precision} within one run: " + (", ".join(fields.ratio_column(c) for c in judged) or "none")
        )
    if speed and speed.cpu_fields:
        notes.append("on a CPU, speed is also judged by CPU time (the process's CPU seconds of the timed steps), which "
                     "a busy machine moves far less than wall time")
    if speed and speed.not_judged:
        what = "speed ratios" if any(fields.ratio_column(c) in speed.not_judged for c in speed.cpu_fields) else "wall-time speed ratios"
        notes.append(f"{what} {next(iter(speed.not_judged.values()))}")
    notes += _code_notes(baseline, new)
    notes += _schema_notes(baseline, new)
    unused = [f"{source}: {pattern}" for pattern, _, source in settings.rules
              if source != "default" and f"{source}: {pattern}" not in used_rules
              and (settings.speed_ratios or not pattern.startswith(fields.RATIO_PREFIX))]  # no ratio asked: none to match
    if unused:
        notes.append("tolerances that matched no compared metric: " + "; ".join(unused))
    return notes
