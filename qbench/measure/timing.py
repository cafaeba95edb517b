"""Step timing: warm-up steps left out, CUDA synchronised before the clock is read."""

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
    of the last one, not samples over mean step latency.
    """

    def __init__(self, untimed_steps: int, cuda: bool = False):
        self.untimed_steps = untimed_steps
        self._cuda = cuda
        self.step_seconds: list[float] = []
        self.samples = 0
        self.tokens = 0
        self._steps_seen = 0
        self._first_start: float | None = None
        self._last_end: float | None = None
        self._start: float | None = None

    def _now(self) -> float:
        if self._cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self._start = self._now()

    def stop(self, samples: int, tokens: int) -> None:
        end = self._now()
        self._steps_seen += 1
        if self._steps_seen <= self.untimed_steps:
            return
        if self._first_start is None:
            self._first_start = self._start
        self._last_end = end
        self.step_seconds.append(end - self._start)
        self.samples += samples
        self.tokens += tokens

    def summary(self) -> dict[str, Any]:
        timed = len(self.step_seconds)
        wall = (self._last_end - self._first_start) if timed else None
        return {
            "speed.untimed_steps": self.untimed_steps,
            "speed.timed_steps": timed,
            "speed.timed_wall_s": wall,
            "speed.train_samples_per_s": self.samples / wall if wall else None,
            "speed.train_tokens_per_s": self.tokens / wall if wall else None,
            "speed.step_time_p50_s": statistics.median(self.step_seconds) if timed else None,
            "speed.step_time_p90_s": _quantile(self.step_seconds, 0.9) if timed else None,
            "speed.step_time_mean_s": statistics.fmean(self.step_seconds) if timed else None,
        }
