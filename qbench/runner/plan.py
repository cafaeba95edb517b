"""What one `qbench run` will do, decided before anything runs: the cells (after --only, --where, --seeds
and --shard), where they run (device slots from --gpus, or Ray with --executor ray), and what run.json
records about that choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbench.contract import grid
from qbench.contract.suite import LIMITS, Cell, LoadedSuite, SuiteError
from qbench.machine import threads as threads_module
from qbench.machine.threads import ThreadPlan
from qbench.runner import scheduler
from qbench.runner.scheduler import LOCAL_SLOT, Slot

COMMAND_LINE = "command line"
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class RunPlan:
    loaded: LoadedSuite
    cells: list[Cell]
    matrix_cells: int  # before sharding
    slots: list[Slot] | None = None  # None: one cell at a time on this machine's device
    shard: tuple[int, int] | None = None
    gpus: list[str] | None = None
    gpus_per_cell: float | None = None
    executor: str = "local"  # local: this machine (--gpus slots); ray: one Ray task per cell
    ray_address: str | None = None
    cpus_per_cell: float = 1.0  # with Ray: the CPUs each cell's task asks for
    where: dict[str, tuple[Any, ...]] | None = None  # --where (and --only as precision), as applied
    threads: ThreadPlan | None = None  # torch threads per cell
    launcher: str = "auto"  # auto | forkserver | subprocess (qbench.runner.start)
    parallel: int = 1  # cells side by side on this machine's CPU (--parallel)

    @property
    def label(self) -> str:
        """Part of the run folder's name: `shard1of2` for a shard, else nothing."""
        return f"shard{self.shard[0]}of{self.shard[1]}" if self.shard else ""

    def run_slots(self) -> list[Slot]:
        return self.slots or [LOCAL_SLOT]

    @property
    def on_gpus(self) -> bool:
        return bool(self.gpus)

    def manifest_extras(self) -> dict[str, Any]:
        return {
            "shard": f"{self.shard[0]}/{self.shard[1]}" if self.shard else None,
            "matrix_cells": self.matrix_cells,
            "gpus": self.gpus,
            "gpus_per_cell": self.gpus_per_cell if self.gpus or self.executor == "ray" else None,
            "executor": self.executor,
            **({"where": {name: list(values) for name, values in self.where.items()}} if self.where else {}),
            "parallel": self.parallel,
            "threads_per_cell": self.threads.per_cell if self.threads else None,
            "threads_source": self.threads.source if self.threads else None,
        }


def placement(loaded: LoadedSuite, gpus: str | None, gpus_per_cell: float, device: str, shard: str | None,
              executor: str = "local", ray_address: str | None = None,
              cpus_per_cell: float | None = None, parallel: int = 1) -> tuple[list[Slot] | None, tuple[int, int] | None]:
    """Device slots from --gpus / --gpus-per-cell / --parallel and the shard from --shard, checked against
    --executor; SuiteError when they are wrong."""
    problems = []
    slots = parsed_shard = None
    try:
        if parallel != 1:
            if parallel < 1:
                problems.append(f"--parallel must be at least 1 (got {parallel})")
            elif executor == "ray":
                problems.append("--parallel runs cells side by side on this machine's CPU; on Ray, Ray places them")
            elif gpus:
                problems.append("--parallel runs cells side by side on the CPU; with --gpus list a GPU twice instead (--gpus 0,0)")
            elif device == "cuda":
                problems.append("--parallel runs cells side by side on the CPU; it cannot be combined with --device cuda")
            else:
                slots = [Slot(f"cpu {i + 1}") for i in range(parallel)]
        if executor == "ray":
            problems += _ray_problems(gpus, gpus_per_cell, device, cpus_per_cell)
        else:
            problems += [f"{flag} goes with --executor ray" for flag, given in
                         (("--ray-address", ray_address is not None), ("--cpus-per-cell", cpus_per_cell is not None)) if given]
            if gpus_per_cell != int(gpus_per_cell) or gpus_per_cell < 1:
                problems.append(f"--gpus-per-cell {gpus_per_cell:g}: a share of a GPU needs --executor ray; on this "
                                "machine list a GPU twice to run two cells on it (--gpus 0,0)")
            elif gpus is not None:  # --gpus "" (an unset variable) is an empty list, not no --gpus
                slots = scheduler.gpu_slots(scheduler.parse_gpus(gpus), int(gpus_per_cell))
                if device == "cpu":
                    problems.append("--gpus runs cells on GPUs; it cannot be combined with --device cpu")
            elif gpus_per_cell != 1:
                problems.append("--gpus-per-cell needs --gpus (or --executor ray)")
        if gpus_per_cell > 1 and loaded.suite.model.device_map != "auto" and not problems:
            problems.append(
                f"--gpus-per-cell {gpus_per_cell:g}: a cell only spreads over several GPUs with "
                'model.device_map = "auto" in the suite'
            )
        if shard is not None:
            parsed_shard = scheduler.parse_shard(shard)
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise SuiteError(COMMAND_LINE, problems)
    return slots, parsed_shard


def _ray_problems(gpus: str | None, gpus_per_cell: float, device: str, cpus_per_cell: float | None) -> list[str]:
    """What is wrong with the placement options of a run on Ray (Ray picks the GPUs; a cell asks for
    a whole number of them, or a share of one)."""
    problems = []
    if gpus:
        problems.append("--gpus picks GPUs of this machine; on Ray, Ray gives each cell its GPUs (--gpus-per-cell N)")
    if not gpus_per_cell > 0 or (gpus_per_cell > 1 and gpus_per_cell != int(gpus_per_cell)):
        problems.append(f"--gpus-per-cell {gpus_per_cell:g}: a whole number of GPUs, or a share of one (0.5: two cells per GPU)")
    elif device == "cpu" and gpus_per_cell != 1:
        problems.append("--gpus-per-cell: cells on --device cpu take no GPU")
    if cpus_per_cell is not None and not cpus_per_cell > 0:
        problems.append(f"--cpus-per-cell {cpus_per_cell:g}: must be more than 0")
    return problems


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds 0,1,2`; SuiteError naming the option when they are not distinct integers from 0 to 2**32-1."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise SuiteError(COMMAND_LINE, [f"--seeds: {text!r} is not a comma-separated list of integers"]) from None
    if len(set(seeds)) != len(seeds) or not all(0 <= s < 2**32 for s in seeds):
        raise SuiteError(COMMAND_LINE, [f"--seeds: {text!r} must be distinct integers from 0 to 2**32-1"])
    limit, reason = LIMITS["matrix.seeds"]
    if len(seeds) > limit:
        raise SuiteError(COMMAND_LINE, [f"--seeds: no more than {limit:,} seeds: {reason}"])
    return seeds


def parse_where(conditions: list[str] | tuple[str, ...], loaded: LoadedSuite,
                seeds: tuple[int, ...] | None = None) -> dict[str, tuple[Any, ...]]:
    """`--where AXIS=V1[,V2...]` (repeatable) -> axis name -> allowed values; SuiteError naming the option
    when an axis is unknown or a value is not one of the grid's (qbench.contract.grid)."""
    grid_values = grid.values(loaded.suite, seeds)
    where: dict[str, tuple[Any, ...]] = {}
    problems = []
    for condition in conditions:
        name, sep, listed = condition.partition("=")
        try:
            if not sep or not name.strip() or not listed.strip():
                raise ValueError(f"expected AXIS=VALUE[,VALUE...] such as optimizer=adamw8bit (got {condition!r})")
            axis = grid.axis_named(name.strip())
            wanted = tuple(axis.parse(text) for text in listed.split(","))
        except ValueError as error:
            problems.append(f"--where: {error}")
            continue
        known = grid_values[axis.name]
        missing = [v for v in wanted if not any(v == k and type(v) is type(k) for k in known)]
        if missing:
            shown = ", ".join(axis.id_part(v) if axis.kind is bool else str(v) for v in known)
            problems.append(f"--where {condition}: {', '.join(map(str, missing))} not among the grid's {axis.name} values ({shown})")
            continue
        earlier = where.get(axis.name)
        where[axis.name] = tuple(v for v in wanted if earlier is None or v in earlier)
    if problems:
        raise SuiteError(COMMAND_LINE, problems)
    return where


def parse_only(text: str, loaded: LoadedSuite) -> tuple[str, ...]:
    """`--only bf16,nf4-dq`; SuiteError when the list is empty (an unset variable must not mean "all"), has an
    empty entry, or names a precision outside the suite's matrix."""
    names = tuple(part.strip() for part in text.split(","))
    if not text.strip():
        raise SuiteError(COMMAND_LINE, [f"--only: an empty list of precisions (got {text!r}); name at least one of the "
                                        "matrix, or leave --only out to run every one"])
    if not all(names):
        raise SuiteError(COMMAND_LINE, [f"--only: an empty name in {text!r}"])
    unknown = [p for p in names if p not in loaded.suite.matrix.precisions]
    if unknown:
        raise SuiteError(loaded.path, [
            f"--only: {', '.join(map(repr, unknown))} not in matrix.precisions ({', '.join(loaded.suite.matrix.precisions)})"
        ])
    return names


def make(loaded: LoadedSuite, only: str | None = None, seeds: str | None = None, shard: str | None = None,
         gpus: str | None = None, gpus_per_cell: float = 1, device: str = "auto", executor: str = "local",
         ray_address: str | None = None, cpus_per_cell: float | None = None,
         where: list[str] | tuple[str, ...] = (), threads: int | None = None, parallel: int = 1,
         launcher: str = "auto") -> RunPlan:
    """The plan for the command line's options; SuiteError (one line per problem) when they are wrong."""
    if threads is not None and not 1 <= threads <= 1024:
        raise SuiteError(COMMAND_LINE, [f"--threads must be between 1 and 1024 (got {threads})"])
    if launcher == "forkserver" and (executor == "ray" or gpus is not None or device.startswith("cuda")):
        where = "on Ray each cell is its own task's process" if executor == "ray" else "a fork server cannot fork cells that use CUDA"
        raise SuiteError(COMMAND_LINE, [f"--launcher forkserver: {where}; leave --launcher out (auto)"])
    chosen = parse_only(only, loaded) if only is not None else None
    seed_list = parse_seeds(seeds) if seeds is not None else None
    conditions = parse_where(where, loaded, seed_list)
    slots, parsed_shard = placement(loaded, gpus, gpus_per_cell, device, shard, executor, ray_address, cpus_per_cell,
                                    parallel)
    cells = loaded.cells(chosen, seed_list, conditions)
    if not cells and (conditions or chosen):
        raise SuiteError(COMMAND_LINE, ["--only/--where: no cell of the grid has every value asked for"])
    matrix_cells = len(cells)
    if parsed_shard:
        cells = scheduler.shard_cells(cells, *parsed_shard)
    if slots and gpus is None and len(slots) > max(1, len(cells)):  # --parallel beyond the cells: no more side by side
        slots = slots[:max(1, len(cells))]
        parallel = len(slots)
    if executor == "ray":  # a cell's threads default to the CPUs its Ray task asks for
        thread_plan = threads_module.plan(threads, loaded.suite.threads, 1, cores=max(1, int(cpus_per_cell or 1)))
    else:
        thread_plan = threads_module.plan(threads, loaded.suite.threads, len(slots) if slots else 1)
    return RunPlan(loaded, cells, matrix_cells, slots, parsed_shard, scheduler.parse_gpus(gpus) if gpus is not None else None,
                   gpus_per_cell, executor, ray_address, cpus_per_cell or 1.0, conditions, thread_plan, launcher, parallel)
