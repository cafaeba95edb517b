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
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from qbench.cell.measure.timing import wall_split
from qbench.contract import records as results
from qbench.contract.suite import Cell, SuiteError
from qbench.runner import launch
from qbench.runner.executors.base import Executor, Placement, Request
from qbench.runner.executors.ray_task import cell_task, collected_cell_task, spec_dict
from qbench.runner.launch import CELL, Target
from qbench.runner.plan import COMMAND_LINE
from qbench.runner.runner import log_footer, log_header

if TYPE_CHECKING:
    from qbench.runner.runner import Run

INSTALL_HINT = 'pip install "qbench[ray]"'
LOCAL = "local"  # --ray-address local: a private single-machine cluster for this run
CONNECT_TIMEOUT_S = 5.0  # an unreachable head is refused after this, not after Ray's own two minutes
STOP_WAIT_S = launch.CHILD_STOP_GRACE_S + 30  # how long an interrupted run waits for its running tasks
POLL_S = 0.2
CATCH_UP_S = 1.0  # on a stop, how long the items the tasks already sent are read before they are cancelled
# The driver's settings a cell on another machine must see too (thread counts, offline mode, caches,
# qbench's own); anything machine-specific (PATH, CUDA_VISIBLE_DEVICES, ...) stays behind.
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


def check_reachable(address: str, timeout_s: float | None = None) -> None:
    """SuiteError (one line, within about `timeout_s` per step) unless a Ray cluster answers at the address:
    something listens at its host and port, speaks gRPC (HTTP/2, as Ray's GCS and Ray Client servers do),
    and, for a GCS address, answers GCS's first question. Ray itself would retry for minutes, or forever at
    a port where another service listens. `timeout_s` None: CONNECT_TIMEOUT_S."""
    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port or parts.scheme not in ("", "ray"):
        raise SuiteError(COMMAND_LINE, [
            f"--ray-address {address!r}: expected auto, local, HOST:PORT (the head's GCS, e.g. 10.0.0.1:6379) or "
            "ray://HOST:PORT (Ray Client, e.g. ray://10.0.0.1:10001)"
        ])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as connection:
            answer = _http2_answer(connection, timeout_s)
    except OSError as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise SuiteError(COMMAND_LINE, [f"--ray-address {address}: cannot reach a Ray cluster at {host}:{port}: {reason}"]) from None
    if answer is not None:
        raise SuiteError(COMMAND_LINE, [f"--ray-address {address}: something listens at {host}:{port}, but no Ray cluster answers "
                                        f"there ({answer}); give the head's GCS address (ray start prints it) or ray://HOST:PORT"])
    problem = _ray_service_problem(f"{host}:{port}", parts.scheme == "ray", timeout_s)
    if problem:
        raise SuiteError(COMMAND_LINE, [f"--ray-address {address}: no Ray cluster answers at {host}:{port} ({problem})"])


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS frame


def _http2_answer(connection: socket.socket, timeout_s: float) -> str | None:
    """None when the server at the other end of `connection` answers the HTTP/2 preface with a SETTINGS frame
    (every gRPC server does, Ray's among them), else what it did instead, in words."""
    connection.settimeout(timeout_s)
    try:
        connection.sendall(HTTP2_PREFACE)
        received = b""
        while len(received) < 9:
            chunk = connection.recv(9 - len(received))
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        return f"it did not answer the gRPC handshake in {timeout_s:g} s"
    except OSError as error:
        return f"it closed the connection: {error.strerror or error}"
    if len(received) == 9 and received[3] == 4:  # frame type 4: SETTINGS
        return None
    if not received:
        return "it closed the connection without a word"
    try:  # the rest of its first line, for the message
        while b"\n" not in received and len(received) < 80 and (chunk := connection.recv(80 - len(received))):
            received += chunk
    except OSError:
        pass
    said = received.split(b"\n")[0].strip().decode("ascii", "replace")
    shown = repr(said) if said.isprintable() else f"bytes {received.hex()}"
    return f"it does not speak gRPC; it said {shown}"


def _ray_service_problem(target: str, client: bool, timeout_s: float) -> str | None:
    """Why the gRPC server at `target` is not what a Ray address names (a GCS; with `client`, a Ray Client
    server): the first question Ray asks it (GCS GetClusterId, Ray Client's ping) is not answered within
    `timeout_s`. None when it is, or where this Ray keeps no such call."""
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc, ray_client_pb2, ray_client_pb2_grpc
    except ImportError:
        return None
    # no such method, no answer in time, no HTTP/2 peer: another service; any other refusal (UNAUTHENTICATED:
    # a server that wants the token ray.init brings) comes from Ray
    not_ray = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    channel = grpc.insecure_channel(target)
    try:
        if client:
            what = "Ray Client's ping"
            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(
                ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), timeout=timeout_s)
        else:
            what = "GetClusterId, the first thing Ray asks its GCS,"
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
    except grpc.RpcError as error:
        code = error.code() if callable(getattr(error, "code", None)) else None
        if code not in not_ray:
            return None
        details = error.details() if callable(getattr(error, "details", None)) else ""
        return f"{what} gave {code.name}" + (f": {details}" if details else "")
    except Exception:  # a Ray whose protocol moved on: ray.init says what is wrong
        return None
    finally:
        channel.close()
    return None


def _auto_address() -> str | None:
    """The GCS address `--ray-address auto` means, as Ray finds it; None where it finds none (ray.init then
    says so at once) or this Ray cannot say."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address("auto")
    except Exception:  # none found, or a Ray whose internals moved: ray.init decides
        return None


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
        if address == "auto":  # the cluster Ray finds for itself ($RAY_ADDRESS, the last `ray start` here): probed too
            found = _auto_address()
            if found:
                check_reachable(found)
        elif address != LOCAL:
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


class RayExecutor(Executor):
    """Each cell a Ray task on a Ray cluster; records, logs and run.json as a local run writes them."""

    name = "ray"
    places_cells = True
    OPTIONS = {"address": "--ray-address", "cpus_per_cell": "--cpus-per-cell"}
    cell: ClassVar[Target] = CELL  # what each task's cell process runs

    def __init__(self, address: str | None = None, cpus_per_cell: float | None = None, stream: bool | None = None,
                 resources: CellResources | None = None):
        self.address = address
        self.cpus_per_cell = cpus_per_cell
        # True: each task streams its items as they come (progress, checkpoints, log); False: a task hands
        # them all back when it ends (Ray Client); None: streams unless connected through Ray Client
        self.stream = stream
        self.resources = resources or CellResources(0.0, cpus_per_cell or 1.0)  # what each cell's task asks for
        self.cluster: Cluster | None = None
        self.run: Run | None = None  # the run whose cells run now

    def placement_problems(self, gpus: str | None, gpus_per_cell: float, device: str, parallel: int) -> list[str]:
        """Ray picks the GPUs and places the cells; a cell asks for a whole number of GPUs, or a share of one."""
        problems = []
        if parallel > 1:
            problems.append("--parallel runs cells side by side on this machine's CPU; on Ray, Ray places them")
        if gpus:
            problems.append("--gpus picks GPUs of this machine; on Ray, Ray gives each cell its GPUs (--gpus-per-cell N)")
        if not gpus_per_cell > 0 or (gpus_per_cell > 1 and gpus_per_cell != int(gpus_per_cell)):
            problems.append(f"--gpus-per-cell {gpus_per_cell:g}: a whole number of GPUs, or a share of one (0.5: two cells per GPU)")
        elif device == "cpu" and gpus_per_cell != 1:
            problems.append("--gpus-per-cell: cells on --device cpu take no GPU")
        if self.cpus_per_cell is not None and not self.cpus_per_cell > 0:
            problems.append(f"--cpus-per-cell {self.cpus_per_cell:g}: must be more than 0")
        return problems

    def cores_per_cell(self) -> int | None:
        return max(1, int(self.cpus_per_cell or 1))  # a cell's threads default to the CPUs its task asks for

    def check(self, request: Request) -> str:
        request.check(None)
        return "a Ray cluster"

    def prepare(self, request: Request) -> Placement:
        """Check the suite (no memory check: the cells run on the cluster's nodes), join the cluster, settle the
        device (auto: cuda when the cluster has GPUs) and what each cell asks for; SuiteError when no node has
        room for one cell (checked before any folder is made)."""
        request.check(None)
        self.cluster = connect(self.address)
        try:
            device = request.device
            if device == "auto":
                device = "cuda" if self.cluster.has_gpus() else "cpu"
            self.resources = cell_resources(device, request.gpus_per_cell, self.cpus_per_cell or 1.0)
            self.cluster.check_fits(self.resources)
        except BaseException:
            self.close()
            raise
        total = ", ".join(f"{self.cluster.resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
        where = (f"{device}, Ray at {self.cluster.address} ({len(self.cluster.nodes)} node(s), {total}; "
                 f"{self.resources.describe()} per cell)")
        return Placement(device=device, where=where, threads=request.threads, manifest={"ray": self.cluster.manifest(self.resources)})

    def close(self, run_dir: Path | None = None) -> None:
        if self.cluster is not None:
            disconnect(self.cluster)
            self.cluster = None

    def run_cells(self, run: Run) -> list[dict[str, Any]]:
        """Submit every cell, write each record as its task ends; a failed cell or task is recorded and the
        run goes on. Ctrl-C / SIGTERM cancels the tasks not started and stops the running cells (recorded
        `interrupted`)."""
        ray = import_ray()
        self.run = run
        if self.stream is None:  # Ray Client (ray://) cannot stream a task's items
            self.stream = not ray.util.client.ray.is_connected()
        remote = ray.remote(cell_task if self.stream else collected_cell_task)
        options = {**self.resources.options(), "max_retries": 0, "retry_exceptions": False}
        if self.stream:
            options["num_returns"] = "streaming"
        target = None if self.cell == CELL else (self.cell.module, self.cell.function)
        env = forwarded_env(run.env)
        tasks: dict[Any, _Task] = {}
        records: dict[int, dict[str, Any]] = {}
        try:
            try:
                for index, cell in enumerate(run.cells):
                    spec = spec_dict(run.spec(cell))
                    handle = remote.options(**options, name=f"qbench {run.loaded.suite.name} {cell.id}").remote(spec, env, target)
                    tasks[handle] = _Task(cell, index)
                self._follow(ray, tasks, records)
            except KeyboardInterrupt:
                try:  # first what the tasks said already: a cell placed on a worker is one to stop and record
                    self._follow(ray, tasks, records, deadline=time.monotonic() + CATCH_UP_S)
                except KeyboardInterrupt:
                    pass
                run.stop_requested()  # the cells placed on a worker are the running ones
                self._stop(ray, tasks, records)
                raise
        finally:
            for handle in tasks:  # a driver error: leave nothing running on the cluster
                ray.cancel(handle, force=False)
        return [records[index] for index in sorted(records)]

    # --- following the tasks -------------------------------------------------------------------

    def _follow(self, ray: Any, tasks: dict[Any, _Task], records: dict[int, dict[str, Any]], deadline: float | None = None) -> None:
        """Take the tasks' items as they come until every task ended (or `deadline`, a monotonic time)."""
        while tasks and (deadline is None or time.monotonic() < deadline):
            ready, _ = ray.wait(list(tasks), num_returns=len(tasks), timeout=POLL_S)  # every ready task, in turn
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
            self.run.listener.cell_event(task.cell, item["event"])
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
        task.attempt = results.claim_record(results.record_path(self.run.run_dir, task.cell.id))  # older attempts' writes refused
        results.record_path(self.run.run_dir, task.cell.id).unlink(missing_ok=True)
        self._log(task.cell, log_header(task.cell))
        gpus = placement.get("env.ray.gpu_ids")
        self.run.cell_started(task.cell, task.index, f"{placement.get('env.hostname')}" + (f" gpu {gpus}" if gpus else ""))

    def _log(self, cell: Cell, text: str) -> None:
        log_path = self.run.run_dir / "logs" / f"{cell.id}.log"
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
            record = self.run.named_stop({**(task.placement or {}), **written})
        else:
            partial = written or task.checkpoint
            record = self.run.crash_record(task.cell, returned.get("returncode"), returned.get("last_phase"), partial, self.run.stopping)
            record = {**record, **(task.placement or {})}
        if returned.get("wall_s") is not None:  # measured on the worker, as the local runner measures it
            record.update(wall_split(record, returned["wall_s"]))
        return record

    def _ray_failure(self, task: _Task, error: BaseException) -> dict[str, Any] | None:
        """The record of a cell whose task ended without handing back its record: its worker or node died,
        Ray could not run it, or it was cancelled because the run was interrupted (None when it was
        cancelled before it started: a cell that never ran has no record, as in a local run)."""
        error_type = ray_error_type(error)
        interrupted = self.run.stopping and error_type in ("Interrupted", "RayWorkerDied")
        if interrupted and task.placement is None:
            return None
        phase = (task.checkpoint or {}).get("last_phase") or task.last_phase or "start"
        record = self.run.crash_record(task.cell, None, phase, task.checkpoint, interrupted)
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
        path = results.record_path(self.run.run_dir, task.cell.id)
        if task.attempt is None:
            task.attempt = results.claim_record(path)
        try:
            results.write_record(path, record, task.attempt)
        except results.Superseded:
            pass  # a newer attempt (another command's) owns the record now

    def _finish(self, task: _Task, record: dict[str, Any]) -> dict[str, Any]:
        self._write(task, record)
        if task.placement is None:  # never started on a worker: the listener hears of it all the same
            self.run.cell_started(task.cell, task.index)
        self._log(task.cell, log_footer(task.cell, record))
        self.run.cell_finished(task.cell, record)
        return record

    # --- interruption --------------------------------------------------------------------------

    def _stop(self, ray: Any, tasks: dict[Any, _Task], records: dict[int, dict[str, Any]]) -> None:
        """Cancel every task: those not started never will; a running one stops its cell (recorded
        `interrupted`). Waits for them; a second Ctrl-C or SIGTERM kills their workers at once."""
        self.run.stopping = True
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
