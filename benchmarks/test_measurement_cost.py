"""What qbench's own measurements cost (pytest-benchmark): the bootstrap behind every quality interval, and
one read of a process's PSS, which the memory sampler makes beside every timed loop.

    python -m pytest benchmarks/test_measurement_cost.py --benchmark-only     # the figures on this machine

The bootstrap is scipy.stats.bootstrap (qbench.contract.intervals): 1,000 resamples of 3 recall@k columns.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from qbench.cell.measure.sampler import ProcessTree
from qbench.contract import intervals


@pytest.mark.parametrize("queries", [1_000, 5_000])
def test_bootstrap_of_recall_hits(benchmark, queries):
    hits = (np.random.default_rng(0).random((3, queries)) < 0.4).astype(float)
    found = benchmark(lambda: intervals.bootstrap([hits], lambda h, axis: h.mean(axis=axis), paired=True))
    assert len(found) == 3
    assert all(i.low < h.mean() < i.high for i, h in zip(found, hits, strict=True))


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/smaps_rollup"), reason="needs Linux's smaps_rollup")
def test_one_pss_read_of_this_process(benchmark):
    pss = benchmark(ProcessTree._pss_of, os.getpid())
    assert 0 < pss
