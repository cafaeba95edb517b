"""Cells as Ray tasks: the driver side of `qbench run --executor ray`.

Each cell is one Ray task (`ray_task.cell_task`) asking for the GPUs and CPUs one cell needs, with no
automatic retry; Ray places it on a node with room, and the task runs the cell in its own process
there, exactly as the local runner does. The task streams back where it runs, progress, record
checkpoints, the log and the final record; this driver writes `cells/<cell>.json` (atomically) and
`logs/<cell>.log` into its own run folder, so --resume, report and compare work as for a local run.

Ray is imported only here and only when asked for (`import_ray`): qbench runs without it.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from qbench.cell.measure.timing import wall_split
from qbench.contract import records as results
from qbench.contract.suite import Cell, SuiteError
from qbench.runner import launch, runner
from qbench.runner.plan import COMMAND_LINE
from qbench.runner.ray_task import cell_task, collected_cell_task, spec_dict

INSTALL_HINT = 'pip install "qbench[ray]"'
LOCAL = "local"  # --ray-address local: a private single-machine cluster for this run
CONNECT_TIMEOUT_S = 5.0  # an unreachable head is refused after this, not after Ray's own two minutes
STOP_WAIT_S = launch.CHILD_STOP_GRACE_S + 30  # how long an interrupted run waits for its running tasks
POLL_S = 0.2
# The driver's settings a cell on another machine must see too (thread counts, offline mode, caches,
# test fault injection); anything machine-specific (PATH, CUDA_VISIBLE_DEVICES, ...) stays behind.
FORWARDED_ENV_PREFIXES = ("QBENCH_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "MKL_", "OPENBLAS_", "PYTORCH_",
                          "BNB_", "CUBLAS_WORKSPACE_CONFIG", "CUDA_LAUNCH_BLOCKING")

# how a task that did not hand back its cell's record ended: Ray's exception -> the record's error_type
RAY_ERROR_TYPES = {
    "WorkerCrashedError": "RayWorkerDied",
    "NodeDiedError": "RayNodeDied",
    "LocalRayletDiedError": "RayNodeDied",
    "OwnerDiedError": "RayNodeDied",
    "ObjectLostError": "RayNodeDied",
    "OutOfMemoryError": "RayWorkerOutOfMemory",  # Ray's memory monitor killed the worker
    "TaskUnschedulableError": "RayTaskUnschedulable",
    "RuntimeEnvSetupError": "RayRuntimeEnvSetupError",
    "TaskCancelledError": "Interrupted",
}


def import_ray() -> Any:
    """The `ray` module; SuiteError (exit 2, one line) when it is not installed."""
    try:
        import ray
    except ImportError as error:
        raise SuiteError(COMMAND_LINE, [f"--executor ray: Ray is not installed here ({error}); {INSTALL_HINT}"]) from None
    return ray


@dataclass(frozen=True)
class CellResources:
    """What each cell's task asks Ray for."""

    num_gpus: float
    num_cpus: float

    def options(self) -> dict[str, float]:
        return {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus}

    def describe(self) -> str:
        return ", ".join(f"{amount:g} {name}" for name, amount in (("GPU", self.num_gpus), ("CPU", self.num_cpus)) if amount)


def cell_resources(device: str, gpus_per_cell: float, cpus_per_cell: float) -> CellResources:
    """GPUs for a CUDA cell (1, N for a base spread over N, a fraction to share a GPU), none for a CPU cell."""
    return CellResources(gpus_per_cell if device.startswith("cuda") else 0.0, cpus_per_cell)


def check_reachable(address: str) -> None:
    """SuiteError unless something listens at the address's host and port (Ray itself would wait minutes)."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise SuiteError(COMMAND_LINE, [
            f"--ray-address {address!r}: expected auto, local, HOST:PORT (the head's GCS, e.g. 10.0.0.1:6379) or "
            "ray://HOST:PORT (Ray Client, e.g. ray://10.0.0.1:10001)"
        ])
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise SuiteError(COMMAND_LINE, [f"--ray-address {address}: cannot reach a Ray cluster at {host}:{port}: {reason}"]) from None


@dataclass
class Cluster:
    """The Ray cluster this run submits to."""

    address: str
    started_here: bool  # ray.init was called by qbench (and ray.shutdown will be)
    resources: dict[str, float]
    nodes: list[dict[str, float]]  # each alive node's total resources
    ray_version: str

    def manifest(self, resources: CellResources) -> dict[str, Any]:
        return {
            "address": self.address,
            "ray_version": self.ray_version,
            "cluster_resources": {k: v for k, v in self.resources.items() if k in ("CPU", "GPU", "memory")},
            "nodes": len(self.nodes),
            "cell_resources": resources.options(),
        }

    def has_gpus(self) -> bool:
        return self.resources.get("GPU", 0) > 0

    def check_fits(self, resources: CellResources) -> None:
        """SuiteError when no node of the cluster has room for one cell (its tasks would wait forever)."""
        wanted = {"GPU": resources.num_gpus, "CPU": resources.num_cpus}
        if any(all(node.get(name, 0) >= amount for name, amount in wanted.items()) for node in self.nodes):
            return
        have = "; ".join(
            ", ".join(f"{node.get(name, 0):g} {name}" for name in ("CPU", "GPU")) for node in self.nodes
        ) or "no node"
        raise SuiteError(COMMAND_LINE, [
            f"--executor ray: no node of the Ray cluster at {self.address} has room for one cell "
            f"({resources.describe()}); its nodes have: {have}"
        ])


def connect(address: str | None) -> Cluster:
    """Join (or, for `local`, start) the Ray cluster; SuiteError with one line when Ray is missing or the
    address cannot be reached. Inside a program that already called ray.init, that connection is used."""
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or LOCAL
    started_here = not ray.is_initialized()
    if started_here:
        if address not in (LOCAL, "auto"):
            check_reachable(address)
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": "error"}
        if address == LOCAL:
            options["include_dashboard"] = False
        try:
            ray.init(address=address, **options)
        except (ConnectionError, ValueError, RuntimeError, OSError, SystemExit) as error:
            # SystemExit: Ray ends the process when the head stops answering while connecting
            raise SuiteError(COMMAND_LINE, [
                f"--ray-address {address}: cannot connect to a Ray cluster: {' '.join(str(error).split())}"
            ]) from None
    else:
        address = "the running ray.init connection"
    nodes = [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]
    return Cluster(address, started_here, dict(ray.cluster_resources()), nodes, ray.__version__)


def disconnect(cluster: Cluster) -> None:
    if cluster.started_here:
        import ray

        ray.shutdown()


def forwarded_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's settings each cell gets on whatever node it runs (FORWARDED_ENV_PREFIXES), plus `extra`."""
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    return {**forwarded, **(extra or {})}


@dataclass
class _Task:
    """The driver's view of one cell's task."""

    cell: Cell
    index: int
    placement: dict[str, Any] | None = None  # set when the task started on a worker
    checkpoint: dict[str, Any] | None = None  # the record as the cell last left it
    last_phase: str | None = None  # the last phase the cell announced
    returned: dict[str, Any] | None = None  # the task's final item
    attempt: str | None = None  # this run's claim on the cell's record (records.claim_record)


@dataclass
class RayRun(runner.Run):
    """A run whose cells are Ray tasks; records, logs and run.json as a local run writes them."""

    resources: CellResources = field(default_factory=lambda: CellResources(0.0, 1.0))
    # True: each task streams its items as they come (progress, checkpoints, log); False: a task hands
    # them all back when it ends (Ray Client); None: streams unless connected through Ray Client
    stream: bool | None = None
    executor = "ray"

    def execute(self) -> list[dict[str, Any]]:
        """Submit every cell, write each record as its task ends; a failed cell or task is recorded and the
        run goes on. Ctrl-C / SIGTERM cancels the tasks not started, stops the running cells (recorded
        `interrupted`) and raises RunInterrupted."""
        ray = import_ray()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.stream is None:  # Ray Client (ray://) cannot stream a task's items
            self.stream = not ray.util.client.ray.is_connected()
        remote = ray.remote(cell_task if self.stream else collected_cell_task)
        options = {**self.resources.options(), "max_retries": 0, "retry_exceptions": False}
        if self.stream:
            options["num_returns"] = "streaming"
        command = None if launch.is_qbench_cell(self.cell_command) else list(self.cell_command)
        env = forwarded_env(self.env)
        tasks: dict[Any, _Task] = {}
        records: dict[int, dict[str, Any]] = {}
        terminated: list[int] = []  # Ray re-raises a KeyboardInterrupt of its own, without the handler's message

        def sigterm_as_interrupt(signum: int, frame: Any) -> None:
            terminated.append(signum)
            raise KeyboardInterrupt("SIGTERM")

        previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
        try:
            try:
                for index, cell in enumerate(self.cells):
                    spec = spec_dict(self._spec(cell))
                    handle = remote.options(**options, name=f"qbench {self.loaded.suite.name} {cell.id}").remote(spec, env, command)
                    tasks[handle] = _Task(cell, index)
                self._follow(ray, tasks, records)
            except KeyboardInterrupt:
                running = [task.cell.id for task in tasks.values() if task.placement is not None]
                self._stop(ray, tasks, records)
                where = f"during cell {', '.join(running)}" if running else "between cells"
                signal_name = "SIGTERM" if terminated else "SIGINT"
                raise runner.RunInterrupted(
                    f"run stopped by {signal_name} {where}; finished records are in {self.run_dir}", signal_name
                ) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            for handle in tasks:  # a driver error: leave nothing running on the cluster
                ray.cancel(handle, force=False)
        return [records[index] for index in sorted(records)]

    # --- following the tasks -------------------------------------------------------------------

    def _follow(self, ray: Any, tasks: dict[Any, _Task], records: dict[int, dict[str, Any]], deadline: float | None = None) -> None:
        """Take the tasks' items as they come until every task ended (or `deadline`, a monotonic time)."""
        while tasks and (deadline is None or time.monotonic() < deadline):
            ready, _ = ray.wait(list(tasks), num_returns=1, timeout=POLL_S)
            for handle in ready:
                task = tasks[handle]
                try:
                    items = self._items(ray, handle)
                except Exception as error:  # the task ended without its record: a Ray failure
                    del tasks[handle]
                    record = self._ray_failure(task, error)
                    if record is not None:
                        records[task.index] = self._finish(task, record)
                    continue
                if any([self._take(task, item) for item in items]):
                    del tasks[handle]
                    records[task.index] = self._finish(task, self._final_record(task))

    def _items(self, ray: Any, handle: Any) -> list[dict[str, Any]]:
        """The task's next item (streaming), or all its items (when it ended, without streaming)."""
        if not self.stream:
            return ray.get(handle)
        try:
            return [ray.get(next(handle))]
        except StopIteration:  # ended without its last item
            return [{"kind": "done", "returncode": None, "last_phase": None, "record": None}]

    def _take(self, task: _Task, item: dict[str, Any]) -> bool:
        """Act on one item of a task; True when it was the last one."""
        kind = item.get("kind")
        if kind == "placement":
            self._started(task, item["fields"])
        elif kind == "event":
            task.last_phase = item["event"].get("phase", task.last_phase)
            self.listener.cell_event(task.cell, item["event"])
        elif kind == "log":
            self._log(task.cell, item["text"])
        elif kind == "checkpoint":
            task.checkpoint = {**(task.placement or {}), **item["record"]}
            self._write(task, task.checkpoint)
        elif kind == "done":
            task.returned = item
            return True
        return False

    def _started(self, task: _Task, placement: dict[str, Any]) -> None:
        task.placement = placement
        task.attempt = results.claim_record(results.record_path(self.run_dir, task.cell.id))  # older attempts' writes refused
        results.record_path(self.run_dir, task.cell.id).unlink(missing_ok=True)
        self._log(task.cell, runner.log_header(task.cell))
        self.listener.cell_started(task.cell, task.index, len(self.cells))
        gpus = placement.get("env.ray.gpu_ids")
        where = f"{placement.get('env.hostname')}" + (f" gpu {gpus}" if gpus else "")
        self.listener.cell_event(task.cell, {"event": "slot", "slot": where})

    def _log(self, cell: Cell, text: str) -> None:
        log_path = self.run_dir / "logs" / f"{cell.id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log:  # appended: a resumed cell keeps its earlier log
            log.write(text)

    # --- the record of each cell ---------------------------------------------------------------

    def _final_record(self, task: _Task) -> dict[str, Any]:
        """The record the cell wrote, or (if its process died or was stopped first) a failure or
        interruption record keeping every figure of its last checkpoint."""
        returned = task.returned or {}
        written = returned.get("record")
        if written is not None and written.get("status") not in (None, "running"):
            record = {**(task.placement or {}), **written}
        else:
            partial = written or task.checkpoint
            record = self._crash_record(task.cell, returned.get("returncode"), returned.get("last_phase"), partial, self._stopping)
            record = {**record, **(task.placement or {})}
        if returned.get("wall_s") is not None:  # measured on the worker, as the local runner measures it
            record.update(wall_split(record, returned["wall_s"]))
        return record

    def _ray_failure(self, task: _Task, error: BaseException) -> dict[str, Any] | None:
        """The record of a cell whose task ended without handing back its record: its worker or node died,
        Ray could not run it, or it was cancelled because the run was interrupted (None when it was
        cancelled before it started: a cell that never ran has no record, as in a local run)."""
        error_type = ray_error_type(error)
        interrupted = self._stopping and error_type in ("Interrupted", "RayWorkerDied")
        if interrupted and task.placement is None:
            return None
        phase = (task.checkpoint or {}).get("last_phase") or task.last_phase or "start"
        record = self._crash_record(task.cell, None, phase, task.checkpoint, interrupted)
        record.update(task.placement or {"env.cuda_visible_devices": None})
        if not interrupted:
            where = (task.placement or {}).get("env.hostname")
            cause = getattr(error, "cause", None) or error
            message = " ".join(f"{type(cause).__name__}: {cause}".split())
            record.update({
                "error_type": error_type,
                "error": (f"the Ray task of cell {task.cell.id} ended without its record "
                          + (f"on {where} (last phase: {phase})" if where else "before the cell started")
                          + f": {message}")[:2000],
            })
        return record

    def _write(self, task: _Task, record: dict[str, Any]) -> None:
        """The cell's record into the run folder, while this run's attempt at the cell is the current one."""
        path = results.record_path(self.run_dir, task.cell.id)
        if task.attempt is None:
            task.attempt = results.claim_record(path)
        try:
            results.write_record(path, record, task.attempt)
        except results.Superseded:
            pass  # a newer attempt (another command's) owns the record now

    def _finish(self, task: _Task, record: dict[str, Any]) -> dict[str, Any]:
        self._write(task, record)
        if task.placement is None:  # never started on a worker: the listener hears of it all the same
            self.listener.cell_started(task.cell, task.index, len(self.cells))
        self._log(task.cell, runner.log_footer(task.cell, record))
        self.listener.cell_finished(task.cell, record)
        return record

    # --- interruption --------------------------------------------------------------------------

    def _stop(self, ray: Any, tasks: dict[Any, _Task], records: dict[int, dict[str, Any]]) -> None:
        """Cancel every task: those not started never will; a running one stops its cell (recorded
        `interrupted`). Waits for them; a second Ctrl-C or SIGTERM kills their workers at once."""
        self._stopping = True
        for handle in tasks:
            ray.cancel(handle, force=False)
        try:
            self._follow(ray, tasks, records, deadline=time.monotonic() + STOP_WAIT_S)
        except KeyboardInterrupt:
            for handle in tasks:
                ray.cancel(handle, force=True)
        for handle, task in list(tasks.items()):  # not ended yet: recorded from their last checkpoint
            del tasks[handle]
            record = self._ray_failure(task, ray.exceptions.TaskCancelledError())
            if record is not None:
                records[task.index] = self._finish(task, record)


def ray_error_type(error: BaseException) -> str:
    """The record's error_type for a Ray exception (RAY_ERROR_TYPES; Ray wraps an error raised inside the
    task as RayTaskError(<its type>))."""
    names = [cls.__name__ for cls in type(error).__mro__]
    mapped = next((RAY_ERROR_TYPES[name] for name in names if name in RAY_ERROR_TYPES), None)
    if mapped:
        return mapped
    return "RayTaskError" if "RayTaskError" in names else f"Ray{names[0]}".replace("RayRay", "Ray")
