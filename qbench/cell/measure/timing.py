"""Step timing: warm-up steps left out, CUDA synchronised before the clock is read; the process's CPU time
beside the wall time (a step that waited for a core on a busy machine takes longer, not more CPU); and
how a cell's wall time splits into its parts."""

from __future__ import annotations

import statistics
import time
from typing import Any


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (the 'inclusive' method numpy uses by default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class StepTimer:
    """Times optimizer steps; the first `untimed_steps` are warm-up and not timed.

    Throughput is samples over the wall seconds from the start of the first timed step to the end
    of the last one, not samples over mean step latency. The same over the process's CPU seconds
    (`time.process_time`: every thread of this process, not its child processes) is what a busy
    machine changes least: a step that waits for a core takes longer but no more CPU.
    """

    def __init__(self, untimed_steps: int, cuda: bool = False):
        self.untimed_steps = untimed_steps
        self._cuda = cuda
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []
        self.samples = 0
        self.tokens = 0
        self._steps_seen = 0
        self._first_start: float | None = None
        self._last_end: float | None = None
        self._start: float | None = None
        self._first_cpu_start: float | None = None
        self._last_cpu_end: float | None = None
        self._cpu_start: float | None = None

    def _now(self) -> float:
        if self._cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self._start = self._now()
        self._cpu_start = time.process_time()

    def stop(self, samples: int, tokens: int) -> None:
        end = self._now()
        cpu_end = time.process_time()
        self._steps_seen += 1
        if self._steps_seen <= self.untimed_steps:
            return
        if self._first_start is None:
            self._first_start, self._first_cpu_start = self._start, self._cpu_start
        self._last_end, self._last_cpu_end = end, cpu_end
        self.step_seconds.append(end - self._start)
        self.step_cpu_seconds.append(cpu_end - self._cpu_start)
        self.samples += samples
        self.tokens += tokens

    def summary(self) -> dict[str, Any]:
        timed = len(self.step_seconds)
        wall = (self._last_end - self._first_start) if timed else None
        cpu = (self._last_cpu_end - self._first_cpu_start) if timed else None
        return {
            "speed.untimed_steps": self.untimed_steps,
            "speed.timed_steps": timed,
            "speed.timed_wall_s": wall,
            "speed.timed_cpu_s": cpu,
            "speed.train_samples_per_s": self.samples / wall if wall else None,
            "speed.train_tokens_per_s": self.tokens / wall if wall else None,
            "speed.train_samples_per_cpu_s": self.samples / cpu if cpu else None,
            "speed.train_tokens_per_cpu_s": self.tokens / cpu if cpu else None,
            "speed.step_time_p50_s": statistics.median(self.step_seconds) if timed else None,
            "speed.step_time_p90_s": _quantile(self.step_seconds, 0.9) if timed else None,
            "speed.step_time_mean_s": statistics.fmean(self.step_seconds) if timed else None,
            "speed.step_cpu_time_p50_s": statistics.median(self.step_cpu_seconds) if timed else None,
        }


def wall_split(record: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """`time.cell.wall_s` and `time.other.wall_s`: the wall time of a cell's process (launch to exit, measured by
    the runner) and what its parts (`time.<part>.wall_s`, schema.TIME_PARTS, measured by the cell) leave of it:
    the launch, the environment and sampler start, checkpoints of the record, the process's exit.
    The parts and `other` sum to the wall time; a sum of parts above it (clocks disagreeing by more
    than 50 ms) leaves `other` None with the reason beside it (`time.other.note`)."""
    from qbench.contract.schema import TIME_PARTS, time_key

    measured = sum(v for p in TIME_PARTS if isinstance(v := record.get(time_key(p)), (int, float)))
    other = wall_s - measured
    fields: dict[str, Any] = {time_key("cell"): wall_s, time_key("other"): max(other, 0.0) if other > -0.05 else None}
    if fields[time_key("other")] is None:
        fields["time.other.note"] = f"the parts sum to {measured:.2f} s, more than the {wall_s:.2f} s wall time"
    return fields
