"""Cells as SLURM jobs through submitit (`pip install "qbench[slurm]"`): one job per cell, the job starting
the cell as a fresh interpreter of its own (so the cell's memory is the cell's, as on this machine), writing
its record and log into the run folder (a file system the cluster's nodes share, as submitit needs) and its
progress events beside them. submitit's AutoExecutor picks SLURM where `srun` exists; elsewhere it runs each
job on this machine, in a process of its own (its "local" cluster), through the same code.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TextIO

from qbench.contract.protocol import CellSpec, child_env
from qbench.contract.suite import SuiteError
from qbench.runner import start
from qbench.runner.executors.base import CellHandle, Placement, ProcessExecutor, Request
from qbench.runner.launch import CELL, CHILD_STOP_GRACE_S, COMPUTE_PROBE, CellProcess, Target
from qbench.runner.plan import COMMAND_LINE
from qbench.runner.scheduler import Slot

if TYPE_CHECKING:
    from qbench.contract.suite import Cell
    from qbench.runner.runner import Run

INSTALL_HINT = 'pip install "qbench[slurm]"'
JOBS_FOLDER = "slurm"  # in the run folder: submitit's files, each job's own output, the cells' progress events
DEFAULT_TIME_MIN = 24 * 60  # a job's time limit, unless --slurm-time-min says otherwise
STOP_WAIT_S = CHILD_STOP_GRACE_S + 30  # how long an interrupted run waits for a cancelled job
PROBE_TIMEOUT_S = 10.0  # what the SLURM controller gets to answer before any run folder (sbatch would wait)


def import_submitit() -> Any:
    """The `submitit` module; SuiteError (exit 2, one line) when it is not installed."""
    try:
        import submitit
    except ImportError as error:
        raise SuiteError(COMMAND_LINE, [f"--executor slurm: submitit is not installed here ({error}); {INSTALL_HINT}"]) from None
    return submitit


def run_job(spec_json: str, env: dict[str, str], log_path: str, events_path: str,
            target: tuple[str, str] | None = None) -> dict[str, Any]:
    """What one job does where SLURM put it: run the cell in a fresh process (this job its parent, which it
    dies with), its output appended to the cell's log, its progress events one JSON line each to
    `events_path`; how it ended."""
    spec = replace(CellSpec.from_json(spec_json), parent_pid=os.getpid())
    with open(log_path, "a", encoding="utf-8") as log, open(events_path, "a", encoding="utf-8") as events:
        launched = time.monotonic()
        cell = CellProcess(spec, child_env(env), log, Target(*target) if target else CELL)
        try:
            for event in cell.events():
                events.write(json.dumps(event) + "\n")
                events.flush()
            returncode = cell.wait()
        finally:
            cell.stop()  # cancelled: the cell records itself interrupted and ends
    return {"returncode": returncode, "last_phase": cell.last_phase, "wall_s": time.monotonic() - launched}


def _probe(argv: list[str]) -> tuple[str | None, str]:
    """(why `argv` gave no answer, or None; its output): run with PROBE_TIMEOUT_S, never longer."""
    import subprocess

    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return f"`{argv[0]}` is not installed here", ""
    except subprocess.TimeoutExpired:
        return f"`{' '.join(argv)}` did not answer in {PROBE_TIMEOUT_S:g} s", ""
    except OSError as error:
        return f"`{argv[0]}` cannot run ({error.strerror or error})", ""
    said = " ".join((done.stdout + " " + done.stderr).split())[:300]
    if done.returncode != 0:
        return f"`{' '.join(argv)}` failed (exit {done.returncode}{f': {said}' if said else ''})", said
    return None, done.stdout


def controller_problems(partition: str | None) -> list[str]:
    """What stops jobs from being submitted, asked of SLURM itself with a bounded wait: its controller does not
    answer (`scontrol ping`), or the partition asked for is none it knows (`sinfo`)."""
    problem, said = _probe(["scontrol", "ping"])
    if problem is None and "DOWN" in said and "UP" not in said:
        problem = f"`scontrol ping` says the controller is down ({' '.join(said.split())[:200]})"
    if problem:
        return [f"--executor slurm: the SLURM controller does not answer: {problem}"]
    if partition:
        problem, said = _probe(["sinfo", "--noheader", "--partition", partition, "--format", "%P"])
        if problem:
            return [f"--slurm-partition {partition}: SLURM could not say whether it has this partition: {problem}"]
        if not said.strip():
            return [f"--slurm-partition {partition}: SLURM has no such partition (`sinfo --summarize` lists them)"]
    return []


class SlurmCell:
    """A cell's job as the runner follows it: progress from its events file, its end from submitit."""

    POLL_S = 0.5

    def __init__(self, job: Any, events_path: Path, fields: dict[str, Any], local: bool = False):
        self.job, self.events_path, self.fields = job, events_path, fields
        self.local = local  # submitit's local executor: the job is a process of this machine
        self.last_phase: str | None = None
        self.failure: dict[str, Any] | None = None
        self.wall_s: float | None = None  # the cell process's, measured by its job (queueing is not the cell's)
        self._returncode: int | None = None
        self.cancelled = False

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def events(self) -> Any:
        offset = 0
        while True:
            done = self.job.done()
            try:
                with open(self.events_path, encoding="utf-8") as events:
                    events.seek(offset)
                    lines = events.readlines()
            except FileNotFoundError:
                lines = []
            for line in lines:
                if not line.endswith("\n"):
                    break  # half written: read it whole next time
                offset += len(line.encode("utf-8"))
                event = json.loads(line)
                self.last_phase = event.get("phase", self.last_phase)
                yield event
            if done:
                return
            time.sleep(self.POLL_S)

    def wait(self) -> int | None:
        if self.local and self.cancelled and self.job.done() and not self.job.paths.result_pickle.exists():
            # a local job cancelled while its cell ran (SIGINT) has ended and hands back no outcome (its cell wrote
            # its own record, interrupted): submitit's result() would wait 15 s for one, for every cell running
            # when a run is stopped. On SLURM a cancelled job may still write its outcome after sacct says
            # CANCELLED, and a shared file system may show it late: result() waits for it there.
            self.failure = {"error_type": "SlurmJobCancelled", "error": f"the job {self.job.job_id} was cancelled"}
            return None
        try:
            outcome = self.job.result()
        except Exception as error:  # the job died (node failure, time limit, cancelled) without handing back its end
            text = " ".join(str(error).split())[-600:]
            self.failure = {"error_type": "SlurmJobFailed",
                            "error": f"the job {self.job.job_id} ended without its cell's record ({type(error).__name__}: {text})"}
            return None
        self._returncode = outcome["returncode"]
        self.last_phase = outcome["last_phase"] or self.last_phase
        self.wall_s = outcome["wall_s"]
        return self._returncode

    def terminate(self, sig: int = signal.SIGTERM) -> None:  # a job is cancelled whichever signal stopped the run
        self.cancelled = True
        try:
            self.job.cancel(check=False)
        except Exception:  # already gone
            pass

    def stop(self) -> None:
        self.terminate()
        deadline = time.monotonic() + STOP_WAIT_S
        while not self.job.done() and time.monotonic() < deadline:
            time.sleep(self.POLL_S)


class SlurmExecutor(ProcessExecutor):
    """Each cell a SLURM job through submitit (on this machine where there is no SLURM)."""

    name = "slurm"
    places_cells = True  # SLURM (or submitit's local stand-in) decides where each job runs
    OPTIONS = {"cpus_per_cell": "--cpus-per-cell", "partition": "--slurm-partition", "time_min": "--slurm-time-min",
               "parameters": "--slurm-option"}
    cell: ClassVar[Target] = CELL  # what each job's cell process runs
    probe: ClassVar[Target] = COMPUTE_PROBE  # on this machine: what decides the compute dtype before the first job

    def __init__(self, cpus_per_cell: float | None = None, partition: str | None = None, time_min: int | None = None,
                 parameters: dict[str, Any] | None = None, cluster: str | None = None):
        submitit = import_submitit()
        self.cpus_per_cell, self.partition = cpus_per_cell, partition
        self.time_min = time_min or DEFAULT_TIME_MIN
        self.parameters = dict(parameters or {})  # any other sbatch setting submitit knows, e.g. account, qos
        self.cluster = cluster or submitit.AutoExecutor.which()  # slurm where srun exists, else local
        self.device = "cpu"
        self.gpus_per_cell = 0
        self.jobs: Any = None

    @property
    def on_this_machine(self) -> bool:
        return self.cluster != "slurm"

    def placement_problems(self, gpus: str | None, gpus_per_cell: float, device: str, parallel: int) -> list[str]:
        problems = []
        if gpus:
            problems.append("--gpus picks GPUs of this machine; with --executor slurm each job asks for --gpus-per-cell GPUs")
        if gpus_per_cell != int(gpus_per_cell) or gpus_per_cell < 1:
            problems.append(f"--gpus-per-cell {gpus_per_cell:g}: a SLURM job asks for a whole number of GPUs")
        elif device == "cpu" and gpus_per_cell != 1:
            problems.append("--gpus-per-cell: cells on --device cpu take no GPU")
        if self.cpus_per_cell is not None and (self.cpus_per_cell != int(self.cpus_per_cell) or self.cpus_per_cell < 1):
            problems.append(f"--cpus-per-cell {self.cpus_per_cell:g}: a SLURM job asks for a whole number of CPUs")
        if self.time_min < 1:
            problems.append(f"--slurm-time-min {self.time_min}: at least 1 minute")
        if not self.on_this_machine and device == "auto":
            problems.append("--device auto: this machine cannot tell what SLURM's nodes have; give --device cpu or --device cuda")
        return problems

    def cores_per_cell(self) -> int | None:
        if self.cpus_per_cell:
            return int(self.cpus_per_cell)
        return None if self.on_this_machine else 1  # sbatch's default: one CPU per task

    def check_cuda(self, option: str) -> None:
        """On this machine's submitit jobs: SuiteError when torch sees no GPU here (qbench.runner.executors.local)."""
        from qbench.runner.executors.local import check_cuda_seen

        check_cuda_seen(option)

    def check(self, request: Request) -> str:
        if self.on_this_machine and request.device.startswith("cuda"):
            self.check_cuda(request.device_option or f"--device {request.device}")
        self._check_submission()
        request.check(request.device if self.on_this_machine else None)
        return f"{request.device}, SLURM jobs through submitit ({self._where()})"

    def _where(self) -> str:
        return "on this machine: no srun here, submitit's local executor" if self.on_this_machine else "cluster slurm"

    def prepare(self, request: Request) -> Placement:
        """On this machine: settle the device and the compute dtype as a local run does. On SLURM: the cells
        decide on their nodes, as Ray's do (their records say what they chose)."""
        device, compute, notes, warnings = request.device, None, [], []
        threads = request.threads
        self._check_submission()
        if self.on_this_machine:
            if device.startswith("cuda"):
                self.check_cuda(request.device_option or f"--device {device}")
            request.check(device)
            begun = start.finish(None, request.loaded, request.cells, device, request.threads, "subprocess", False,
                                 request.recorded_compute, self.probe)
            device, compute, threads, notes, warnings = begun.device, begun.compute, begun.threads, begun.notes, begun.warnings
        else:
            request.check(None)
        self.device = device
        self.gpus_per_cell = int(request.gpus_per_cell) if device.startswith("cuda") else 0
        lines = [f"{compute.header()}; {threads.header()}; each cell a fresh process in its own job" if compute else
                 f"{threads.header()}; each cell a fresh process in its own job (its node picks the compute dtype)"]
        manifest: dict[str, Any] = {"cell_launcher": self.launcher, "slurm": self._settings()}
        if compute is not None:
            manifest["compute"] = asdict(compute)
        return Placement(device=device, where=f"{device}, SLURM jobs through submitit ({self._where()})", compute=compute,
                         threads=threads, lines=lines, notes=notes, warnings=warnings, manifest=manifest)

    def _check_submission(self) -> None:
        """SuiteError, before any run folder, when the jobs could not be submitted: the SLURM controller does not
        answer or has no such partition, or an --slurm-option is no sbatch setting submitit knows."""
        import tempfile

        problems = [] if self.on_this_machine else controller_problems(self.partition)
        if problems:
            raise SuiteError(COMMAND_LINE, problems)
        with tempfile.TemporaryDirectory(prefix="qbench-slurm-check-") as scratch:
            self._job_parameters(import_submitit().AutoExecutor(folder=scratch, cluster=self.cluster), "job")

    def _job_parameters(self, jobs: Any, name: str) -> None:
        """Set the jobs' sbatch settings on submitit's executor `jobs`; SuiteError for one submitit does not know."""
        parameters: dict[str, Any] = {"timeout_min": self.time_min, "name": name, "gpus_per_node": self.gpus_per_cell,
                                      "tasks_per_node": 1, "nodes": 1}
        if self.cpus_per_cell:
            parameters["cpus_per_task"] = int(self.cpus_per_cell)
        if self.partition:
            parameters["slurm_partition"] = self.partition
        parameters.update({f"slurm_{key}": value for key, value in self.parameters.items()})
        try:
            jobs.update_parameters(**parameters)
        except (NameError, ValueError, AssertionError, TypeError) as error:  # an sbatch setting submitit does not know
            raise SuiteError(COMMAND_LINE, [f"--slurm-option: {' '.join(str(error).split())[:400]}"]) from None

    def _settings(self) -> dict[str, Any]:
        import submitit

        return {"cluster": self.cluster, "submitit_version": submitit.__version__, "partition": self.partition,
                "time_min": self.time_min, "cpus_per_cell": self.cpus_per_cell, "gpus_per_cell": self.gpus_per_cell,
                "parameters": self.parameters}

    def slots(self, run: Run) -> list[Slot]:
        """One job at a time on this machine (cells must not measure each other) unless --parallel says more;
        on SLURM every cell at once (SLURM queues them) unless --parallel caps the jobs in flight."""
        if self.on_this_machine or len(run.slots) > 1:
            return run.slots
        return [Slot(f"job {i + 1}") for i in range(max(1, len(run.cells)))]

    def run_cells(self, run: Run) -> list[dict[str, Any]]:
        submitit = import_submitit()
        folder = run.run_dir / JOBS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        self.jobs = submitit.AutoExecutor(folder=folder, cluster=self.cluster)
        self._job_parameters(self.jobs, f"qbench-{run.loaded.suite.name}")
        return super().run_cells(run)

    def launch(self, run: Run, cell: Cell, env: dict[str, str], log: TextIO, attempt: str) -> CellHandle:
        events_path = run.run_dir / JOBS_FOLDER / f"{cell.id}.events"
        events_path.unlink(missing_ok=True)  # a resumed cell's earlier attempt
        target = None if self.cell == CELL else (self.cell.module, self.cell.function)
        job = self.jobs.submit(run_job, run.spec(cell, attempt).to_json(), env, str(Path(log.name).resolve()),
                               str(events_path), target)
        return SlurmCell(job, events_path, {"env.slurm.job_id": str(job.job_id), "env.slurm.cluster": self.cluster},
                         local=self.on_this_machine)
