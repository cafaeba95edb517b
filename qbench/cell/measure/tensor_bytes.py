"""Bytes held by torch tensors on the CPU, to the byte: the CPU's counterpart of torch.cuda.max_memory_allocated.

torch keeps no allocation statistics for the CPU, but its CPU allocator reports every allocation and free to
the profiler when the profiler asks for memory events. `CpuTensorBytes` runs the profiler with memory events
only (no operator is recorded, so the overhead is one event per allocation) and sums the events in order:
the running sum is how many bytes tensors hold above what they held when counting began, its maximum is the
peak. The figure is deterministic (the same cell gives the same bytes every time), which RSS and PSS on a CPU
are not: the allocator's caches, the runtime's own growth and pages shared with other processes move them
by megabytes.

What it counts: every allocation through torch's CPU allocator in the threads the profiler follows (the
thread that enables it and the threads torch hands its work to: intra-op workers, the autograd engine).
What it does not: memory outside torch (the interpreter, libraries, tokenizers), allocations in Python
threads the program starts itself (the cell loads weights sequentially, HF_DEACTIVATE_ASYNC_LOAD=1, so that
transformers' loading threads allocate nothing it misses), and DataLoader worker processes.
"""

from __future__ import annotations

DESCRIPTION = (
    "bytes held by torch tensors on the CPU above what they held at the process baseline: every allocation and "
    "free of torch's CPU allocator in the cell's thread and the threads torch hands work to, read from the "
    "profiler's memory events (no operator recorded), summed in order; the peak of that sum per phase. Memory "
    "outside torch's allocator (interpreter, libraries, allocator caches) is not in it"
)


class CpuTensorBytes:
    """Counts from `start()` to `stop()`; each `flush()` returns the highest running sum since the previous one
    (bytes above the start of counting), so a phase's peak is the flush at its end, taken after a flush at its
    start: what runs between phases (qbench's own read-backs) stays in the running sum but in no phase's peak."""

    def __init__(self) -> None:
        import torch  # noqa: F401  (the profiler API below is torch's)
        from torch._C._profiler import ProfilerActivity, ProfilerConfig, ProfilerState, RecordScope, _ExperimentalConfig

        # memory events only: with USER_SCOPE alone no ATen operator is recorded
        self._config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
        self._activities = {ProfilerActivity.CPU}
        self._scopes = {RecordScope.USER_SCOPE}
        self.current = 0  # bytes above the start of counting
        self.events = 0  # allocations and frees counted, in all
        self._on = False

    def start(self) -> None:
        from torch.autograd.profiler import _enable_profiler, _prepare_profiler

        _prepare_profiler(self._config, self._activities)
        _enable_profiler(self._config, self._activities, self._scopes)
        self._on = True

    def flush(self) -> int:
        """The highest running sum since the last flush (counting goes on)."""
        sizes = self._stop()
        self.start()
        return self._add(sizes)

    def stop(self) -> None:
        if self._on:
            self._add(self._stop())

    def _stop(self) -> list[int]:
        from torch._C._autograd import DeviceType
        from torch.autograd.profiler import _disable_profiler

        self._on = False
        events = _disable_profiler().events()
        memory = (e for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
        return [e.nbytes() for e in sorted(memory, key=lambda e: e.start_ns())]

    def _add(self, sizes: list[int]) -> int:
        running = peak = self.current
        for size in sizes:
            running += size
            peak = max(peak, running)
        self.current = running
        self.events += len(sizes)
        return peak


def available() -> str | None:
    """None when the profiler's memory events can be read here, else why not (an older or newer torch)."""
    try:
        from torch._C._profiler import ProfilerConfig, RecordScope, _ExperimentalConfig  # noqa: F401
        from torch.autograd.profiler import _disable_profiler, _enable_profiler, _prepare_profiler  # noqa: F401
    except ImportError as error:
        return f"this torch has no profiler memory events ({error})"
    return None
