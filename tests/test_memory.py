"""Per-phase memory on the CPU: RSS sampled by the sampler process, absent sources said to be absent."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from qbench.measure import memory
from qbench.measure.memory import MemoryTracker

MiB = 1024 * 1024

CHILD = """
import sys, time
block = bytearray(int(sys.argv[1]))  # zero-filled: every page is touched, so it is resident
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_rss_peak_includes_a_child_process_and_resets_at_the_next_phase():
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
    quiet, spiked, after = (record[f"memory.{p}.rss_peak_bytes"] for p in ("quiet", "child", "after"))
    assert spiked >= quiet + 400 * MiB
    assert after < quiet + 100 * MiB  # the child's memory is not carried into the next phase
    assert record["memory.peak_rss_bytes"] == spiked
    assert record["memory.child.samples"] >= 10


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
    for key in ("torch_max_allocated_bytes", "torch_max_reserved_bytes", "nvml_process_peak_bytes", "nvml_device_peak_bytes"):
        assert key in {k.split(".", 2)[2] for k in record if k.startswith("memory.train.")}
        assert record[f"memory.train.{key}"] is None
    assert record["memory.train.rss_peak_bytes"] > 0


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
    assert tracker.record["memory.load.rss_peak_bytes"] is None
    assert tracker.record["memory.peak_rss_bytes"] is None


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
    baseline = record["memory.process_baseline_rss_bytes"]
    assert 0 < baseline < record["memory.load.rss_peak_bytes"] - 150 * MiB  # read before the block allocated
    assert record["memory.process_baseline_at"] == "start of phase load, before the model is loaded"
    assert record["memory.process_baseline_torch_allocated_bytes"] is None  # no CUDA: missing, not zero
    assert len(held) == 200 * MiB
