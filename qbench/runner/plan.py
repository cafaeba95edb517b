"""What one `qbench run` will do, decided before anything runs: the cells (after --only, --where, --seeds
and --shard), where they run (the executor, and this machine's slots from --gpus or --parallel), and what
run.json records about that choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qbench.contract import grid
from qbench.contract.suite import LIMITS, Cell, LoadedSuite, SuiteError
from qbench.machine import threads as threads_module
from qbench.machine.threads import ThreadPlan
from qbench.runner import scheduler
from qbench.runner.scheduler import LOCAL_SLOT, Slot

if TYPE_CHECKING:
    from qbench.runner.executors.base import Executor

COMMAND_LINE = "command line"


@dataclass(frozen=True)
class RunPlan:
    loaded: LoadedSuite
    cells: list[Cell]
    matrix_cells: int  # before sharding
    slots: list[Slot] | None = None  # None: one cell at a time on this machine's device
    shard: tuple[int, int] | None = None
    gpus: list[str] | None = None
    gpus_per_cell: float | None = None
    executor: Executor | None = None  # where the cells run (qbench.runner.executors)
    where: dict[str, tuple[Any, ...]] | None = None  # --where (and --only as precision), as applied
    threads: ThreadPlan | None = None  # torch threads per cell
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
            "gpus_per_cell": self.gpus_per_cell if self.gpus or (self.executor and self.executor.places_cells) else None,
            "executor": self.executor.name if self.executor else None,
            **({"where": {name: list(values) for name, values in self.where.items()}} if self.where else {}),
            "parallel": self.parallel,
            "threads_per_cell": self.threads.per_cell if self.threads else None,
            "threads_source": self.threads.source if self.threads else None,
        }


def placement(loaded: LoadedSuite, gpus: str | None, gpus_per_cell: float, device: str, shard: str | None,
              executor: Executor, parallel: int = 1) -> tuple[list[Slot] | None, tuple[int, int] | None]:
    """This machine's slots from --gpus / --gpus-per-cell / --parallel and the shard from --shard, checked
    against the executor; SuiteError when they are wrong."""
    problems = []
    slots = parsed_shard = None
    try:
        if parallel < 1:
            problems.append(f"--parallel must be at least 1 (got {parallel})")
        listed = scheduler.parse_gpus(gpus) if gpus is not None and not executor.places_cells else None
        problems += executor.placement_problems(gpus, gpus_per_cell, device, parallel)
        if not problems:
            if listed is not None:
                slots = scheduler.gpu_slots(listed, int(gpus_per_cell))
            elif parallel > 1:  # cells side by side (on this machine, or jobs in flight at once)
                slots = [Slot(f"cpu {i + 1}") for i in range(parallel)]
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
         gpus: str | None = None, gpus_per_cell: float = 1, device: str = "auto", executor: str | Executor = "local",
         where: list[str] | tuple[str, ...] = (), threads: int | None = None, parallel: int = 1) -> RunPlan:
    """The plan for the command line's options; SuiteError (one line per problem) when they are wrong."""
    from qbench.runner import executors

    if isinstance(executor, str):
        executor = executors.create(executor)
    if threads is not None and not 1 <= threads <= 1024:
        raise SuiteError(COMMAND_LINE, [f"--threads must be between 1 and 1024 (got {threads})"])
    chosen = parse_only(only, loaded) if only is not None else None
    seed_list = parse_seeds(seeds) if seeds is not None else None
    conditions = parse_where(where, loaded, seed_list)
    slots, parsed_shard = placement(loaded, gpus, gpus_per_cell, device, shard, executor, parallel)
    cells = loaded.cells(chosen, seed_list, conditions)
    if not cells and (conditions or chosen):
        raise SuiteError(COMMAND_LINE, ["--only/--where: no cell of the grid has every value asked for"])
    matrix_cells = len(cells)
    if parsed_shard:
        cells = scheduler.shard_cells(cells, *parsed_shard)
    if slots and gpus is None and len(slots) > max(1, len(cells)):  # --parallel beyond the cells: no more side by side
        slots = slots[:max(1, len(cells))]
        parallel = len(slots)
    cores = executor.cores_per_cell()
    if cores is not None:  # the cell runs elsewhere, alone on the cores it asked for
        thread_plan = threads_module.plan(threads, loaded.suite.threads, 1, cores=cores)
    else:
        thread_plan = threads_module.plan(threads, loaded.suite.threads, len(slots) if slots else 1)
    return RunPlan(loaded, cells, matrix_cells, slots, parsed_shard, scheduler.parse_gpus(gpus) if gpus is not None else None,
                   gpus_per_cell, executor, conditions, thread_plan, parallel)
