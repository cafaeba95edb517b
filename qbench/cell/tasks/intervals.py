"""Uncertainty of an eval metric from one run: a seeded percentile bootstrap over eval queries or windows.

The eval set is a sample; a metric computed on it would move if another sample of the same size were
drawn. The bootstrap estimates that movement by drawing the eval units (retrieval queries, perplexity
windows) with replacement, `RESAMPLES` times, and recomputing the metric from per-unit figures
(a query's hit, a window's summed NLL) without running the model again (Efron & Tibshirani, *An
Introduction to the Bootstrap*, 1993, ch. 13: percentile intervals). The generator is seeded with
`SEED`, so a cell's interval is the same on every run, and every cell of a suite draws the same
resamples of the same units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RESAMPLES = 1000
CONFIDENCE = 0.95
SEED = 0
# the largest [resamples, units] block of resample weights built at once (float64: 32 MiB)
_BLOCK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Interval:
    """A metric's bootstrap interval in the metric's own unit: `low`..`high` at CONFIDENCE, `se` the
    standard deviation of the bootstrap replicates; all None, with `note` saying why, when undefined."""

    low: float | None
    high: float | None
    se: float | None
    note: str | None = None


def generator() -> torch.Generator:
    """The seeded generator every bootstrap of a cell draws from, in a fixed order."""
    return torch.Generator().manual_seed(SEED)


def resampled_sums(values: torch.Tensor, gen: torch.Generator, resamples: int = RESAMPLES) -> torch.Tensor:
    """[resamples, columns]: column sums of `values` ([units, columns]) over `resamples` draws of `units`
    rows with replacement. Built as (draw counts per unit) @ values, in blocks, so memory stays bounded
    for any number of units (a COCO-sized eval set of 25,000 captions included)."""
    values = values.to(torch.float64)
    units = values.shape[0]
    per_block = max(1, _BLOCK_ELEMENTS // max(units, 1))
    sums, done = [], 0
    while done < resamples:
        count = min(per_block, resamples - done)
        drawn = torch.randint(units, (count, units), generator=gen)
        weights = torch.zeros(count, units, dtype=torch.float64).scatter_add_(1, drawn, torch.ones(count, units, dtype=torch.float64))
        sums.append(weights @ values)
        done += count
    return torch.cat(sums)


def percentile_interval(replicates: torch.Tensor, units: int, confidence: float = CONFIDENCE) -> Interval:
    """The percentile interval and standard error of a metric from its bootstrap replicates ([resamples])."""
    if units < 2:
        return Interval(None, None, None, f"undefined: {units} eval unit(s), nothing to resample")
    replicates = replicates.to(torch.float64)
    if not bool(torch.isfinite(replicates).all()):
        return Interval(None, None, None, "undefined: the metric is not finite in some resamples (non-finite model outputs)")
    tail = (1 - confidence) / 2
    low, high = torch.quantile(replicates, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(low, high, float(replicates.std(correction=1)))
