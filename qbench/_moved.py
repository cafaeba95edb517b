"""Old module paths keep importing after the move into folders (qbench 0.1 was flat: `qbench.metrics`,
`qbench.models`, ...), so scripts written against them go on working. Each old name is a thin
module that hands every attribute on to the module's new home, imported only when first used."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

MOVED = {
    "qbench.metrics": "qbench.tasks.metrics",
    "qbench.models": "qbench.cell.models",
    "qbench.train": "qbench.cell.train",
    "qbench.faults": "qbench.cell.faults",
    "qbench.precisions": "qbench.suite.precisions",
    "qbench.checks": "qbench.suite.preflight",
    "qbench.runner": "qbench.run.runner",
    "qbench.scheduler": "qbench.run.scheduler",
    "qbench.resume": "qbench.run.resume",
    "qbench.environment": "qbench.machine.environment",
    "qbench.probe": "qbench.machine.probe",
    "qbench.fields": "qbench.results.fields",
    "qbench.tables": "qbench.results.stats",
    "qbench.plots": "qbench.report.plots",
    "qbench.html": "qbench.report.page",
    "qbench.compare": "qbench.gate.compare",
    "qbench.baseline": "qbench.gate.baseline",
    "qbench.tasks.base": "qbench.tasks.batch",
    "qbench.data.registry": "qbench.data",
}


class _Forwarding(types.ModuleType):
    """A module whose attributes are those of another, looked up on each access."""

    def __getattr__(self, name: str):
        return getattr(importlib.import_module(MOVED[self.__name__]), name)

    def __dir__(self):
        return dir(importlib.import_module(MOVED[self.__name__]))


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return _Forwarding(spec.name)

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())


def forward(package: str, homes: tuple[str, ...], name: str):
    """For a package's `__getattr__`: `name` from the first of its modules (`homes`) that has it. A name
    that is a submodule of the package is left to the import system."""
    import importlib.util

    if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is not None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    for home in homes:
        module = importlib.import_module(f"{package}.{home}")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")
