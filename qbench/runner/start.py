"""What a run settles once before its first cell: the device, how cell processes start (the fork server
or plain subprocesses), the compute dtype with its reason, the threads per cell, and the run-wide data.

    begin()   starts the fork server (it imports torch & co. while the caller checks the suite)
    finish()  waits for it, warms the suite's data, asks the compute probe for the compute dtype (measured
              once per machine and model for auto, then read from the user cache), and sees whether other
              work leaves the cores for the cells' threads
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qbench.contract import precisions
from qbench.contract.suite import Cell, LoadedSuite
from qbench.machine import compute, threads
from qbench.runner import launch
from qbench.runner.launch import ForkServerLauncher, ForkServerUnavailable

LauncherOption = Literal["auto", "forkserver", "subprocess"]


@dataclass
class RunStart:
    """Everything `Run` needs besides the cells, and what the header line says about it."""

    device: str
    forkserver: ForkServerLauncher | None  # None: each cell a fresh subprocess
    compute: compute.ComputeChoice
    threads: threads.ThreadPlan
    notes: list[str] = field(default_factory=list)  # lines for the header
    warnings: list[str] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)  # run-wide seconds, for run.json
    shared: list[str] = field(default_factory=list)  # what the fork server built once for all cells

    @property
    def launcher(self) -> str:
        return "forkserver" if self.forkserver is not None else "subprocess"

    def close(self, run_dir: Path | None = None) -> None:
        if self.forkserver is not None:
            problem = self.forkserver.save_log(run_dir / "logs" / "forkserver.log") if run_dir is not None else None
            self.forkserver.close()
            if problem is not None:  # a full disk: the run's own line says what became of its records
                print(f"warning: the fork server's log was not kept: {problem}", file=sys.stderr)


def begin(option: LauncherOption, device: str, gpus: bool) -> ForkServerLauncher | None:
    """Start the fork server unless cells must be plain subprocesses: asked for, or on GPUs (see forkserver)."""
    if option == "subprocess" or gpus or device.startswith("cuda"):
        return None
    return ForkServerLauncher(env=threads.wait_policy()[0])  # OpenMP reads its waiting policy when torch loads


def finish(server: ForkServerLauncher | None, loaded: LoadedSuite, cells: list[Cell], device: str,
           thread_plan: threads.ThreadPlan, option: LauncherOption = "auto", gpus: bool = False,
           recorded: compute.ComputeChoice | None = None, probe: launch.Target = launch.COMPUTE_PROBE) -> RunStart:
    """Wait for the fork server (or fall back to subprocesses), decide the device and the compute dtype (or keep
    the one a resumed run `recorded`), warm the suite's data in the server. ForkServerUnavailable only when
    the fork server was asked for by name."""
    started = time.monotonic()
    own = [os.getpid(), *([server.pid] if server is not None else [])]
    window = threads.BusyWindow.start(own)  # what else keeps the cores busy while the server imports
    notes: list[str] = []
    timing: dict[str, Any] = {}
    launcher: ForkServerLauncher | None = None
    cuda_seen: bool | None = None
    if server is not None:
        try:
            hello = server.ready()
            launcher = server
            cuda_seen = False
            timing.update({"forkserver_ready_s": server.ready_s, "forkserver_import_cpu_s": hello.get("import_cpu_s")})
        except ForkServerUnavailable as why:
            if option == "forkserver":
                raise
            cuda_seen = (server.hello or {}).get("cuda_available")
            notes.append(f"cells start as plain subprocesses: {why}")
    elif option != "subprocess" and (gpus or device.startswith("cuda")):
        notes.append("cells start as plain subprocesses on GPUs (a fork server cannot fork cells that use CUDA)")
    if device == "auto" and cuda_seen is False:
        device = "cpu"  # the fork server asked torch: no GPU
    shared: list[str] = []
    if launcher is not None:
        try:
            warmed = launcher.warm(loaded.source_text(), str(loaded.path), device)
        except ForkServerUnavailable as why:  # it died (the OOM killer, a limit): the cells go on without it
            launcher.close()
            launcher = None
            if option == "forkserver":
                raise
            notes.append(f"cells start as plain subprocesses: {why}")
        else:
            shared = list(warmed.get("built") or [])
            if warmed.get("error"):
                notes.append(f"the fork server could not prepare the data once for all cells ({warmed['error']}); each cell does")
            timing.update({"warm_s": warmed.get("seconds"), "warm_cpu_s": warmed.get("cpu_s")})
    probe_started = time.monotonic()
    device, choice = _compute_choice(launcher, loaded, cells, device, thread_plan, recorded, probe)
    timing["compute_probe_s"] = time.monotonic() - probe_started
    warnings = choice.warnings()
    timing["start_s"] = time.monotonic() - started
    others = window.others_cores(own) if window is not None else None
    overloaded = threads.oversubscription(thread_plan, others) if device == "cpu" else None
    if overloaded:
        warnings.append(overloaded)
    return RunStart(device, launcher, choice, thread_plan, notes, warnings, timing, shared)


def _compute_choice(launcher: ForkServerLauncher | None, loaded: LoadedSuite, cells: list[Cell], device: str,
                    thread_plan: threads.ThreadPlan, recorded: compute.ComputeChoice | None,
                    probe: launch.Target) -> tuple[str, compute.ComputeChoice]:
    """(the device, the run's compute dtype): the one a resumed run `recorded`; on a CPU with an explicit dtype
    it has arithmetic for, decided here; else the compute probe's answer (it asks torch about the GPU and, for
    auto, measures a training step in each dtype, or reads that measurement from the user cache)."""
    dense = precisions.dense_dtypes([c.precision for c in cells])
    if recorded is not None:  # the cells of one run folder compute alike
        return device, recorded
    if device == "cpu" and loaded.suite.compute_dtype != "auto":
        flagged = compute.choose(loaded.suite.compute_dtype, device, dense_dtypes=dense)
        if not flagged.emulated:
            return device, flagged
    answer = launch.run_probe(launcher, {"device": device, "setting": loaded.suite.compute_dtype, "dense_dtypes": list(dense),
                                         "suite_text": loaded.source_text(), "suite_path": str(loaded.path),
                                         "threads": thread_plan.per_cell}, target=probe)
    return answer["device"], compute.ComputeChoice.from_dict(answer["choice"])
