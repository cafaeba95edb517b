"""The one bootstrap every quality interval of qbench comes from (the cell's, in each record, and the report's
paired comparisons), and the settings a record states with it (`interval.resamples|confidence|seed`).

The eval set is a sample; a metric computed on it would move if another sample of the same size were
drawn. The bootstrap estimates that movement by drawing the eval units (retrieval queries, perplexity
windows) with replacement and recomputing the metric from per-unit figures (a query's hit, a window's
summed NLL) without running the model again: a percentile interval (Efron & Tibshirani, *An Introduction
to the Bootstrap*, 1993, ch. 13) and the standard deviation of the replicates as the standard error.

It is `scipy.stats.bootstrap` with `method="percentile"`: `paired=True` where several arrays describe the
same units (a window's NLL and its tokens; two arms' NLL of the same windows, so that the text's
difficulty, which both share, cancels), unpaired where they are different units (captions and images).
The generator is seeded with `SEED`, so a cell's interval is the same on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
CONFIDENCE = 0.95
SEED = 0
# the one wording for a difference whose interval holds 0, wherever a verdict is written (report, compare, merges)
NO_DIFFERENCE = "no difference the eval can detect"
# the most resampled values scipy holds at once (a batch of resamples x units x columns, float64: 32 MiB)
_BATCH_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Interval:
    """A metric's bootstrap interval in the metric's own unit: `low`..`high` at the confidence asked for, `se`
    the standard deviation of the bootstrap replicates; all None, with `note` saying why, when undefined."""

    low: float | None
    high: float | None
    se: float | None
    note: str | None = None


def bootstrap(samples: Sequence[np.ndarray], statistic: Callable[..., np.ndarray], *, paired: bool,
              resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = SEED) -> list[Interval]:
    """The percentile interval and standard error of `statistic` over the eval units.

    `samples`: arrays whose last axis is the eval units (leading axes, e.g. one row per k of recall@k, are
    kept apart); `statistic(*samples, axis=-1)` returns the figure, or several stacked on a first axis.
    `paired`: every sample describes the same units, which are drawn together. Returns one Interval per
    figure (flattened), each undefined, with its reason, when fewer than two units or a non-finite
    replicate leave nothing to judge by."""
    from scipy import stats

    arrays = [np.asarray(sample, dtype=np.float64) for sample in samples]
    units = min(a.shape[-1] for a in arrays)
    figures = int(np.asarray(statistic(*arrays, axis=-1)).size)
    if units < 2:
        return [Interval(None, None, None, f"undefined: {units} eval unit(s), nothing to resample")] * figures
    per_resample = sum(a.size for a in arrays)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # a non-finite replicate is judged below
        result = stats.bootstrap(
            arrays, statistic, n_resamples=resamples, batch=max(1, _BATCH_ELEMENTS // per_resample), vectorized=True,
            paired=paired, axis=-1, confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
        )
    replicates = np.asarray(result.bootstrap_distribution).reshape(figures, resamples)
    lows, highs = (np.asarray(bound).reshape(figures) for bound in result.confidence_interval)
    found = []
    for replicate, low, high in zip(replicates, lows, highs, strict=True):
        if not np.isfinite(replicate).all():
            found.append(Interval(None, None, None, "undefined: the metric is not finite in some resamples (non-finite model outputs)"))
        else:
            found.append(Interval(float(low), float(high), float(np.std(replicate, ddof=1))))
    return found
