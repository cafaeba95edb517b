"""Cells as processes on this machine, one per slot (--gpus, --parallel) at a time: each a fresh interpreter
(`subprocess`), or forked from a fork server that imported torch & co. and built the run's data once
(`forkserver`); `local` picks the fork server on a CPU and fresh interpreters on GPUs."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TextIO

from qbench.contract.suite import SuiteError
from qbench.runner import start
from qbench.runner.executors.base import CellHandle, Placement, ProcessExecutor, Request
from qbench.runner.launch import CELL, COMPUTE_PROBE, CellProcess, ForkServerLauncher, ForkServerUnavailable, Target
from qbench.runner.plan import COMMAND_LINE

if TYPE_CHECKING:
    from qbench.contract.suite import Cell
    from qbench.runner.runner import Run
    from qbench.runner.start import RunStart


def check_cuda_seen(option: str) -> None:
    """SuiteError naming `option` when torch sees no CUDA GPU here (asked in a child process, as `auto` is):
    before any cell, instead of every cell failing in its first CUDA call."""
    from qbench.runner.runner import resolve_device

    if resolve_device("auto") != "cuda":
        raise SuiteError(COMMAND_LINE, [f"{option}: torch sees no CUDA GPU on this machine (a CPU build of torch, or "
                                        "no driver); use --device cpu, or auto"])


class SubprocessExecutor(ProcessExecutor):
    """Each cell a fresh interpreter on this machine: `python -m qbench.cell`."""

    name = "local"
    asked: ClassVar[start.LauncherOption] = "subprocess"  # how cell processes start: qbench.runner.start
    cell: ClassVar[Target] = CELL  # what each cell process runs
    probe: ClassVar[Target] = COMPUTE_PROBE  # what decides the device and the compute dtype before the first cell

    def __init__(self) -> None:
        self.server: ForkServerLauncher | None = None
        self._begun: RunStart | None = None

    @property
    def started(self) -> RunStart | None:
        """What `prepare` settled once (the device, the compute dtype, the threads, the fork server's timing)."""
        return self._begun

    @property
    def launcher(self) -> str:  # type: ignore[override]  # forked while the server lives, else fresh interpreters
        return "forkserver" if self.server is not None else "subprocess"

    def placement_problems(self, gpus: str | None, gpus_per_cell: float, device: str, parallel: int) -> list[str]:
        problems = []
        if parallel > 1 and gpus:
            problems.append("--parallel runs cells side by side on the CPU; with --gpus list a GPU twice instead (--gpus 0,0)")
        elif parallel > 1 and device == "cuda":
            problems.append("--parallel runs cells side by side on the CPU; it cannot be combined with --device cuda")
        if gpus_per_cell != int(gpus_per_cell) or gpus_per_cell < 1:
            problems.append(f"--gpus-per-cell {gpus_per_cell:g}: a share of a GPU needs --executor ray; on this "
                            "machine list a GPU twice to run two cells on it (--gpus 0,0)")
        elif gpus is not None and device == "cpu":  # --gpus "" (an unset variable) is an empty list, not no --gpus
            problems.append("--gpus runs cells on GPUs; it cannot be combined with --device cpu")
        elif gpus is None and gpus_per_cell != 1:
            problems.append("--gpus-per-cell needs --gpus (or --executor ray)")
        return problems

    def check_cuda(self, option: str) -> None:
        check_cuda_seen(option)

    def check(self, request: Request) -> str:
        from qbench.runner.runner import resolve_device

        on_gpus = any("CUDA_VISIBLE_DEVICES" in slot.env for slot in request.slots)
        if request.device.startswith("cuda") or on_gpus:
            self.check_cuda("--gpus" if on_gpus else request.device_option or f"--device {request.device}")
        request.check(request.device)
        return request.device if on_gpus else resolve_device(request.device)

    def prepare(self, request: Request) -> Placement:
        on_gpus = any("CUDA_VISIBLE_DEVICES" in slot.env for slot in request.slots)
        if request.device.startswith("cuda") or on_gpus:
            self.check_cuda("--gpus" if on_gpus else request.device_option or f"--device {request.device}")
        device = "cuda" if on_gpus else request.device
        self.server = start.begin(self.asked, device, on_gpus)  # imports torch & co. while the suite is checked
        try:
            request.check(device)
            begun = start.finish(self.server, request.loaded, request.cells, device, request.threads, self.asked, on_gpus,
                                 request.recorded_compute, self.probe)
        except ForkServerUnavailable as why:  # asked for by name (auto falls back to subprocesses)
            if self.server is not None:
                self.server.close()
                self.server = None
            raise SuiteError(COMMAND_LINE, [f"--executor forkserver: the fork server cannot run cells here ({why}); "
                                            "use --executor local or subprocess"]) from None
        except BaseException:
            if self.server is not None:
                self.server.close()
                self.server = None
            raise
        self._begun, self.server = begun, begun.forkserver
        slots = request.slots
        several = len(slots) > 1 or any(slot.env for slot in slots)
        where = f"{begun.device}, {len(slots)} cells at a time ({', '.join(s.name for s in slots)})" if several else begun.device
        if self.server is not None:
            ready = begun.timing.get("forkserver_ready_s")
            how = "forked from a server that imported torch & co. once" + (f" ({ready:.1f} s)" if ready else "")
        else:
            how = "each a fresh process"
        return Placement(
            device=begun.device, where=where, compute=begun.compute, threads=begun.threads,
            lines=[f"{begun.compute.header()}; {begun.threads.header()}; cells {how}"], notes=begun.notes,
            warnings=begun.warnings,
            manifest={"compute": asdict(begun.compute), "cell_launcher": self.launcher, "timing": begun.timing,
                      "shared": begun.shared},
        )

    def launch(self, run: Run, cell: Cell, env: dict[str, str], log: TextIO, attempt: str) -> CellHandle:
        """The cell forked from the run's fork server, else (none, or it died) a fresh interpreter."""
        if self.server is not None:
            try:
                spec = run.spec(cell, attempt, parent_pid=self.server.pid)
                return CellProcess(spec, self.cell_env(env), log, self.cell, server=self.server)
            except ForkServerUnavailable as gone:  # the server died (e.g. the OOM killer): go on without it
                log.write(f"=== qbench: the fork server is gone ({gone}); this and later cells start as subprocesses ===\n")
                log.flush()
                self.server = None
        return CellProcess(run.spec(cell, attempt, parent_pid=os.getpid()), self.cell_env(env), log, self.cell)

    def close(self, run_dir: Path | None = None) -> None:
        if self._begun is not None:
            self._begun.close(run_dir)
            self._begun = None
        elif self.server is not None:
            self.server.close()
        self.server = None


class ForkServerExecutor(SubprocessExecutor):
    """Each cell forked from one fork server per run that imported torch & co. and built the run's data once
    (a CPU only: a process that initialized CUDA cannot fork children that use it)."""

    asked = "forkserver"

    def placement_problems(self, gpus: str | None, gpus_per_cell: float, device: str, parallel: int) -> list[str]:
        problems = super().placement_problems(gpus, gpus_per_cell, device, parallel)
        if gpus is not None or device.startswith("cuda"):
            problems.insert(0, "--executor forkserver: a fork server cannot fork cells that use CUDA; use --executor local "
                               "(the default: fresh processes on GPUs) or subprocess")
        return problems


class LocalExecutor(ForkServerExecutor):
    """This machine's processes as suit the device: forked from a fork server on a CPU, fresh interpreters on
    GPUs (or where the fork server cannot start)."""

    asked = "auto"

    def placement_problems(self, gpus: str | None, gpus_per_cell: float, device: str, parallel: int) -> list[str]:
        return SubprocessExecutor.placement_problems(self, gpus, gpus_per_cell, device, parallel)
