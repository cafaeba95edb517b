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


def _training_step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("counted", [False, True], ids=["uncounted", "tensor-bytes-counted"])
def test_a_training_step_with_and_without_the_tensor_byte_counter(benchmark, counted):
    """A suite with a [fit] table counts its tensors' bytes through the profiler's memory events (qbench.cell.measure
    .tensor_bytes) during every phase, timed steps included: compare the two medians (tiny Llama, batch 4 x 64
    tokens, one thread; about 2,600 allocations and frees per step)."""
    from transformers import AutoModelForCausalLM

    from qbench.cell import models
    from qbench.cell.measure.tensor_bytes import CpuTensorBytes

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(models.resolve("builtin:tiny-llama"), dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    counter = CpuTensorBytes() if counted else None
    if counter is not None:
        counter.start()
    try:
        benchmark(_training_step, model, ids)
    finally:
        if counter is not None:
            counter.stop()
    if counter is not None:
        assert counter.events > 0 and counter.current == 0  # every step frees what it allocated
