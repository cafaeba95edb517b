"""A test-only cell: qbench's real pipeline (qbench.cell.pipeline) with the faults of QBENCH_TEST_FAULTS
(tests/helpers/faults.py) planted where they fire: at the start of a phase, just after its checkpoint is on
disk and before it is timed; in the task's loss; in the model's outputs during an evaluation.

Executors run it in place of `python -m qbench.cell` (tests/helpers/executors.py): as a subprocess
(`python -m tests.helpers.faulty_cell`) or forked from the fork server (`tests.helpers.faulty_cell:main`).
In this process, `with planted(): pipeline.run_cell(spec)` does the same.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qbench.cell import pipeline, tasks

from .faults import Injector


@contextmanager
def planted(environ: dict[str, str] | None = None) -> Iterator[None]:
    """The pipeline of this process with faults planted (QBENCH_TEST_FAULTS of `environ`, else this process's)."""
    original_init, original_write, original_get_task = pipeline.CellRun.__init__, pipeline.CellRun.write, tasks.get_task
    current: list[tuple[Injector, pipeline.CellRun]] = []  # the cell of this process (one per process, as in a run)
    fired: set[str] = set()

    def init(self: pipeline.CellRun, spec: Any) -> None:
        original_init(self, spec)
        current[:] = [(Injector(spec.cell_id, environ), self)]
        if current[0][0].faults:
            self.record["test.injected_faults"] = current[0][0].describe()

    def write(self: pipeline.CellRun, record: dict[str, Any]) -> dict[str, Any]:
        written = original_write(self, record)
        phase = record.get("last_phase")  # a phase's checkpoint is on disk: its faults fire now, once
        if record.get("status") == "running" and current and phase and phase not in fired:
            fired.add(phase)
            current[0][0].phase(phase)
        return written

    def get_task(*args: Any, **kwargs: Any) -> Any:
        task = original_get_task(*args, **kwargs)
        if current:
            injector, cell = current[0]
            task.loss = injector.wrap_loss(task.loss)
            evaluate = task.evaluate  # the phase it evaluates in is the one the cell is in
            task.evaluate = lambda model: injector.wrap_evaluate(evaluate, cell.record["last_phase"])(model)
        return task

    pipeline.CellRun.__init__, pipeline.CellRun.write, tasks.get_task = init, write, get_task  # type: ignore[method-assign]
    try:
        yield
    finally:
        pipeline.CellRun.__init__, pipeline.CellRun.write, tasks.get_task = original_init, original_write, original_get_task  # type: ignore[method-assign]


def main() -> int:
    with planted():
        return pipeline.main()


if __name__ == "__main__":
    sys.exit(main())
