"""The executor registry, by name only: `--executor NAME` -> "module:Class", imported only when a run asks for
it (as the task registry does), so that Ray or submitit are imported only by the runs that use them.

    local        this machine: forked from a fork server on a CPU, fresh interpreters on GPUs (the default)
    forkserver   this machine, every cell forked from the run's fork server (CPU only)
    subprocess   this machine, every cell a fresh interpreter
    ray          each cell a Ray task on a Ray cluster (pip install "qbench[ray]")
    slurm        each cell a SLURM job through submitit; on a machine without SLURM, a local submitit job
                 (pip install "qbench[slurm]")
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Any

from qbench.contract.suite import SuiteError

if TYPE_CHECKING:
    from qbench.runner.executors.base import Executor

REGISTRY: dict[str, str] = {
    "local": "qbench.runner.executors.local:LocalExecutor",
    "forkserver": "qbench.runner.executors.local:ForkServerExecutor",
    "subprocess": "qbench.runner.executors.local:SubprocessExecutor",
    "ray": "qbench.runner.executors.ray_executor:RayExecutor",
    "slurm": "qbench.runner.executors.slurm:SlurmExecutor",
}
DEFAULT = "local"
COMMAND_LINE = "command line"


def get(name: str) -> type[Executor]:
    """The executor class registered as `name`; SuiteError (one line, with a hint) for an unknown name."""
    if name not in REGISTRY:
        hint = difflib.get_close_matches(name, list(REGISTRY), n=1)
        raise SuiteError(COMMAND_LINE, [f"--executor: unknown executor {name!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                                        f"known: {', '.join(REGISTRY)}"])
    module, _, attribute = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def create(name: str, **options: Any) -> Executor:
    """An executor by name, with its own options (e.g. ray: address, cpus_per_cell)."""
    return get(name)(**options)
