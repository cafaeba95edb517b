"""Peak memory per phase from every source the device has, each under its own labelled key."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from qbench.measure import nvml

SAMPLE_INTERVAL_S = 0.01


def process_tree_rss_bytes(process: psutil.Process) -> int:
    """Resident set size of a process and all its children (DataLoader workers count too)."""
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # a child that exits between listing and reading
            pass
    return total


class _PeakSampler:
    """A background thread that keeps the maximum of several readings until stopped."""

    def __init__(self, readers: dict[str, Any], interval_s: float):
        self._readers = readers
        self._interval_s = interval_s
        self.peaks: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="qbench-memory-sampler", daemon=True)

    def _read_once(self) -> None:
        for key, read in self._readers.items():
            value = read()
            if value is not None and value > self.peaks.get(key, -1):
                self.peaks[key] = value
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._read_once()

    def __enter__(self) -> _PeakSampler:
        self._read_once()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read_once()


class MemoryTracker:
    """Tracks peak memory phase by phase: `with tracker.phase("train"): ...`.

    Sources: process RSS (sampled, since ru_maxrss is lifetime-wide), torch CUDA max allocated and
    reserved (reset at each phase boundary), and on NVIDIA GPUs NVML's per-process and device-wide
    used memory (sampled). A source that is absent is recorded as such, never as a zero.
    """

    def __init__(self, device: str, interval_s: float = SAMPLE_INTERVAL_S, nvml_source: nvml.NvmlSource | None = None):
        self.device = device
        self.interval_s = interval_s
        self.record: dict[str, Any] = {}
        self._process = psutil.Process(os.getpid())
        self._cuda = device.startswith("cuda")
        self._nvml = nvml_source if nvml_source is not None else (nvml.NvmlSource.open(device) if self._cuda else None)
        self.record["memory.source.rss"] = "psutil: resident set size of this process and its children, sampled"
        self.record["memory.source.torch_cuda"] = (
            "torch.cuda.max_memory_allocated/max_memory_reserved, reset at each phase"
            if self._cuda
            else f"unavailable: device is {device}"
        )
        self.record["memory.source.nvml"] = (
            self._nvml.description if self._nvml is not None and self._nvml.available
            else (self._nvml.unavailable_reason if self._nvml is not None else f"unavailable: device is {device}")
        )
        self.record["memory.sample_interval_s"] = interval_s

    def _readers(self) -> dict[str, Any]:
        readers: dict[str, Any] = {"rss_peak_bytes": lambda: process_tree_rss_bytes(self._process)}
        if self._nvml is not None and self._nvml.available:
            readers["nvml_process_peak_bytes"] = self._nvml.process_used_bytes
            readers["nvml_device_peak_bytes"] = self._nvml.device_used_bytes
        return readers

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        sampler = _PeakSampler(self._readers(), self.interval_s)
        started = time.perf_counter()
        try:
            with sampler:
                yield
                if self._cuda:
                    torch.cuda.synchronize()
        finally:
            prefix = f"memory.{name}."
            self.record[prefix + "seconds"] = time.perf_counter() - started
            self.record[prefix + "samples"] = sampler.samples
            self.record[prefix + "rss_peak_bytes"] = sampler.peaks.get("rss_peak_bytes")
            for key in ("nvml_process_peak_bytes", "nvml_device_peak_bytes"):
                self.record[prefix + key] = sampler.peaks.get(key)
            if self._cuda:
                self.record[prefix + "torch_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
                self.record[prefix + "torch_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
            else:
                self.record[prefix + "torch_max_allocated_bytes"] = None
                self.record[prefix + "torch_max_reserved_bytes"] = None

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
