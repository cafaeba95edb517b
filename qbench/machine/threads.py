"""How many torch threads each cell computes with, where that number came from, and whether the machine
has the cores for it.

On a CPU the threads are the work: an OpenMP thread that finds a peer descheduled spins waiting for it, so
with more threads than free cores a step's time is mostly scheduling. The number is a setting, recorded in
every record (`env.torch_threads`, `env.threads_source`), and the run warns when the machine's load says the
cores are already taken.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


def available_cores() -> int:
    """Cores this process may run on (its affinity mask; a container's CPU set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadPlan:
    per_cell: int  # torch intra-op threads of each cell
    source: str  # where the number came from, for the record and the header line
    cores: int  # cores available to the run
    side_by_side: int  # cells that run at the same time on this machine

    def header(self) -> str:
        cells = "1 cell at a time" if self.side_by_side == 1 else f"{self.side_by_side} cells side by side"
        return f"{self.per_cell} torch thread{'s' if self.per_cell != 1 else ''} per cell ({self.source}; {self.cores} cores, {cells})"

    def record_fields(self) -> dict[str, object]:
        return {"env.threads_source": self.source, "env.cells_side_by_side": self.side_by_side}


def plan(command_line: int | None = None, suite: int | None = None, side_by_side: int = 1,
         environ: Mapping[str, str] | None = None, cores: int | None = None) -> ThreadPlan:
    """Threads per cell: `--threads`, else the suite's `threads`, else OMP_NUM_THREADS, else the cores divided
    among the cells that run side by side (all of them for one cell at a time)."""
    environ = os.environ if environ is None else environ
    cores = cores or available_cores()
    side_by_side = max(1, side_by_side)
    if command_line is not None:
        return ThreadPlan(command_line, "--threads", cores, side_by_side)
    if suite is not None:
        return ThreadPlan(suite, "the suite's threads", cores, side_by_side)
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return ThreadPlan(int(omp), "OMP_NUM_THREADS", cores, side_by_side)
    return ThreadPlan(max(1, cores // side_by_side), "default: the cores divided among the cells run at once", cores, side_by_side)


def oversubscription(threads: ThreadPlan, load_average: float | None = None) -> str | None:
    """A warning when the run's threads and what already runs on the machine want more than its cores.

    `load_average`: the machine's 1-minute load average before the run (os.getloadavg() when None)."""
    if load_average is None:
        try:
            load_average = os.getloadavg()[0]
        except OSError:
            return None
    wanted = threads.per_cell * threads.side_by_side
    if load_average + wanted <= threads.cores + 0.5:
        return None
    advice = "; fewer threads (--threads 1) waste less time spinning for each other" if threads.per_cell > 1 else ""
    return (
        f"the CPU is oversubscribed: load average {load_average:.1f} on {threads.cores} cores before the run, "
        f"and it adds {wanted} thread{'s' if wanted != 1 else ''}; steps will wait for a core, so wall-clock "
        f"speed will be noisy (records flag contended cells; compare judges speed by CPU time on a CPU){advice}"
    )
