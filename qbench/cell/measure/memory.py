"""Peak memory per phase from every source the device has, each under its own labelled key.

`with tracker.phase("train"): ...` records, for that phase alone:

    memory.train.pss_peak_bytes             PSS of this process and its children (DataLoader workers):
                                            shared pages divided among their sharers, so counted once (sampled);
                                            as its own process: a cell forked from the fork server adds the
                                            server's share of the pages they share (qbench.cell.measure.forked)
    memory.train.tree_pss_peak_bytes        the same without the server's share (equal for a subprocess cell)
    memory.train.fork_server_share_bytes    the server's share added, at the phase's end (None: not forked)
    memory.train.rss_peak_bytes             RSS of this process alone (sampled)
    memory.train.torch_allocated_peak_bytes  torch.cuda.max_memory_allocated (reset at the phase start)
    memory.train.torch_reserved_peak_bytes  torch.cuda.max_memory_reserved  (reset at the phase start)
    memory.train.nvml_process_peak_bytes    NVML, this process and its children (sampled)
    memory.train.nvml_device_peak_bytes     NVML, the whole device: other processes and driver reserve too

plus `memory.train.tree_processes_max` (the most processes the tree had at once),
`memory.train.pss_reads` (full smaps_rollup reads of the tree behind the PSS figure) and
`memory.train.sampled_s` (the seconds the phase was sampled for); `memory.all_phases.<source>_peak_bytes`
is each source's largest figure over the phases.

RSS, PSS and NVML are sampled every ~10 ms by a separate process (qbench.cell.measure.sampler), since
ru_maxrss is lifetime-wide and torch's counters are allocator-only. A source that is absent is None
with `memory.source.<source>` saying why, never a zero.

`tracker.phase("load", process_baseline=True)` also records what each process source read as the
phase started — `memory.process_baseline.rss_bytes`, `.torch_allocated_bytes`, ... (the runtime
before the model is loaded; a peak minus it is what the model and its training added).

With `cpu_tensor_bytes` (a suite with a [fit] table, on a CPU) each phase from the process baseline on also
records `memory.<phase>.torch_cpu_increase_peak_bytes`: the bytes torch's tensors held at the phase's peak
above what they held at the process baseline, to the byte (qbench.cell.measure.tensor_bytes), and
`memory.all_phases.torch_cpu_increase_peak_bytes` the largest over the phases.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qbench.cell.measure.sampler import SamplerFailed, SamplerProcess
from qbench.contract import schema

SAMPLE_INTERVAL_S = 0.01

# the figures each phase records
PHASE_SOURCES = tuple(schema.MEMORY_SOURCES)
# with cpu_tensor_bytes: per phase, and the largest over the phases
TORCH_CPU_KEY = "torch_cpu_increase_peak_bytes"
TORCH_CPU_PEAK = "memory.all_phases.torch_cpu_increase_peak_bytes"
# the ones the sampler process reads: record key -> the sampler's reading
_SAMPLED = {
    "pss_peak_bytes": "pss_bytes",
    "tree_pss_peak_bytes": "tree_pss_bytes",
    "rss_peak_bytes": "rss_bytes",
    "nvml_process_peak_bytes": "nvml_process_bytes",
    "nvml_device_peak_bytes": "nvml_device_bytes",
}


class TorchCudaCounters:
    """torch's caching-allocator peaks on one CUDA device."""

    def __init__(self, device: str):
        import torch

        self._cuda = torch.cuda
        index = torch.device(device).index
        self.index = torch.cuda.current_device() if index is None else index

    def uuid(self) -> str | None:
        try:
            return str(self._cuda.get_device_properties(self.index).uuid)
        except Exception:  # older torch: fall back to CUDA_VISIBLE_DEVICES and PCI bus order
            return None

    def synchronize(self) -> None:
        self._cuda.synchronize(self.index)

    def reset_peaks(self) -> None:
        self._cuda.reset_peak_memory_stats(self.index)

    def peaks(self) -> tuple[int, int]:
        return self._cuda.max_memory_allocated(self.index), self._cuda.max_memory_reserved(self.index)

    def current(self) -> tuple[int, int]:
        return self._cuda.memory_allocated(self.index), self._cuda.memory_reserved(self.index)


def cpu_fields(phase: str, cpu: dict[str, Any] | None, cores: int) -> dict[str, Any]:
    """`cpu.<phase>.*` from the sampler's CPU reading of the phase (None each where there was none):

    process_s            CPU seconds of the cell's process tree (all threads, DataLoader workers too)
    runqueue_wait_s      seconds its threads were ready to run but waited for a core (contention)
    share                process_s / (process_s + runqueue_wait_s): of the time it wanted a core, how much it had
    machine_busy_cores   cores the whole machine kept busy on average, this cell included
    others_busy_cores    the same less this cell: the load of everything else
    steal_share          share of the machine's CPU time a hypervisor gave to other guests
    """
    prefix = f"cpu.{phase}."
    keys = ("process_s", "runqueue_wait_s", "share", "machine_busy_cores", "others_busy_cores", "steal_share")
    if not cpu:
        return dict.fromkeys((prefix + k for k in keys), None)
    seconds, run, wait = cpu["seconds"], cpu["tree_run_s"], cpu["tree_wait_s"]
    busy = cpu["machine_busy_s"] / seconds if seconds > 0 else None
    return {
        prefix + "process_s": run,
        prefix + "runqueue_wait_s": wait,
        prefix + "share": run / (run + wait) if run + wait > 0 else None,
        prefix + "machine_busy_cores": min(busy, float(cores)) if busy is not None else None,
        prefix + "others_busy_cores": max(0.0, min(busy, float(cores)) - run / seconds) if busy is not None else None,
        prefix + "steal_share": cpu["machine_steal_share"],
    }


class MemoryTracker:
    """Tracks peak memory phase by phase: `with tracker.phase("train"): ...`; `record` holds the figures."""

    def __init__(self, device: str, interval_s: float = SAMPLE_INTERVAL_S, cuda_counters: Any = None,
                 cpu_tensor_bytes: bool = False):
        from qbench.cell.measure.nvml import device_ordinal

        self.device = device
        self.interval_s = interval_s
        from qbench.machine.threads import available_cores

        self.cores = available_cores()
        self.record: dict[str, Any] = {"memory.sample_interval_s": interval_s}
        self._cuda = device.startswith("cuda")
        self._counters = cuda_counters if cuda_counters is not None else (TorchCudaCounters(device) if self._cuda else None)
        self._active: str | None = None
        self._outside_peak: list[str] = []
        self._measured: list[str] = []  # the phases measured so far, in order
        from qbench.cell.measure.forked import fork_server

        self.fork_server = fork_server()
        # every record holds the key, wherever its cell ran (None: not forked from a fork server)
        self.record["memory.fork_server_siblings_max"] = None
        try:
            self._sampler: SamplerProcess | None = SamplerProcess(
                os.getpid(),
                interval_s,
                nvml_ordinal=device_ordinal(device) if self._cuda else None,
                torch_uuid=self._counters.uuid() if self._counters is not None else None,
                fork_server=self.fork_server,
            )
            hello = self._sampler.hello
        except (SamplerFailed, OSError) as error:
            self._sampler, hello = None, {}
            self._sampler_error = f"unavailable: {error}"
        nvml = hello.get("nvml")
        self.nvml_available = bool(nvml and nvml["available"])
        self.record["memory.source.rss"] = (
            "resident set size of the cell's own process, DataLoader workers not included (/proc/PID/statm), "
            "sampled by a separate process"
            if self._sampler is not None
            else self._sampler_error
        )
        pss = hello.get("pss")
        if self._sampler is None:
            self.record["memory.source.pss"] = self._sampler_error
        elif pss and pss["available"]:
            self.record["memory.source.pss"] = (
                "proportional set size of the cell's process tree (the cell and its DataLoader workers): each "
                "resident page divided by the number of processes sharing it, so pages a forked worker shares "
                "with the cell count once (/proc/PID/smaps_rollup). The tree is read in full at most every "
                f"sample interval, less often when a read costs more than {pss['cpu_share']:.0%} of a core, and "
                "whenever a process joins or leaves it; between reads each process's figure follows its RSS "
                "change (statm, every sample). "
                + ("The cell was forked from the run's fork server: the figure is the cell's as its own process, "
                   "the tree's PSS plus the server's share of the pages they share (its anonymous PSS less its "
                   "private pages, and the file-backed PSS it lost since the fork: qbench.cell.measure.forked); "
                   "tree_pss_peak_bytes leaves that share out"
                   if pss.get("fork_server") else
                   "The cell was started as its own process: tree_pss_peak_bytes is the same figure")
            )
        else:
            self.record["memory.source.pss"] = f"unavailable: {pss['reason'] if pss else 'the sampler did not say'}"
        self.record["memory.source.torch_cuda"] = (
            "torch.cuda.max_memory_allocated / max_memory_reserved, reset at each phase start"
            if self._counters is not None
            else f"unavailable: device is {device}"
        )
        if nvml is None:
            self.record["memory.source.nvml"] = f"unavailable: device is {device}" if not self._cuda else self.record["memory.source.rss"]
        elif nvml["available"]:
            from qbench.cell.measure.nvml import NvmlDevice

            self.record["memory.source.nvml"] = NvmlDevice.description
            self.record.update({f"memory.nvml.device_{k}": v for k, v in nvml.items() if k != "available"})
        else:
            self.record["memory.source.nvml"] = f"unavailable: {nvml['reason']}"
        self.record["memory.nvml_available"] = self.nvml_available
        self.record["memory.torch_cuda_available"] = self._counters is not None
        self._tensor_bytes: Any = None
        self._counting = False  # from the process baseline on
        if cpu_tensor_bytes:
            self._start_tensor_bytes()

    def _start_tensor_bytes(self) -> None:
        from qbench.cell.measure import tensor_bytes

        why_not = tensor_bytes.available() if not self._cuda else f"device is {self.device} (torch's CUDA counters serve)"
        if why_not is None:
            try:
                self._tensor_bytes = tensor_bytes.CpuTensorBytes()
            except Exception as error:  # a torch whose profiler differs: the figure is missing, with why
                why_not = f"{type(error).__name__}: {error}"
        self.record["memory.source.torch_cpu"] = tensor_bytes.DESCRIPTION if why_not is None else f"unavailable: {why_not}"

    def _mark(self) -> dict[str, Any] | None:
        if self._sampler is None:
            return None
        try:
            return self._sampler.mark()
        except SamplerFailed as error:  # from here on nothing is sampled, and the record says so
            self._sampler = None
            self.record["memory.source.rss"] = f"unavailable: {error}"
            self.record["memory.source.pss"] = f"unavailable: {error}"
            if self.nvml_available:
                self.record["memory.source.nvml"] = f"unavailable: {error}"
                self.nvml_available = False
            return None

    @contextmanager
    def phase(self, name: str, process_baseline: bool = False, in_peak: bool = True) -> Iterator[None]:
        """Measure the block as phase `name`; every peak is of this phase alone. With `process_baseline`, what
        each process source reads as the phase starts is recorded as `memory.process_baseline.<source>_bytes`.
        A phase not `in_peak` (work before or after the fine-tune: an init's decomposition, a merge) keeps its
        figures under `memory.<name>.*` but out of the `memory.all_phases.*` peaks, and
        `memory.all_phases.excluded_phases` names it."""
        if not in_peak:
            self._outside_peak.append(name)
            self.record["memory.all_phases.excluded_phases"] = ",".join(self._outside_peak)
        if self._active is not None:
            raise RuntimeError(f"phase {name!r} started inside phase {self._active!r}: phases do not nest")
        if name in self._measured:
            raise ValueError(f"phase {name!r} was already measured")
        self._active = name
        self._measured.append(name)
        if self._counters is not None:
            self._counters.synchronize()
            self._counters.reset_peaks()
        start = self._mark()  # peaks from before the phase are dropped here
        if process_baseline:
            self._store_process_baseline(name, start)
            if self._tensor_bytes is not None and not self._counting:
                self._tensor_bytes.start()
                self._counting = True
        elif self._counting:
            self._tensor_bytes.flush()  # what ran since the last phase is in the sum, in no phase's peak
        started = time.perf_counter()
        try:
            yield
        finally:
            self._active = None
            torch_peaks: tuple[int | None, int | None] = (None, None)
            if self._counters is not None:
                try:
                    self._counters.synchronize()  # the peak includes the kernels still queued
                    torch_peaks = self._counters.peaks()
                except Exception as error:  # a broken CUDA context must not hide the phase's other figures
                    self.record[f"memory.{name}.torch_error"] = f"{type(error).__name__}: {error}"
            self._store(name, time.perf_counter() - started, self._mark(), torch_peaks)

    def _store_process_baseline(self, phase: str, reading: dict[str, Any] | None) -> None:
        current = (reading or {}).get("current", {})
        torch_now: tuple[int | None, int | None] = (None, None)
        if self._counters is not None and hasattr(self._counters, "current"):
            try:
                torch_now = self._counters.current()
            except Exception:  # a broken CUDA context: the figure is missing, the phase still runs
                pass
        values = {"torch_allocated_peak_bytes": torch_now[0], "torch_reserved_peak_bytes": torch_now[1]}
        values.update({key: current.get(sampled) for key, sampled in _SAMPLED.items()})
        for key in schema.PROCESS_MEMORY_SOURCES:
            self.record[schema.process_baseline_key(key)] = values.get(key)
        self.record["memory.process_baseline.at"] = f"start of phase {phase}, before the model is loaded"

    def _store(self, name: str, seconds: float, reading: dict[str, Any] | None, torch_peaks: tuple) -> None:
        prefix = f"memory.{name}."
        self.record[prefix + "sampled_s"] = seconds
        self.record[prefix + "samples"] = reading["samples"] if reading else 0
        peaks = reading["peaks"] if reading else {}
        for key, sampled in _SAMPLED.items():
            self.record[prefix + key] = peaks.get(sampled)
        self.record[prefix + "tree_processes_max"] = peaks.get("processes")
        self.record[prefix + "pss_reads"] = reading.get("pss_reads") if reading else None
        self.record[prefix + "fork_server_share_bytes"] = reading.get("fork_server_share_bytes") if reading else None
        if reading and self.fork_server:
            self.record["memory.fork_server_siblings_max"] = max(self.record.get("memory.fork_server_siblings_max") or 0,
                                                                 reading.get("fork_server_siblings_max") or 0)
        self.record[prefix + "torch_allocated_peak_bytes"], self.record[prefix + "torch_reserved_peak_bytes"] = torch_peaks
        if self.nvml_available and reading and reading["unknown_samples"].get("nvml_process_bytes"):
            self.record[prefix + "nvml_process_note"] = (
                f"{reading['unknown_samples']['nvml_process_bytes']} of {reading['samples']} samples had no "
                "per-process figure from NVML; the peak is over the others"
            )
        self.record.update(cpu_fields(name, (reading or {}).get("cpu"), self.cores))
        if self._tensor_bytes is not None:
            self._store_tensor_bytes(name)
        reserved, process_peak = torch_peaks[1], self.record[prefix + "nvml_process_peak_bytes"]
        if self.nvml_available and reserved and not process_peak:
            # torch holds device memory, yet NVML lists none of this tree's PIDs: typically a container
            # whose PIDs NVML sees under other numbers. Zero would be a lie.
            self.record[prefix + "nvml_process_peak_bytes"] = None
            self.record[prefix + "nvml_process_note"] = (
                "unavailable: torch holds device memory but NVML lists none of this process tree's PIDs "
                "(a PID namespace, e.g. a container?)"
            )
        self._update_overall()

    def _store_tensor_bytes(self, name: str) -> None:
        """memory.<phase>.torch_cpu_increase_peak_bytes (None before the process baseline: nothing counted yet)
        and memory.all_phases.torch_cpu_increase_peak_bytes, the largest of them so far."""
        key = f"memory.{name}.{TORCH_CPU_KEY}"
        try:
            self.record[key] = self._tensor_bytes.flush() if self._counting else None
        except Exception as error:  # the profiler failed mid-run: no figure from here on, and why
            self._counting, self._tensor_bytes = False, None
            self.record[key] = None
            self.record["memory.source.torch_cpu"] = f"unavailable: {type(error).__name__}: {error}"
            return
        values = [v for k, v in self.record.items() if k.endswith("." + TORCH_CPU_KEY) and v is not None]
        self.record[TORCH_CPU_PEAK] = max(values) if values else None

    def _update_overall(self) -> None:
        """memory.all_phases.<source>_peak_bytes: the largest figure of that source over every phase measured so far."""
        for key in PHASE_SOURCES:
            values = [v for phase in self._measured if phase not in self._outside_peak
                      and (v := self.record.get(f"memory.{phase}.{key}")) is not None]
            self.record[schema.overall_peak_key(key)] = max(values) if values else None

    def close(self) -> None:
        if self._counting:
            self._counting = False
            try:
                self._tensor_bytes.stop()
            except Exception:  # the record is being finished: a profiler that will not stop must not end it
                pass
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None
