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


def test_a_busy_machine_is_warned_about_and_a_quiet_one_is_not():
    two_cores = threads.plan(environ={}, cores=2)
    assert threads.oversubscription(two_cores, others_busy_cores=0.2) is None
    assert threads.oversubscription(two_cores, others_busy_cores=0.45) is None  # a quiet machine's own chores
    warning = threads.oversubscription(two_cores, others_busy_cores=1.9)
    assert "oversubscribed" in warning and "1.9 of 2 cores" in warning
    assert "ACTIVE" not in warning  # passive waiting: nothing to advise
    spinning = threads.plan(environ={"OMP_WAIT_POLICY": "ACTIVE"}, cores=2)
    assert "OMP_WAIT_POLICY=ACTIVE" in threads.oversubscription(spinning, others_busy_cores=1.9)


def test_cells_wait_passively_unless_the_user_says_otherwise():
    default = threads.plan(environ={}, cores=2)
    assert default.env() == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    assert default.record_fields()["env.omp_wait_policy"] == "OMP_WAIT_POLICY=PASSIVE KMP_BLOCKTIME=0 (default)"
    own = threads.plan(environ={"GOMP_SPINCOUNT": "10000"}, cores=2)
    assert own.env() == {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "10000"} and "(the environment)" in own.header()


def test_others_busy_cores_leave_out_our_own_processes(monkeypatch):
    readings = iter([{"busy_s": 100.0}, {"busy_s": 103.0}])
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(threads, "machine_cpu_seconds", lambda: next(readings))
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(clock))
    own = iter([5.0, 7.0])  # our processes took 2 of the 3 busy CPU seconds
    monkeypatch.setattr(threads, "_process_cpu_s", lambda pid: next(own))
    window = threads.BusyWindow.start([1])
    assert window.others_cores([1]) == pytest.approx(0.5)


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
