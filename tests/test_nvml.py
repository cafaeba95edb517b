"""The NVML path without a GPU: a fake pynvml (tests/fake_nvml) stands in for the driver.

The sampler runs in its own process, so these tests drive the real MemoryTracker, the real sampler
process and real child processes; only NVML's answers come from files.
"""

from __future__ import annotations

import ctypes
import os
import shlex
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


def test_a_descendant_that_ended_after_nvml_listed_it_is_still_counted():
    """NVML lists a child with its memory; the child ends and is reaped before the sampler asks whose it is (the
    default tier once recorded a 1,500 MiB spike in a child as 0 this way): a known member is still the tree's."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    tree = ProcessTree(os.getpid())
    assert child.pid in tree.members()
    child.stdin.close()
    child.wait()
    assert tree.contains(child.pid)
    assert not tree.contains(os.getppid())  # a process that never was a member is not


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
used, hold, wait_for, go, also = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
pynvml.set_usage(os.getpid(), used)
pynvml.clear_usage(os.getpid())
if go == "wait-for-go":
    print("ready", flush=True)
    sys.stdin.readline()
start = time.monotonic()
pynvml.set_usage(os.getpid(), used, watched=True)
if hold.startswith("until-seen"):  # however busy the machine: until the reader this test is about has read the spike
    # (until-seen-everywhere: in the process lists and in the device's used memory both)
    seen = pynvml.wait_until_seen(os.getpid(), lambda reader: reader != -wait_for if wait_for < 0 else reader == wait_for,
                                  kinds=pynvml.READ_KINDS if hold == "until-seen-everywhere" else None)
else:
    time.sleep(float(hold))
    seen = max(pynvml.seen_by(os.getpid()).values(), default=None)
also_seen = None
if also != "-":  # PID:SECONDS: then give that process as long to read it too
    pid, seconds = also.split(":")
    also_seen = pynvml.wait_until_seen(os.getpid(), lambda reader: reader == int(pid), float(seconds))
pynvml.clear_usage(os.getpid())
end = time.monotonic()
print(start, end, seen, also_seen, flush=True)
"""


def spiking_child_command(used_bytes: int, hold: str, reader: int, go: str, also: str = "-") -> list[str]:
    """A process that holds `used_bytes` of (fake) GPU memory for `hold` seconds or, with "until-seen", until the
    process `reader` (with -pid: any process but that one) has read it, then with `also` = "PID:SECONDS" up to
    SECONDS more until PID has read it too; it starts after "go" on its stdin with go = "wait-for-go". It prints
    when the spike started and ended, and when each of the two readers first read it ("None": not at all)."""
    return [sys.executable, "-c", CHILD, str(used_bytes), hold, str(reader), go, also]


def start_spiking_child(used_bytes: int, hold: str = "until-seen", reader: int = 0) -> subprocess.Popen:
    """A child process that, once told to go, holds `used_bytes` of (fake) GPU memory (see spiking_child_command);
    `reader` 0: until a process other than this one has seen it (the sampler process)."""
    child = subprocess.Popen(
        spiking_child_command(used_bytes, hold, reader or -os.getpid(), "wait-for-go"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    return child


def let_go(child: subprocess.Popen) -> None:
    child.stdin.write("go\n")
    child.stdin.flush()


def spike_window(child: subprocess.Popen) -> tuple[float, float, float | None]:
    """When the spike started and ended, and when the reader waited for first saw it (None: never)."""
    window = child.stdout.readline()
    child.wait(timeout=60)
    return parse_window(window)[:3]


def parse_window(line: str) -> tuple[float | None, ...]:
    return tuple(None if value == "None" else float(value) for value in line.split())


def sampled(used_bytes: int, times: int) -> None:
    """List this process with `used_bytes` and wait until the sampler process (any process but this one) has read
    it `times` times more: the phase holds samples whatever the machine's load, with no sleep a busy machine outlasts."""
    for _ in range(times):
        fake.set_usage(os.getpid(), used_bytes, watched=True)
        assert fake.wait_until_seen(os.getpid(), lambda reader: reader != os.getpid()) is not None, "the sampler read nothing in 60 s"


def test_a_spike_in_a_child_process_is_caught_and_phase_peaks_reset(fake_nvml):
    """The spike lasts until the sampler has read it: whether the sampler catches a spike of a given length is
    a matter of its timing, measured in benchmarks/test_measurement_cost.py."""
    fake.set_usage(os.getpid(), 200 * MiB)  # this process's own CUDA context and tensors
    fake.set_usage(os.getppid(), 9000 * MiB)  # another process on the same GPU
    counters = FakeCudaCounters(uuid=GPU_A)
    tracker = MemoryTracker("cuda:0", cuda_counters=counters)
    try:
        assert tracker.nvml_available, tracker.record["memory.source.nvml"]
        assert tracker.record["memory.nvml.device_uuid"] == GPU_A
        child = start_spiking_child(1500 * MiB, hold="until-seen-everywhere")  # the device figure is asserted too
        with tracker.phase("spike"):
            let_go(child)
            start, end, seen = spike_window(child)
        with tracker.phase("after"):
            sampled(200 * MiB, 3)
    finally:
        tracker.close()
    record = tracker.record
    assert seen is not None and start <= seen <= end, "the sampler process never read the spike"
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


class ThreadSampler:
    """What a sampler thread inside the measured process would read: the process tree's NVML figure every 10 ms."""

    def __init__(self, device: nvml.NvmlDevice):
        self.device, self.tree = device, ProcessTree(os.getpid())
        self.peak, self.reads = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.device.process_used_bytes(self.tree.contains) or 0)
            self.reads += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def hold_the_gil_while(command: list[str], output: Path) -> int:
    """Run `command` (its output into `output`) to its end inside one C call that keeps the GIL: libc's system()
    through ctypes.PyDLL, which does not release it. No other thread of this process runs Python meanwhile,
    however long the command takes on a busy machine."""
    return ctypes.PyDLL(None).system(f"{shlex.join(command)} > {shlex.quote(str(output))}".encode())


def test_a_sampler_thread_misses_a_child_spike_while_the_gil_is_held_but_the_sampler_process_does_not(fake_nvml, tmp_path):
    """Why the sampler is a process: a thread in the measured process cannot read while a C call holds the GIL."""
    device = nvml.NvmlDevice.open(0, torch_uuid=GPU_A, pynvml=fake)
    tracker = MemoryTracker("cuda:0", cuda_counters=FakeCudaCounters(uuid=GPU_A, reserved_bytes=0))
    try:
        control = ThreadSampler(device)
        try:  # this process waits in a read (the GIL is free): the thread reads the spike, held until it has
            spike = start_spiking_child(1200 * MiB, reader=os.getpid())
            let_go(spike)
            *_, seen = spike_window(spike)
        finally:
            control.stop()
        assert seen is not None and control.peak == 1200 * MiB, "the thread sampler misses even a spike it could see"

        thread = ThreadSampler(device)
        try:
            while thread.reads < 2:  # the thread is in its loop, reading
                time.sleep(0.01)
            # the spike lasts until the sampler process (not this one) has read it, then a second more for this
            # process's thread, which would read it within 10 ms if the GIL were free
            with tracker.phase("gil_held"):
                command = spiking_child_command(1200 * MiB, "until-seen", -os.getpid(), "now", f"{os.getpid()}:1")
                assert hold_the_gil_while(command, tmp_path / "spike.txt") == 0
            reads_after = thread.reads
            while thread.reads < reads_after + 2:  # the thread goes on once the GIL is free: it was only held up
                time.sleep(0.01)
        finally:
            thread.stop()
    finally:
        tracker.close()
        device.close()
    start, end, seen, seen_by_this_process = parse_window((tmp_path / "spike.txt").read_text())
    assert seen is not None and start <= seen <= end and end - start >= 1.0
    assert tracker.record["memory.gil_held.nvml_process_peak_bytes"] == 1200 * MiB
    assert seen_by_this_process is None and thread.peak == 0


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
