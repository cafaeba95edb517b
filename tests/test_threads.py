"""Threads per cell: where the number comes from, its default, and the warning on an oversubscribed machine."""

from __future__ import annotations

import pytest

from qbench.contract.suite import LoadedSuite, SuiteError, parse
from qbench.machine import threads
from qbench.runner import plan

from .test_suite import MINIMAL


def test_the_command_line_beats_the_suite_which_beats_omp_num_threads():
    environ = {"OMP_NUM_THREADS": "3"}
    assert threads.plan(1, 4, environ=environ, cores=8).per_cell == 1
    assert threads.plan(None, 4, environ=environ, cores=8).source == "the suite's threads"
    from_env = threads.plan(None, None, environ=environ, cores=8)
    assert (from_env.per_cell, from_env.source) == (3, "OMP_NUM_THREADS")


def test_the_default_gives_one_cell_every_core_and_divides_them_among_cells_side_by_side():
    assert threads.plan(environ={}, cores=8).per_cell == 8
    assert threads.plan(side_by_side=2, environ={}, cores=8).per_cell == 4
    assert threads.plan(side_by_side=3, environ={}, cores=2).per_cell == 1  # never zero


def test_a_busy_machine_is_warned_about():
    two_cores = threads.plan(environ={}, cores=2)
    assert threads.oversubscription(two_cores, load_average=0.2) is None
    warning = threads.oversubscription(two_cores, load_average=6.9)
    assert "oversubscribed" in warning and "6.9" in warning and "2 cores" in warning
    assert "--threads 1" in warning  # two threads on a busy machine spin for each other
    one = threads.plan(1, environ={}, cores=2)
    assert "--threads 1" not in threads.oversubscription(one, load_average=6.9)


def test_run_plan_carries_the_threads_and_parallel_cpu_slots(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(MINIMAL.replace('task = "clip"', 'task = "clip"\nthreads = 2'))
    loaded = LoadedSuite(parse(path.read_text(), path), path, "0" * 64, path.read_text())
    made = plan.make(loaded, device="cpu", parallel=2)
    assert len(made.slots) == 2 and made.threads.per_cell == 2 and made.threads.side_by_side == 2
    assert plan.make(loaded, device="cpu", threads=1).threads.source == "--threads"
    with pytest.raises(SuiteError, match="--parallel"):
        plan.make(loaded, device="cpu", parallel=2, gpus="0")
    with pytest.raises(SuiteError, match="--threads"):
        plan.make(loaded, device="cpu", threads=0)
