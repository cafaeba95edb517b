"""The gate's verdict as Markdown for a CI job page, and its checks as display strings."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from qbench.contract import fields

if TYPE_CHECKING:
    from qbench.analysis.gate.compare import Comparison

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
    if spec.unit == "s":
        return f"{value * 1e3:.2f} ms"
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
    factor, unit = (1e3, "ms") if spec is not None and spec.unit == "s" else fields.scale(metric)
    shown = {"%": f"{delta * factor:+.2f} points", "MiB": f"{delta * factor:+.2f} MiB",
             "ms": f"{delta * factor:+.2f} ms"}.get(unit, f"{delta * factor:+.3g}")
    return shown + (f" ({100 * delta / abs(before):+.1f} %)" if before else "")


def _limit(metric: str, row: pd.Series) -> str:
    if row.get("kind") == "speed" and isinstance(row.get("tolerance"), str):  # a rank test: the change that counts and its level
        return row["tolerance"]
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


def _samples(row: pd.Series) -> str:
    """How many samples stand behind the check: seeds (or cells, runs) of each side, or a rank test's samples."""
    old, new = row.get("n_baseline"), row.get("n_new")
    if old is None or pd.isna(old):
        return ""
    return f"{int(old)}/{int(new) if new is not None and pd.notna(new) else 0}"


def checks_table(checks: pd.DataFrame) -> pd.DataFrame:
    """The checks as display strings: precision (or arm, when the grid has axes other than precision and
    seed), metric, baseline, new, change, allowed, samples (baseline/new), how it was judged, verdict, note."""
    shown = []
    by_arm = "arm" in checks.columns and (checks["arm"] != checks["precision"]).any()
    for _, row in checks.iterrows():
        metric = row["metric"]
        shown.append({
            ("arm" if by_arm else "precision"): row["arm" if by_arm else "precision"],
            "metric": metric,
            "baseline": show(metric, row.get("baseline")),
            "new": show(metric, row.get("new")),
            "change": _change(metric, row.get("baseline"), row.get("new")),
            "allowed worse by": _limit(metric, row),
            "samples": _samples(row),
            "judged by": row.get("judged_by") if isinstance(row.get("judged_by"), str) else _judged_by(row),
            "verdict": row["verdict"],
            "note": row.get("note") if isinstance(row.get("note"), str) else "",
        })
    return pd.DataFrame(shown)


def _judged_by(row: pd.Series) -> str:
    kind = row.get("kind")
    if kind == "exact":
        return "must match"
    if kind == "health":
        return "must not rise"
    if kind in ("quality", "memory"):
        return "mean of the seeds within the tolerance (or the seeds' noise)"
    return ""


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
