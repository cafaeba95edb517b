"""Warnings about eval sets that cannot tell formats apart: k not below the candidates, a query worth more than the
gate's tolerance, a metric that fine-tuning moved in no cell."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pandas as pd

from qbench.analysis import stats
from qbench.contract import fields

if TYPE_CHECKING:
    from qbench.analysis.gate.compare import Settings

# quality.<phase>.<direction>_recall@<k>: the queries are images (i2t) or captions (t2i), the candidates the other side
_RECALL = re.compile(r"quality\.(?P<phase>[^.]+)\.(?P<direction>i2t|t2i)_recall@(?P<k>\d+)$")
_SIDES = {"i2t": ("data.eval_images", "images", "data.eval_captions", "captions"),
          "t2i": ("data.eval_captions", "captions", "data.eval_images", "images")}


def _count(ok: pd.DataFrame, column: str) -> int | None:
    """The smallest count the ok cells recorded (shards of one suite record the same), or None."""
    if column not in ok.columns:
        return None
    values = ok[column].astype(float).dropna()
    return int(values.min()) if not values.empty else None


def eval_set_warnings(frame: pd.DataFrame, settings: Settings | None = None) -> list[str]:
    """One sentence per problem of the eval set that the ok records show, in this order:

    - recall@k with k not smaller than the number of candidates: the query's match is always among
      the top k, so the figure is 100 % whatever the model;
    - an eval set so small that one query moves recall by more than the suite's gate tolerance
      (`settings`: the suite's [compare] table; qbench's defaults without one);
    - a quality metric equal before and after fine-tuning in every ok cell of every format (one
      already warned about as trivial is not repeated).
    """
    from qbench.analysis.gate.compare import Settings

    settings = settings or Settings.build()
    ok = stats.ok_rows(frame)
    if ok.empty:
        return []
    warnings: list[str] = []
    trivial: set[str] = set()
    query_steps: dict[str, tuple[float, str]] = {}
    for column in sorted(c for c in ok.columns if _RECALL.match(c)):
        match = _RECALL.match(column)
        queries_key, queries_name, candidates_key, candidates_name = _SIDES[match["direction"]]
        k, candidates, queries = int(match["k"]), _count(ok, candidates_key), _count(ok, queries_key)
        if candidates is not None and k >= candidates:
            trivial |= {column, column.replace(f".{match['direction']}_", ".mean_")}
            if match["phase"] == "eval_after":
                warnings.append(
                    f"{match['direction']} recall@{k} ranks {candidates} eval {candidates_name}: with k ≥ the number of "
                    f"candidates every query's match is in the top {k}, so it reads 100 % whatever the model "
                    f"(set eval.recall_k below {candidates}, or evaluate on more {candidates_name})"
                )
        if queries and match["phase"] == "eval_after" and match["direction"] not in query_steps:
            query_steps[match["direction"]] = (1 / queries, f"{queries} eval {queries_name}")
    for direction, (step, what) in query_steps.items():
        metric = next(c for c in sorted(ok.columns) if _RECALL.match(c) and f".{direction}_" in c)
        tolerance, source = settings.tolerance_for(metric, "quality")
        if tolerance.ignore:
            continue
        value = ok[metric].astype(float).mean()
        allowed = max(tolerance.abs or 0.0, (tolerance.rel or 0.0) * abs(value if pd.notna(value) else 0.0))
        if step > allowed:
            warnings.append(
                f"one query moves {direction} recall by {100 * step:.2f} points ({what}), more than the "
                f"{100 * allowed:.2f} points the regression gate allows ({source}): a single query decides a regression "
                "(use a larger eval set, or a tolerance of at least one query)"
            )
    warnings += _frozen(ok, trivial)
    return warnings


def _frozen(ok: pd.DataFrame, trivial: set[str]) -> list[str]:
    """Metrics equal before and after fine-tuning in every ok cell (and what they read)."""
    found = []
    for after in sorted(c for c in ok.columns if c.startswith("quality.eval_after.")):
        before = after.replace(".eval_after.", ".eval_before.", 1)
        if before not in ok.columns or after in trivial or getattr(fields.spec_for(after), "kind", None) != "quality":
            continue
        pairs = ok[[before, after]].astype(float).dropna()
        if pairs.empty or not ((pairs[before] - pairs[after]).abs() <= 1e-12).all():
            continue
        factor, unit = fields.scale(after)
        values = sorted({f"{v * factor:.2f}{' %' if unit == '%' else ''}" for v in pairs[after]})
        formats = ok.loc[pairs.index, "precision"].nunique() if "precision" in ok.columns else 1
        found.append(
            f"{after.split('.')[-1].replace('_', ' ')} is the same before and after fine-tuning in every cell "
            f"({len(pairs)} cells, {formats} format(s); {', '.join(values[:4])}{' ...' if len(values) > 4 else ''}): "
            "this eval set does not show what fine-tuning or the format changed (identical captions? too few candidates?)"
        )
    return found
