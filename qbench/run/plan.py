"""What one `qbench run` will do, decided before anything runs: the cells (after --only, --seeds and
--shard), the device slots (--gpus), and what run.json records about that choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbench.run import scheduler
from qbench.run.scheduler import LOCAL_SLOT, Slot
from qbench.suite.spec import Cell, LoadedSuite, SuiteError

COMMAND_LINE = "command line"


@dataclass(frozen=True)
class RunPlan:
    loaded: LoadedSuite
    cells: list[Cell]
    matrix_cells: int  # before sharding
    slots: list[Slot] | None = None  # None: one cell at a time on this machine's device
    shard: tuple[int, int] | None = None
    gpus: list[str] | None = None
    gpus_per_cell: int | None = None

    @property
    def label(self) -> str:
        """Part of the run folder's name: `shard1of2` for a shard, else nothing."""
        return f"shard{self.shard[0]}of{self.shard[1]}" if self.shard else ""

    def run_slots(self) -> list[Slot]:
        return self.slots or [LOCAL_SLOT]

    def manifest_extras(self) -> dict[str, Any]:
        return {
            "shard": f"{self.shard[0]}/{self.shard[1]}" if self.shard else None,
            "matrix_cells": self.matrix_cells,
            "gpus": self.gpus,
            "gpus_per_cell": self.gpus_per_cell if self.gpus else None,
        }


def placement(loaded: LoadedSuite, gpus: str | None, gpus_per_cell: int, device: str,
              shard: str | None) -> tuple[list[Slot] | None, tuple[int, int] | None]:
    """Device slots from --gpus / --gpus-per-cell and the shard from --shard; SuiteError when they are wrong."""
    problems = []
    slots = parsed_shard = None
    try:
        if gpus:
            slots = scheduler.gpu_slots(scheduler.parse_gpus(gpus), gpus_per_cell)
            if device == "cpu":
                problems.append("--gpus runs cells on GPUs; it cannot be combined with --device cpu")
            if gpus_per_cell > 1 and loaded.suite.model.device_map != "auto":
                problems.append(
                    f"--gpus-per-cell {gpus_per_cell}: a cell only spreads over several GPUs with "
                    'model.device_map = "auto" in the suite'
                )
        elif gpus_per_cell != 1:
            problems.append("--gpus-per-cell needs --gpus")
        if shard:
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
    return seeds


def make(loaded: LoadedSuite, only: str | None = None, seeds: str | None = None, shard: str | None = None,
         gpus: str | None = None, gpus_per_cell: int = 1, device: str = "auto") -> RunPlan:
    """The plan for the command line's options; SuiteError (one line per problem) when they are wrong."""
    chosen = tuple(only.split(",")) if only else None
    if chosen:
        unknown = [p for p in chosen if p not in loaded.suite.matrix.precisions]
        if unknown:
            raise SuiteError(loaded.path, [
                f"--only: {', '.join(unknown)} not in matrix.precisions ({', '.join(loaded.suite.matrix.precisions)})"
            ])
    seed_list = parse_seeds(seeds) if seeds else None
    slots, parsed_shard = placement(loaded, gpus, gpus_per_cell, device, shard)
    cells = loaded.cells(chosen, seed_list)
    matrix_cells = len(cells)
    if parsed_shard:
        cells = scheduler.shard_cells(cells, *parsed_shard)
    return RunPlan(loaded, cells, matrix_cells, slots, parsed_shard, scheduler.parse_gpus(gpus) if gpus else None,
                   gpus_per_cell)
