"""Executors for the tests, through the executor protocol (qbench.runner.executors): qbench's own executors,
each running a test cell instead of `python -m qbench.cell`, and the registry entries that put them in place
of the real ones for a command-line run (`use(monkeypatch, FAKE)`).

    FAKE    tests/fake_cell.py: the standard library only, a plausible record in a moment; it decides for
            itself what a device is, so fake GPUs (--gpus 0,1) work on a machine without one; the compute
            probe tests/fake_probe.py, which measures nothing and imports no torch
    FAULTY  tests/helpers/faulty_cell.py: the real pipeline with the faults of QBENCH_TEST_FAULTS planted
"""

from __future__ import annotations

from typing import Any

from qbench.runner import executors as registry
from qbench.runner.executors.local import ForkServerExecutor, LocalExecutor, SubprocessExecutor
from qbench.runner.executors.ray_executor import RayExecutor
from qbench.runner.launch import Target

FAKE_CELL = Target("tests.fake_cell", "tests.fake_cell:main")
FAKE_PROBE = Target("tests.fake_probe", "tests.fake_probe:main")  # the compute probe without torch
FAULTY_CELL = Target("tests.helpers.faulty_cell", "tests.helpers.faulty_cell:main")


class FakeCells(SubprocessExecutor):
    """Each cell tests/fake_cell.py, a fresh process on this machine; the compute probe tests/fake_probe.py."""

    cell = FAKE_CELL
    probe = FAKE_PROBE

    def check_cuda(self, option: str) -> None:
        """The fake cell takes whatever device it is given: no GPU is looked for."""


class NoCellMayStart(FakeCells):
    """For runs that must stop before any cell: starting one fails the test."""

    def launch(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a cell started")


class FakeCellsOnRay(RayExecutor):
    cell = FAKE_CELL


class FaultyLocal(LocalExecutor):
    cell = FAULTY_CELL


class FaultyForkServer(ForkServerExecutor):
    cell = FAULTY_CELL


class FaultySubprocess(SubprocessExecutor):
    cell = FAULTY_CELL


def fake_cells_on_slurm() -> type:
    """SlurmExecutor running fake cells (imported here: submitit may be missing)."""
    from qbench.runner.executors.slurm import SlurmExecutor

    class FakeCellsOnSlurm(SlurmExecutor):
        cell = FAKE_CELL
        probe = FAKE_PROBE

        def check_cuda(self, option: str) -> None:
            pass

    return FakeCellsOnSlurm


HERE = __name__
FAKE = {"local": f"{HERE}:FakeCells", "subprocess": f"{HERE}:FakeCells", "ray": f"{HERE}:FakeCellsOnRay"}
NO_CELL = {"local": f"{HERE}:NoCellMayStart", "subprocess": f"{HERE}:NoCellMayStart"}
FAULTY = {"local": f"{HERE}:FaultyLocal", "forkserver": f"{HERE}:FaultyForkServer", "subprocess": f"{HERE}:FaultySubprocess"}


def use(monkeypatch: Any, entries: dict[str, str]) -> None:
    """Register these executors under their names for the rest of the test."""
    for name, target in entries.items():
        monkeypatch.setitem(registry.REGISTRY, name, target)


def install(entries: dict[str, str]) -> None:
    """Register these executors for the life of this process (a command line started by a test)."""
    registry.REGISTRY.update(entries)
