"""How many torch threads each cell computes with, how its OpenMP threads wait for each other, where those
settings came from, and whether other work on the machine leaves the cores for them.

On a CPU the threads are the work. OpenMP threads that spin while they wait for each other (the runtime's
default: a spin of up to ~300,000 turns before sleeping, every parallel region) spend a busy machine's
time slices spinning. With
OMP_WAIT_POLICY=PASSIVE a waiting thread sleeps at once and gives its core to the thread it waits for, so
the same cell keeps its fair share (benchmarks/test_threads_under_load.py measures both). The policy must
be in the environment before the OpenMP runtime loads (with torch), so it goes into the environment of
every child that imports torch: the fork server and each subprocess cell. The thread count stays the
cores: a process's share of a busy CPU grows with its runnable threads, and two passive threads beat one
there too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from qbench.machine.cpuinfo import machine_cpu_seconds

# GNU OpenMP (torch's Linux wheels) and LLVM/Intel OpenMP both read OMP_WAIT_POLICY; Intel's also KMP_BLOCKTIME
PASSIVE_WAITING = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
WAIT_POLICY_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def available_cores() -> int:
    """Cores this process may run on (its affinity mask; a container's CPU set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def wait_policy(environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], str]:
    """(the OpenMP waiting settings a cell gets, where they came from): the user's own OMP_WAIT_POLICY /
    GOMP_SPINCOUNT / KMP_BLOCKTIME when any is set, else passive waiting."""
    environ = os.environ if environ is None else environ
    own = {key: environ[key] for key in WAIT_POLICY_KEYS if environ.get(key, "").strip()}
    if own:
        return own, "the environment"
    return dict(PASSIVE_WAITING), "default"


@dataclass(frozen=True)
class ThreadPlan:
    per_cell: int  # torch intra-op threads of each cell
    source: str  # where the number came from, for the record and the header line
    cores: int  # cores available to the run
    side_by_side: int  # cells that run at the same time on this machine
    waiting: dict[str, str] = field(default_factory=lambda: dict(PASSIVE_WAITING))  # OpenMP wait settings
    waiting_source: str = "default"

    def header(self) -> str:
        cells = "1 cell at a time" if self.side_by_side == 1 else f"{self.side_by_side} cells side by side"
        return (f"{self.per_cell} torch thread{'s' if self.per_cell != 1 else ''} per cell ({self.source}; "
                f"{self.cores} cores, {cells}; {self.waiting_text()})")

    def waiting_text(self) -> str:
        """How the OpenMP threads wait, as the header and the record say it."""
        shown = " ".join(f"{k}={v}" for k, v in self.waiting.items())
        return f"{shown} ({self.waiting_source})" if shown else "the OpenMP runtime's own waiting"

    def env(self) -> dict[str, str]:
        """What a cell's environment needs for these threads (before torch loads its OpenMP runtime)."""
        return {"OMP_NUM_THREADS": str(self.per_cell), **self.waiting}

    def record_fields(self) -> dict[str, object]:
        return {"env.threads_source": self.source, "env.cells_side_by_side": self.side_by_side,
                "env.omp_wait_policy": self.waiting_text()}


def plan(command_line: int | None = None, suite: int | None = None, side_by_side: int = 1,
         environ: Mapping[str, str] | None = None, cores: int | None = None) -> ThreadPlan:
    """Threads per cell: `--threads`, else the suite's `threads`, else OMP_NUM_THREADS, else the cores divided
    among the cells that run side by side (all of them for one cell at a time); waiting as `wait_policy` says."""
    environ = os.environ if environ is None else environ
    cores = cores or available_cores()
    side_by_side = max(1, side_by_side)
    waiting, waiting_source = wait_policy(environ)

    def made(per_cell: int, source: str) -> ThreadPlan:
        return ThreadPlan(per_cell, source, cores, side_by_side, waiting, waiting_source)

    if command_line is not None:
        return made(command_line, "--threads")
    if suite is not None:
        return made(suite, "the suite's threads")
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return made(int(omp), "OMP_NUM_THREADS")
    return made(max(1, cores // side_by_side), "default: the cores divided among the cells run at once")


def _process_cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and its reaped children (0 when it is gone)."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.Error, OSError):
        return 0.0
    return times.user + times.system + times.children_user + times.children_system


@dataclass(frozen=True)
class BusyWindow:
    """How many cores everything but qbench's own processes kept busy between `start()` and `others_cores()`:
    the machine's busy CPU seconds (/proc/stat) less those of our processes, over the wall time."""

    started: float
    machine_busy_s: float
    own_s: float

    @classmethod
    def start(cls, own_pids: Iterable[int]) -> BusyWindow | None:
        machine = machine_cpu_seconds()
        if machine is None:
            return None
        return cls(time.monotonic(), machine["busy_s"], sum(_process_cpu_s(p) for p in own_pids))

    def others_cores(self, own_pids: Iterable[int], min_window_s: float = 0.5) -> float | None:
        """Cores the rest of the machine kept busy on average since `start()`; None over less than `min_window_s`."""
        machine, elapsed = machine_cpu_seconds(), time.monotonic() - self.started
        if machine is None or elapsed < min_window_s:
            return None
        own = sum(_process_cpu_s(p) for p in own_pids) - self.own_s
        return max(0.0, (machine["busy_s"] - self.machine_busy_s - own) / elapsed)


def oversubscription(threads: ThreadPlan, others_busy_cores: float | None = None) -> str | None:
    """A warning when the run's threads and what else runs on the machine want more than its cores.

    `others_busy_cores`: the cores other processes kept busy just before the cells (BusyWindow); the 1-minute
    load average when not measured (it counts this run's own start-up too, so it is only a fallback)."""
    measured = others_busy_cores is not None
    if not measured:
        try:
            others_busy_cores = os.getloadavg()[0]
        except OSError:
            return None
    wanted = threads.per_cell * threads.side_by_side
    if others_busy_cores + wanted <= threads.cores + 0.5:
        return None
    seen = (f"other processes kept {others_busy_cores:.1f} of {threads.cores} cores busy as the run started"
            if measured else f"load average {others_busy_cores:.1f} on {threads.cores} cores before the run")
    spinning = threads.waiting.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE"
    advice = ("; OMP_WAIT_POLICY=ACTIVE makes waiting threads spin on cores others need (leave it unset: cells "
              "wait passively)") if spinning and threads.per_cell > 1 else ""
    return (
        f"the CPU is oversubscribed: {seen}, and the run adds {wanted} thread{'s' if wanted != 1 else ''}; steps "
        f"will wait for a core, so wall-clock speed will be noisy (records flag contended cells; compare judges "
        f"speed by CPU time on a CPU){advice}"
    )
