"""Step timing: warm-up steps left out, CUDA synchronised before the clock is read; the process's CPU time
beside the wall time (a step that waited for a core on a busy machine takes longer, not more CPU); the
step's unqueued time (its wall time less the time its thread waited in the run queue for a core, which
sees a step that sleeps or waits as well as one that computes); and how a cell's wall time splits into
its parts."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

# the most points a record's list of step times holds (past it, the mean of each run of consecutive steps)
STEP_TIMES_POINTS = 500
# this thread's scheduler statistics: time on a core, time waiting in the run queue for one (ns), time slices
SCHEDSTAT = "/proc/thread-self/schedstat"
NO_SCHEDSTAT = ("no per-thread scheduler statistics (/proc/thread-self/schedstat): the time a step waited for a core "
                "cannot be told from its own")


def queue_wait_s() -> float | None:
    """Seconds the calling thread has waited in the run queue for a core since it started; None where the
    kernel does not say (another system, or a kernel without scheduler statistics)."""
    try:
        with open(SCHEDSTAT, "rb") as handle:
            return int(handle.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def every_point(values: list[float], points: int = STEP_TIMES_POINTS) -> tuple[list[float], int]:
    """(the values, values per point): each value while there are at most `points`, else the mean of each run
    of `ceil(len / points)` consecutive values (the last run may be shorter)."""
    every = max(1, math.ceil(len(values) / points))
    if every == 1:
        return list(values), 1
    return [math.fsum(values[i:i + every]) / len(values[i:i + every]) for i in range(0, len(values), every)], every


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
    machine changes least: a step that waits for a core takes longer but no more CPU. A step's unqueued
    time is its wall time less the time the training thread waited in the run queue for a core
    (`queue_wait_s`): like CPU time it leaves out the machine's load, like wall time it counts a step that
    sleeps or waits on something (a lock, a file, the GPU). `qbench gate` judges speed by it.
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
        self.step_unqueued_seconds: list[float] = []
        self.queue_wait = 0.0
        self._queue_start: float | None = None

    def _now(self) -> float:
        if self._cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self._start = self._now()
        self._cpu_start = time.process_time()
        self._queue_start = queue_wait_s()

    def stop(self, samples: int, tokens: int) -> None:
        end = self._now()
        cpu_end = time.process_time()
        queue_end = queue_wait_s()
        self._steps_seen += 1
        if self._steps_seen <= self.untimed_steps:
            return
        if self._first_start is None:
            self._first_start, self._first_cpu_start = self._start, self._cpu_start
        self._last_end, self._last_cpu_end = end, cpu_end
        self.step_seconds.append(end - self._start)
        self.step_cpu_seconds.append(cpu_end - self._cpu_start)
        if queue_end is not None and self._queue_start is not None:
            waited = queue_end - self._queue_start
            self.queue_wait += waited
            self.step_unqueued_seconds.append(max(0.0, end - self._start - waited))
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
            **self._unqueued(timed),
        }

    def _unqueued(self, timed: int) -> dict[str, Any]:
        """`speed.step_unqueued_*`: each timed step's unqueued time, their median, the queue wait they left out;
        all None with the reason where the kernel gives no scheduler statistics."""
        if not timed:
            return {}
        if len(self.step_unqueued_seconds) != timed:
            return {"speed.step_unqueued_time_p50_s": None, "speed.step_unqueued_times_s": None,
                    "speed.timed_queue_wait_s": None, "speed.queue_wait_absent_reason": NO_SCHEDSTAT}
        times, every = every_point(self.step_unqueued_seconds)
        return {
            "speed.step_unqueued_time_p50_s": statistics.median(self.step_unqueued_seconds),
            "speed.step_unqueued_times_s": times,
            "speed.step_unqueued_times_every_steps": every,
            "speed.timed_queue_wait_s": self.queue_wait,
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
