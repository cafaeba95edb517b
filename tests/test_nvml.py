"""The NVML path without a GPU: a fake pynvml (tests/fake_nvml) stands in for the driver.

The sampler runs in its own process, so these tests drive the real MemoryTracker, the real sampler
process and real child processes; only NVML's answers come from files.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qbench.cell.measure import nvml
from qbench.cell.measure.memory import MemoryTracker
from qbench.cell.measure.sampler import ProcessTree

from .fake_nvml import pynvml as fake

FAKE_DIR = Path(__file__).parent / "fake_nvml"
MiB = 1024 * 1024
GPU_A, GPU_B = "GPU-aaaaaaaa-0000-0000-0000-000000000000", "GPU-bbbbbbbb-1111-1111-1111-111111111111"


@pytest.fixture
def fake_nvml(tmp_path, monkeypatch):
    """Two fake GPUs in PCI order (A, B); the fake pynvml is what every process started from here imports."""
    state = tmp_path / "nvml"
    fake.configure(
        state,
        [
            {"uuid": GPU_A, "name": "Fake A100", "total_bytes": 40 * 1024 * MiB, "reserved_bytes": 300 * MiB},
            {"uuid": GPU_B, "name": "Fake H100", "total_bytes": 80 * 1024 * MiB, "reserved_bytes": 500 * MiB},
        ],
    )
    monkeypatch.setenv(fake.STATE_ENV, str(state))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE_DIR), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return state


class FakeCudaCounters:
    """torch.cuda's peak counters, as MemoryTracker uses them; records the calls."""

    def __init__(self, uuid: str | None = None, reserved_bytes: int = 64 * MiB):
        self.calls: list[str] = []
        self._uuid = uuid
        self.reserved_bytes = reserved_bytes
        self.allocated_bytes = reserved_bytes // 2

    def uuid(self):
        return self._uuid

    def synchronize(self):
        self.calls.append("synchronize")

    def reset_peaks(self):
        self.calls.append("reset")

    def peaks(self):
        self.calls.append("peaks")
        return self.allocated_bytes, self.reserved_bytes

    def current(self):
        return self.allocated_bytes // 4, self.reserved_bytes // 2


# ---- which GPU is "cuda:N": torch and NVML number them differently ----

def opened(env: dict[str, str], ordinal: int = 0, torch_uuid: str | None = None) -> nvml.ResolvedDevice:
    fake.nvmlInit()
    try:
        return nvml.resolve(fake, ordinal, torch_uuid, env)
    finally:
        fake.nvmlShutdown()


def test_cuda_visible_devices_index_maps_to_nvml_index_under_pci_bus_order(fake_nvml):
    found = opened({"CUDA_VISIBLE_DEVICES": "1,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, ordinal=0)
    assert (found.index, found.uuid) == (1, GPU_B)
    found = opened({"CUDA_VISIBLE_DEVICES": "1,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, ordinal=1)
    assert (found.index, found.uuid) == (0, GPU_A)


def test_without_pci_bus_order_an_index_does_not_say_which_gpu(fake_nvml):
    with pytest.raises(nvml.NvmlUnavailable, match="CUDA_DEVICE_ORDER is not PCI_BUS_ID"):
        opened({"CUDA_VISIBLE_DEVICES": "1"}, ordinal=0)
    with pytest.raises(nvml.NvmlUnavailable, match="PCI_BUS_ID"):
        opened({}, ordinal=0)


def test_the_uuid_torch_reports_wins_over_any_environment(fake_nvml):
    # torch reports UUIDs without NVML's 'GPU-' prefix
    found = opened({"CUDA_VISIBLE_DEVICES": "0"}, ordinal=0, torch_uuid=GPU_B.removeprefix("GPU-"))
    assert (found.index, found.name) == (1, "Fake H100")
    assert "UUID" in found.how


def test_uuid_and_mig_entries_in_cuda_visible_devices(fake_nvml):
    assert opened({"CUDA_VISIBLE_DEVICES": "GPU-bbbbbbbb"}, ordinal=0).index == 1  # CUDA accepts a UUID prefix
    with pytest.raises(nvml.NvmlUnavailable, match="MIG"):
        opened({"CUDA_VISIBLE_DEVICES": "MIG-1234"}, ordinal=0)
    with pytest.raises(nvml.NvmlUnavailable, match=r"cuda:2 does not exist"):
        opened({"CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, ordinal=2)


def test_a_single_gpu_needs_no_ordering(fake_nvml):
    fake.configure(fake_nvml, [{"uuid": GPU_A, "name": "only", "total_bytes": 1024 * MiB}])
    assert opened({}, ordinal=0).index == 0


def test_no_driver_is_unavailable_with_the_reason_not_a_zero(monkeypatch, tmp_path):
    monkeypatch.setenv(fake.STATE_ENV, str(tmp_path / "no-driver"))
    with pytest.raises(nvml.NvmlUnavailable, match="NVML cannot start: NVMLError_LibraryNotFound"):
        nvml.NvmlDevice.open(0, pynvml=fake)


# ---- whose memory: each PID once, own tree only ----

def test_a_pid_in_compute_and_graphics_lists_is_counted_once(fake_nvml):
    fake.set_usage(os.getpid(), 700 * MiB, device=1, lists=("compute", "graphics", "mps"))
    device = nvml.NvmlDevice.open(0, torch_uuid=GPU_B, pynvml=fake)
    try:
        assert device.process_used_bytes(lambda pid: pid == os.getpid()) == 700 * MiB
        assert device.device_used_bytes() == 500 * MiB + 700 * MiB
    finally:
        device.close()


def test_another_process_is_in_the_device_figure_but_not_in_the_process_figure(fake_nvml):
    stranger = os.getppid()  # alive, and not a descendant of this process
    fake.set_usage(os.getpid(), 100 * MiB)
    fake.set_usage(stranger, 5000 * MiB)
    device = nvml.NvmlDevice.open(0, torch_uuid=GPU_A, pynvml=fake)
    tree = ProcessTree(os.getpid())
    try:
        assert not tree.contains(stranger)
        assert device.process_used_bytes(tree.contains) == 100 * MiB
        assert device.device_used_bytes() == 300 * MiB + 100 * MiB + 5000 * MiB
    finally:
        device.close()


def test_a_listed_pid_without_a_figure_makes_the_process_figure_unknown(fake_nvml):
    fake.set_usage(os.getpid(), None)
    device = nvml.NvmlDevice.open(0, torch_uuid=GPU_A, pynvml=fake)
    try:
        assert device.process_used_bytes(lambda pid: pid == os.getpid()) is None
    finally:
        device.close()


# ---- the tracker with its sampler process ----

CHILD = """
import sys, time, os
import pynvml  # the fake, found through PYTHONPATH
pynvml.set_usage(os.getpid(), int(sys.argv[1]))
pynvml.clear_usage(os.getpid())
print("ready", flush=True)
sys.stdin.readline()
time.sleep(float(sys.argv[3]))
start = time.monotonic()
pynvml.set_usage(os.getpid(), int(sys.argv[1]))
time.sleep(float(sys.argv[2]))
pynvml.clear_usage(os.getpid())
end = time.monotonic()
print(start, end, flush=True)
"""


def start_spiking_child(used_bytes: int, hold_s: float = 0.05, delay_s: float = 0.0) -> subprocess.Popen:
    """A child process that, once told to go, holds `used_bytes` of (fake) GPU memory for `hold_s`."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(used_bytes), str(hold_s), str(delay_s)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    return child


def let_go(child: subprocess.Popen) -> None:
    child.stdin.write("go\n")
    child.stdin.flush()


def spike_window(child: subprocess.Popen) -> tuple[float, float]:
    start, end = (float(v) for v in child.stdout.readline().split())
    child.wait(timeout=30)
    return start, end


def test_a_50ms_spike_in_a_child_process_is_caught_and_phase_peaks_reset(fake_nvml):
    fake.set_usage(os.getpid(), 200 * MiB)  # this process's own CUDA context and tensors
    fake.set_usage(os.getppid(), 9000 * MiB)  # another process on the same GPU
    counters = FakeCudaCounters(uuid=GPU_A)
    tracker = MemoryTracker("cuda:0", cuda_counters=counters)
    try:
        assert tracker.nvml_available, tracker.record["memory.source.nvml"]
        assert tracker.record["memory.nvml.device_uuid"] == GPU_A
        child = start_spiking_child(1500 * MiB, hold_s=0.05)
        with tracker.phase("spike"):
            let_go(child)
            start, end = spike_window(child)
        with tracker.phase("after"):
            time.sleep(0.1)
    finally:
        tracker.close()
    record = tracker.record
    assert end - start < 0.2  # the spike really was short
    assert record["memory.spike.nvml_process_peak_bytes"] == 200 * MiB + 1500 * MiB
    assert record["memory.spike.nvml_device_peak_bytes"] == 300 * MiB + 200 * MiB + 1500 * MiB + 9000 * MiB
    # the next phase starts from zero: the spike and the child are gone
    assert record["memory.after.nvml_process_peak_bytes"] == 200 * MiB
    assert record["memory.after.nvml_device_peak_bytes"] == 300 * MiB + 200 * MiB + 9000 * MiB
    assert record["memory.all_phases.nvml_process_peak_bytes"] == 1700 * MiB
    assert record["memory.after.samples"] >= 3
    # torch's counters are reset at each phase start, synchronised before they are read
    assert counters.calls == ["synchronize", "reset", "synchronize", "peaks"] * 2
    assert record["memory.spike.torch_reserved_peak_bytes"] == 64 * MiB
    assert record["memory.source.torch_cuda"].startswith("torch.cuda")


def test_phase_peaks_reset_at_each_boundary(fake_nvml):
    fake.set_usage(os.getpid(), 2000 * MiB)
    tracker = MemoryTracker("cuda:0", cuda_counters=FakeCudaCounters(uuid=GPU_A))
    try:
        with tracker.phase("big"):
            time.sleep(0.05)
        fake.set_usage(os.getpid(), 300 * MiB)
        with tracker.phase("small"):
            time.sleep(0.05)
        with tracker.phase("grows"):
            fake.set_usage(os.getpid(), 900 * MiB)
            time.sleep(0.05)
    finally:
        tracker.close()
    record = tracker.record
    assert record["memory.big.nvml_process_peak_bytes"] == 2000 * MiB
    assert record["memory.small.nvml_process_peak_bytes"] == 300 * MiB
    assert record["memory.grows.nvml_process_peak_bytes"] == 900 * MiB
    assert record["memory.all_phases.nvml_process_peak_bytes"] == 2000 * MiB


def test_torch_memory_without_any_nvml_process_entry_is_unknown_not_zero(fake_nvml):
    # inside a container NVML may list this process under a PID it cannot recognise
    fake.set_usage(os.getppid(), 800 * MiB)
    tracker = MemoryTracker("cuda:0", cuda_counters=FakeCudaCounters(uuid=GPU_A, reserved_bytes=512 * MiB))
    try:
        with tracker.phase("train"):
            time.sleep(0.03)
    finally:
        tracker.close()
    assert tracker.record["memory.train.nvml_process_peak_bytes"] is None
    assert "PID namespace" in tracker.record["memory.train.nvml_process_note"]
    assert tracker.record["memory.train.nvml_device_peak_bytes"] == 300 * MiB + 800 * MiB


def test_on_cuda_without_nvml_the_record_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE_DIR), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv(fake.STATE_ENV, str(tmp_path / "no-driver"))
    tracker = MemoryTracker("cuda:0", cuda_counters=FakeCudaCounters())
    try:
        with tracker.phase("load"):
            pass
    finally:
        tracker.close()
    assert tracker.record["memory.nvml_available"] is False
    assert tracker.record["memory.source.nvml"].startswith("unavailable: NVML cannot start")
    assert tracker.record["memory.load.nvml_process_peak_bytes"] is None
    assert tracker.record["memory.load.torch_allocated_peak_bytes"] == 32 * MiB


def floats_that_sort_in(seconds: float) -> list[float]:
    """A list whose sort() takes about `seconds`: sorting floats is one C call that never lets go of the GIL."""
    size = 50_000
    while True:
        values = [random.random() for _ in range(size)]
        started = time.monotonic()
        sorted(values)
        took = time.monotonic() - started
        if took >= seconds / 8 or size > 20_000_000:
            return [random.random() for _ in range(int(size * seconds / max(took, 1e-6)))]
        size *= 2


def hold_the_gil(values: list[float]) -> tuple[float, float]:
    started = time.monotonic()
    values.sort()
    return started, time.monotonic()


def test_a_sampler_thread_misses_a_child_spike_while_the_gil_is_held_but_the_sampler_process_does_not(fake_nvml):
    """Why the sampler is a process: a thread in the measured process cannot read while a C call holds the GIL."""
    device = nvml.NvmlDevice.open(0, torch_uuid=GPU_A, pynvml=fake)
    tree = ProcessTree(os.getpid())
    thread_peak = [0]
    stop = threading.Event()

    def thread_sampler():
        while not stop.wait(0.01):
            thread_peak[0] = max(thread_peak[0], device.process_used_bytes(tree.contains) or 0)

    tracker = MemoryTracker("cuda:0", cuda_counters=FakeCudaCounters(uuid=GPU_A, reserved_bytes=0))
    sampler = threading.Thread(target=thread_sampler)
    sampler.start()
    try:
        control = start_spiking_child(1200 * MiB, hold_s=0.3)
        let_go(control)
        spike_window(control)  # this process waits in a read: the GIL is free, the thread can read
        assert thread_peak[0] == 1200 * MiB, "the thread sampler misses even a spike it could see"
        for _attempt in range(3):
            values = floats_that_sort_in(0.8)
            child = start_spiking_child(1200 * MiB, hold_s=0.05, delay_s=0.2)
            thread_peak[0] = 0
            with tracker.phase(f"attempt{_attempt}"):
                let_go(child)
                held_from, held_to = hold_the_gil(values)
                spike_from, spike_to = spike_window(child)
            if held_from < spike_from and spike_to < held_to:
                break  # the whole spike fell inside the GIL-holding call: the experiment is valid
        else:
            pytest.skip("the machine was too busy to place the spike inside the GIL-holding call")
    finally:
        stop.set()
        sampler.join()
        tracker.close()
        device.close()
    assert tracker.record[f"memory.attempt{_attempt}.nvml_process_peak_bytes"] == 1200 * MiB
    assert thread_peak[0] == 0


def test_the_process_baseline_before_the_model_is_read_from_every_process_source(fake_nvml):
    fake.set_usage(os.getpid(), 300 * MiB)  # the CUDA context, before any weight is loaded
    fake.set_usage(os.getppid(), 9000 * MiB)  # another process: not this process's baseline
    counters = FakeCudaCounters(uuid=GPU_A, reserved_bytes=64 * MiB)
    tracker = MemoryTracker("cuda:0", cuda_counters=counters)
    try:
        with tracker.phase("data"):
            pass
        with tracker.phase("load", process_baseline=True):
            fake.set_usage(os.getpid(), 800 * MiB)
            time.sleep(0.1)
    finally:
        tracker.close()
    record = tracker.record
    assert record["memory.process_baseline.nvml_process_bytes"] == 300 * MiB
    assert record["memory.process_baseline.torch_allocated_bytes"] == 8 * MiB  # FakeCudaCounters.current()
    assert record["memory.process_baseline.torch_reserved_bytes"] == 32 * MiB
    assert record["memory.process_baseline.rss_bytes"] > 0
    assert "memory.process_baseline.nvml_device_bytes" not in record  # the whole GPU is not this process's
    assert record["memory.load.nvml_process_peak_bytes"] == 800 * MiB
