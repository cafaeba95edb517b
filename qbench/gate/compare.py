"""Baseline vs new results: direction-aware tolerances per metric, a noise floor from seeds, a Markdown verdict.

What is compared comes from the metric registry (`qbench.results.fields`):
- exact metrics (weight bytes, bits per parameter, parameter and module counts) must match;
- quality and memory may move the worse way by their tolerance (or by the seeds' noise, if larger);
- absolute times and rates are never compared (they move from machine to machine); speed is
  compared as ratios measured within one run, e.g. nf4-dq samples/s over bf16 samples/s.
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

from qbench.results import fields
from qbench.results import stats as tables
from qbench.suite.spec import CompareSpec, ToleranceSpec

EXIT_OK, EXIT_REGRESSION, EXIT_UNUSABLE = 0, 1, 2

# quality tolerances are in the stored unit: recall is a fraction, so 0.03 is 3 points
DEFAULT_TOLERANCES: tuple[tuple[str, ToleranceSpec], ...] = (
    ("quality.*recall@*", ToleranceSpec(abs=0.03)),
    ("quality.*accuracy*", ToleranceSpec(abs=0.03)),
    ("quality.*perplexity*", ToleranceSpec(rel=0.03)),
    ("quality.*bits_per_byte*", ToleranceSpec(rel=0.02)),
    ("quality.*nll*", ToleranceSpec(rel=0.02)),
    ("quality.*loss*", ToleranceSpec(rel=0.05)),
    ("train.*loss", ToleranceSpec(rel=0.05)),
    ("memory.*torch_max_*_bytes", ToleranceSpec(rel=0.05)),
    ("memory.*nvml_*_bytes", ToleranceSpec(rel=0.10)),
    ("memory.*_bytes", ToleranceSpec(rel=0.15)),
    (fields.RATIO_PREFIX + "*", ToleranceSpec(rel=0.20)),
)
EXACT = ToleranceSpec(abs=0.0, rel=1e-9)  # float noise only: bits per parameter is a quotient
GATED_KINDS = ("exact", "quality", "memory", "speed-ratio")
# what must agree for two sets of records to be comparable at all
IDENTITY_COLUMNS = ("suite", "task", "model", "data.source", "eval.protocol")


@dataclass(frozen=True)
class Settings:
    """Tolerance rules in priority order, the speed fields compared as ratios, the noise multiplier."""

    rules: tuple[tuple[str, ToleranceSpec, str], ...] = ()  # (pattern, tolerance, where it came from)
    speed_ratios: tuple[str, ...] = tables.DEFAULT_SPEED_RATIOS
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
    """The verdict: one row per (precision, metric) checked, plus problems that made the input unusable."""

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
            return EXIT_UNUSABLE
        return EXIT_REGRESSION if len(self.regressions) else EXIT_OK

    def markdown(self) -> str:
        return render_markdown(self)


REGRESSION_VERDICTS = ("regression", "mismatch", "missing", "failed")


def _normalised(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return str(bool(value)).lower()
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value).lower() if str(value) in ("True", "False") else str(value)


def _shown(values: set[str]) -> str:
    return ", ".join(sorted(v.removesuffix(".0") for v in values))


def _values(frame: pd.DataFrame, column: str) -> set[str]:
    return {v for v in map(_normalised, frame[column]) if v is not None} if column in frame.columns else set()


def identity_problems(baseline: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """Reasons the two sets of records measure different things (suite, model, data, configuration, device)."""
    problems = []
    shared = [c for c in baseline.columns if c in new.columns]
    columns = [c for c in IDENTITY_COLUMNS if c in shared] + [c for c in shared if c.startswith("config.")]
    for column in columns:
        old, now = _values(baseline, column), _values(new, column)
        if old and now and old != now:
            problems.append(f"{column} differs: baseline {', '.join(sorted(old))} vs new {', '.join(sorted(now))}")
    devices_old = {v.split(":")[0] for v in _values(baseline, "env.device")}
    devices_new = {v.split(":")[0] for v in _values(new, "env.device")}
    if devices_old and devices_new and devices_old != devices_new:
        problems.append(f"measured on different devices: baseline {', '.join(sorted(devices_old))} vs new {', '.join(sorted(devices_new))}")
    threads_old, threads_new = _values(baseline, "env.cpu_count"), _values(new, "env.cpu_count")
    if devices_old == devices_new == {"cpu"} and threads_old and threads_new and threads_old != threads_new:
        # on a CPU the work runs on these threads: speed ratios of different thread counts do not compare
        problems.append(
            f"torch threads differ on cpu: baseline {_shown(threads_old)} vs new {_shown(threads_new)} "
            "(make both with the same OMP_NUM_THREADS)"
        )
    if problems:
        problems.append("the baseline no longer describes this suite: refresh it deliberately (see README, 'Regression gate')")
    return problems


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
    """Check every gated metric of every precision of `baseline` in `new`."""
    settings = settings or Settings.build()
    problems = identity_problems(baseline, new)
    if problems:
        return Comparison.unusable(problems, baseline_label, new_label)
    old = tables.add_speed_ratios(baseline, settings.speed_ratios)
    now = tables.add_speed_ratios(new, settings.speed_ratios)
    base_precision = tables.baseline_precision(old)
    columns = _gated_columns(old)
    old_stats, new_stats = tables.aggregate(old, columns), tables.aggregate(now, [c for c in columns if c in now.columns])
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    used_rules: set[str] = set()

    def add(precision: str, metric: str, verdict: str, **extra: Any) -> None:
        spec = fields.spec_for(metric)
        rows.append({"precision": precision, "metric": metric, "kind": getattr(spec, "kind", ""),
                     "direction": getattr(spec, "direction", None), "verdict": verdict, **extra})

    for precision in tables.precision_order(old):
        if old_stats.count.loc[precision].max() == 0:
            notes.append(f"{precision}: no ok cell in the baseline; not compared")
            continue
        cells = now[now["precision"] == precision] if "precision" in now.columns else now.iloc[0:0]
        if cells.empty:
            add(precision, "cells", "missing", note="no cell of this precision in the new results")
            continue
        failed = cells[cells["status"] != "ok"]
        for _, cell in failed.iterrows():
            add(precision, "status", "failed", note=f"{cell.get('cell_id', precision)}: {cell['status']} — {cell.get('error')}")
        if len(failed) == len(cells):
            continue
        for metric in columns:
            before = old_stats.mean.loc[precision, metric]
            if pd.isna(before) or (metric.startswith(fields.RATIO_PREFIX) and precision == base_precision):
                continue
            spec = fields.spec_for(metric)
            after = new_stats.mean.loc[precision, metric] if metric in new_stats.mean.columns and precision in new_stats.mean.index else float("nan")
            n_old = int(old_stats.count.loc[precision, metric])
            n_new = int(new_stats.count.loc[precision, metric]) if not pd.isna(after) else 0
            tolerance, source = settings.tolerance_for(metric, spec.kind)
            used_rules.add(source)
            row = {"baseline": before, "new": after, "n_baseline": n_old, "n_new": n_new, "tolerance": source}
            if tolerance.ignore:
                add(precision, metric, "ignored", **row)
                continue
            if pd.isna(after):
                add(precision, metric, "missing", note="the new results lack this metric", **row)
                continue
            allowed = max(tolerance.abs or 0.0, (tolerance.rel or 0.0) * abs(before))
            noise = 0.0
            if spec.kind != "exact":
                noise = settings.noise_sigmas * _noise(old_stats.std.loc[precision, metric], n_old,
                                                       new_stats.std.loc[precision, metric], n_new)
            limit = max(allowed, noise)
            row.update(allowed=allowed, noise=noise)
            if spec.kind == "exact":
                verdict = "mismatch" if abs(after - before) > limit else "ok"
            else:
                worse_by = {"higher": before - after, "lower": after - before}.get(spec.direction, abs(after - before))
                verdict = "regression" if worse_by > limit else ("improved" if -worse_by > limit and spec.direction else "ok")
            add(precision, metric, verdict, **row)

    for precision in tables.precision_order(now):
        if precision not in old_stats.mean.index:
            bad = now[(now["precision"] == precision) & (now["status"] != "ok")]
            for _, cell in bad.iterrows():
                add(precision, "status", "failed", note=f"{cell.get('cell_id', precision)}: {cell['status']} — {cell.get('error')}")
            notes.append(f"{precision}: in the new results only; no baseline to compare with")
    threads_old, threads_new = _values(baseline, "env.cpu_count"), _values(new, "env.cpu_count")
    if threads_old and threads_new and threads_old != threads_new:  # on a GPU: a note, the GPU does the work
        notes.append(
            f"torch threads differ (baseline {_shown(threads_old)}, new {_shown(threads_new)}): "
            "speed ratios may move for that reason alone (set OMP_NUM_THREADS as the baseline was made)"
        )
    speed = sorted({c for c in new.columns if getattr(fields.spec_for(c), "kind", None) == "speed"})
    if speed:
        notes.append(
            "absolute times and rates are not gated (they move from machine to machine); speed is gated as "
            f"ratios to {base_precision} within one run: " + ", ".join(fields.ratio_column(c) for c in settings.speed_ratios)
        )
    unused = [f"{source}: {pattern}" for pattern, _, source in settings.rules
              if source != "default" and f"{source}: {pattern}" not in used_rules]
    if unused:
        notes.append("tolerances that matched no compared metric: " + "; ".join(unused))
    checks = pd.DataFrame(rows)
    return Comparison(checks, [], notes, baseline_label, new_label)


# --- Markdown ---------------------------------------------------------------------------------------

def show(metric: str, value: Any) -> str:
    """A value in readable units: exact metrics as stored, memory in MiB, fractions in %, ratios to 3 places."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    spec = fields.spec_for(metric)
    if spec is None:
        return str(value)
    if spec.kind == "exact":
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:.4g}"
    if spec.kind == "speed-ratio":
        return f"{value:.3f}"
    factor, unit = fields.scale(metric)
    if unit == "%":
        return f"{value * factor:.2f} %"
    if unit == "MiB":
        return f"{value * factor:.2f} MiB"
    return f"{value * factor:.4g}"


def _change(metric: str, before: Any, after: Any) -> str:
    if any(v is None or pd.isna(v) for v in (before, after)):
        return "—"
    spec = fields.spec_for(metric)
    delta = after - before
    if spec is not None and spec.kind == "exact":
        return f"{delta:+,.0f}" if float(delta).is_integer() else f"{delta:+.4g}"
    factor, unit = fields.scale(metric)
    shown = {"%": f"{delta * factor:+.2f} points", "MiB": f"{delta * factor:+.2f} MiB"}.get(unit, f"{delta * factor:+.3g}")
    return shown + (f" ({100 * delta / abs(before):+.1f} %)" if before else "")


def _limit(metric: str, row: pd.Series) -> str:
    allowed = row.get("allowed")
    if allowed is None or pd.isna(allowed):
        return ""
    spec = fields.spec_for(metric)
    if spec is not None and spec.kind == "exact":
        return "exact"
    factor, unit = fields.scale(metric)
    limit = max(allowed, row.get("noise") or 0.0) * factor
    text = {"%": f"{limit:.2f} points", "MiB": f"{limit:.2f} MiB"}.get(unit, f"{limit:.3g}")
    noise = row.get("noise")
    if noise and noise > allowed:
        text += " (noise floor)"
    return text


def checks_table(checks: pd.DataFrame) -> pd.DataFrame:
    """The checks as display strings: precision, metric, baseline, new, change, allowed, verdict, note."""
    shown = []
    for _, row in checks.iterrows():
        metric = row["metric"]
        shown.append({
            "precision": row["precision"],
            "metric": metric,
            "baseline": show(metric, row.get("baseline")),
            "new": show(metric, row.get("new")),
            "change": _change(metric, row.get("baseline"), row.get("new")),
            "allowed worse by": _limit(metric, row),
            "seeds": f"{row.get('n_baseline', '') or ''}/{row.get('n_new', '') or ''}".strip("/") if pd.notna(row.get("n_baseline")) else "",
            "verdict": row["verdict"],
            "note": row.get("note") if isinstance(row.get("note"), str) else "",
        })
    return pd.DataFrame(shown)


def render_markdown(comparison: Comparison) -> str:
    """A summary for a CI job page: the verdict, what regressed and why, then every check folded away."""
    lines = ["## qbench compare", "", f"baseline: `{comparison.baseline_label}`  ", f"new: `{comparison.new_label}`", ""]
    if comparison.problems:
        lines += ["**Unusable input (exit 2)** — nothing was compared:", ""]
        lines += [f"- {p}" for p in comparison.problems] + [""]
        return "\n".join(lines)
    regressions = comparison.regressions
    checks = comparison.checks
    if len(regressions):
        lines += [f"**❌ {len(regressions)} regression(s)** in {len(checks)} checks (exit 1)", ""]
        lines += [checks_table(regressions).to_markdown(index=False), ""]
    else:
        improved = int((checks["verdict"] == "improved").sum()) if not checks.empty else 0
        lines += [f"**✅ no regression** in {len(checks)} checks" + (f" ({improved} improved)" if improved else "") + " (exit 0)", ""]
    if comparison.notes:
        lines += [f"- {note}" for note in comparison.notes] + [""]
    if not checks.empty:
        lines += ["<details><summary>every check</summary>", "", checks_table(checks).to_markdown(index=False), "", "</details>", ""]
    return "\n".join(lines)
