"""Per-phase memory on the CPU: RSS of the cell and PSS of its process tree sampled by the sampler process,
absent sources said to be absent."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from qbench.cell.measure import memory, sampler
from qbench.cell.measure.memory import MemoryTracker

MiB = 1024 * 1024

CHILD = """
import sys, time
block = bytearray(int(sys.argv[1]))  # zero-filled: every page is touched, so it is resident
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_pss_peak_includes_a_child_process_rss_does_not_and_both_reset_at_the_next_phase():
    tracker = MemoryTracker("cpu")
    try:
        with tracker.phase("quiet"):
            time.sleep(0.05)
        with tracker.phase("child"):
            child = subprocess.Popen([sys.executable, "-c", CHILD, str(400 * MiB), "0.4"], stdout=subprocess.PIPE, text=True)
            assert child.stdout.readline().strip() == "holding"
            child.wait(timeout=60)
        with tracker.phase("after"):
            time.sleep(0.05)
    finally:
        tracker.close()
    record = tracker.record
    quiet, spiked, after = (record[f"memory.{p}.pss_peak_bytes"] for p in ("quiet", "child", "after"))
    assert spiked >= quiet + 400 * MiB  # the child's pages are its own: all of them count
    assert after < quiet + 100 * MiB  # the child's memory is not carried into the next phase
    assert record["memory.all_phases.pss_peak_bytes"] == spiked
    assert record["memory.child.tree_processes_max"] == 2 and record["memory.quiet.tree_processes_max"] == 1
    assert record["memory.child.rss_peak_bytes"] < record["memory.quiet.rss_peak_bytes"] + 100 * MiB  # the cell's own
    assert record["memory.child.samples"] >= 10 and record["memory.child.pss_reads"] >= 1


def test_pages_a_forked_child_shares_with_the_cell_count_once():
    """A DataLoader worker is a fork: it maps the cell's pages, and a sum of RSS would count them twice."""
    block = bytearray(300 * MiB)  # zero-filled, so resident; shared copy-on-write with the fork below
    tracker = MemoryTracker("cpu")
    try:
        with tracker.phase("alone"):
            time.sleep(0.3)
        with tracker.phase("forked"):
            child = os.fork()
            if child == 0:  # the worker only holds the shared pages
                time.sleep(1.5)
                os._exit(0)
            os.waitpid(child, 0)
    finally:
        tracker.close()
    record = tracker.record
    assert record["memory.forked.tree_processes_max"] == 2
    alone, forked = record["memory.alone.pss_peak_bytes"], record["memory.forked.pss_peak_bytes"]
    assert alone > 300 * MiB
    assert forked < alone + 60 * MiB, (alone / MiB, forked / MiB)  # summed RSS would be ~ alone + 300 MiB
    del block


def test_a_worker_that_exited_and_was_not_yet_reaped_does_not_force_a_full_pss_read_at_every_sample():
    tracker = MemoryTracker("cpu")
    try:
        with tracker.phase("zombie"):
            child = os.fork()
            if child == 0:
                os._exit(0)  # a zombie until the parent reaps it: listed as a child, its smaps_rollup unreadable
            time.sleep(1.0)
            os.waitpid(child, 0)
    finally:
        tracker.close()
    record = tracker.record
    assert record["memory.zombie.pss_peak_bytes"] > 0
    assert record["memory.zombie.pss_reads"] < record["memory.zombie.samples"] / 2, record


def test_pss_is_read_in_full_only_as_often_as_its_cost_allows_and_follows_rss_between_reads(monkeypatch):
    calls = []
    rss = {"root": 300 * MiB}

    def costly_pss(pid):  # 20 ms of CPU a read: at a 5 % share, one full read per 0.4 s at most
        calls.append(time.monotonic())
        started = time.process_time()
        while time.process_time() - started < 0.02:
            pass
        return 100 * MiB

    monkeypatch.setattr(sampler.ProcessTree, "_pss_of", staticmethod(costly_pss))
    monkeypatch.setattr(sampler.ProcessTree, "_rss_of", lambda self, pid: rss["root"])
    monkeypatch.setattr(sampler.ProcessTree, "members", lambda self: [self.root])
    tree = sampler.ProcessTree(os.getpid(), pss_min_interval_s=0.01)
    first = tree.pss_bytes()
    assert first == 100 * MiB and len(calls) == 1
    rss["root"] += 64 * MiB  # the process allocates: its RSS, and so its PSS estimate, grow by as much
    grown = tree.pss_bytes()
    if len(calls) == 1:  # no full read in between (less than 0.4 s passed)
        assert grown - first == 64 * MiB
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        tree.pss_bytes()
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert 2 <= len(calls) <= 4 and min(gaps) >= 0.02 / sampler.PSS_CPU_SHARE * 0.9, gaps


def test_a_cpu_record_marks_cuda_and_nvml_unavailable_instead_of_zero():
    tracker = MemoryTracker("cpu")
    try:
        with tracker.phase("train"):
            pass
    finally:
        tracker.close()
    record = tracker.record
    assert record["memory.source.torch_cuda"] == "unavailable: device is cpu"
    assert record["memory.source.nvml"] == "unavailable: device is cpu"
    assert record["memory.nvml_available"] is False and record["memory.torch_cuda_available"] is False
    for key in ("torch_allocated_peak_bytes", "torch_reserved_peak_bytes", "nvml_process_peak_bytes", "nvml_device_peak_bytes"):
        assert key in {k.split(".", 2)[2] for k in record if k.startswith("memory.train.")}
        assert record[f"memory.train.{key}"] is None
    assert record["memory.train.rss_peak_bytes"] > 0 and record["memory.train.pss_peak_bytes"] > 0


def test_phases_do_not_nest_and_are_measured_once():
    tracker = MemoryTracker("cpu")
    try:
        with tracker.phase("load"):
            with pytest.raises(RuntimeError, match="do not nest"):
                with tracker.phase("inner"):
                    pass
        with pytest.raises(ValueError, match="already measured"):
            with tracker.phase("load"):
                pass
    finally:
        tracker.close()


def test_a_phase_that_raises_still_records_its_peaks():
    tracker = MemoryTracker("cpu")
    try:
        with pytest.raises(MemoryError):
            with tracker.phase("train"):
                raise MemoryError("out of memory")
    finally:
        tracker.close()
    assert tracker.record["memory.train.rss_peak_bytes"] > 0


def test_without_a_sampler_process_rss_is_unavailable_with_the_reason(monkeypatch):
    def refuse(*args, **kwargs):
        raise memory.SamplerFailed("memory sampler process exited (exit code 1)")

    monkeypatch.setattr(memory, "SamplerProcess", refuse)
    tracker = MemoryTracker("cpu")
    with tracker.phase("load"):
        pass
    tracker.close()
    assert tracker.record["memory.source.rss"] == "unavailable: memory sampler process exited (exit code 1)"
    assert tracker.record["memory.source.pss"] == "unavailable: memory sampler process exited (exit code 1)"
    for source in ("rss", "pss"):
        assert tracker.record[f"memory.load.{source}_peak_bytes"] is None
        assert tracker.record[f"memory.all_phases.{source}_peak_bytes"] is None


def test_the_sampler_process_ends_with_the_tracker():
    import psutil

    tracker = MemoryTracker("cpu")
    pid = tracker._sampler.pid
    assert psutil.pid_exists(pid)
    tracker.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_the_process_baseline_is_what_the_process_held_as_the_marked_phase_started():
    tracker = MemoryTracker("cpu")
    try:
        with tracker.phase("data"):
            pass
        with tracker.phase("load", process_baseline=True):
            held = bytearray(200 * MiB)  # zero-filled: resident
            time.sleep(0.1)
        with tracker.phase("train"):
            pass
    finally:
        tracker.close()
    record = tracker.record
    baseline = record["memory.process_baseline.rss_bytes"]
    assert 0 < baseline < record["memory.load.rss_peak_bytes"] - 150 * MiB  # read before the block allocated
    assert record["memory.process_baseline.at"] == "start of phase load, before the model is loaded"
    assert record["memory.process_baseline.torch_allocated_bytes"] is None  # no CUDA: missing, not zero
    assert len(held) == 200 * MiB
