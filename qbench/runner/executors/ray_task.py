"""What one Ray task does on its worker: run one cell in its own process, exactly as the local runner
does, and stream back where it runs, its progress, its record checkpoints, its log and how it ended.

The driver (`qbench.runner.executors.ray_executor`) turns the stream into the run folder; nothing here touches it,
so a cell on another machine needs no shared file system for its results. Ray is imported only for
the runtime context of the task; the function runs as a plain generator too (tests, no Ray).
"""

from __future__ import annotations

import os
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qbench.contract import records as results
from qbench.contract.protocol import CellSpec, child_env
from qbench.runner.launch import CELL, CellProcess, Target

POLL_S = 0.2  # how often the task looks at the cell's log and checkpoint, and lets a cancellation in
LOG_CHUNK_CHARS = 64 * 1024  # larger log output goes back in several items

# The items a task yields, each a dict with "kind":
#   placement   {"fields": {env.* of where the cell runs}}                   first, before the cell starts
#   event       {"event": {...}}   a progress event of the cell (protocol.parse_event)
#   checkpoint  {"record": {...}}  the record as the cell last left it on disk (status running, or final)
#   log         {"text": "..."}    new output of the cell for logs/<cell>.log
#   done        {"returncode": int, "last_phase": str | None, "record": {...} | None, "wall_s": float}    last
#               (wall_s: the cell process's wall time, launch to exit, for its time split)


def placement_fields() -> dict[str, Any]:
    """Where this task runs: `env.executor`, the host, and the Ray node, task and GPUs it was given."""
    fields: dict[str, Any] = {
        "env.executor": "ray",
        "env.hostname": socket.gethostname(),
        "env.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "env.ray.worker_pid": os.getpid(),
    }
    try:
        import ray

        context = ray.get_runtime_context()
        gpu_ids = context.get_accelerator_ids().get("GPU", [])
        fields.update({
            "env.ray.node_id": context.get_node_id(),
            "env.ray.node_ip": ray.util.get_node_ip_address(),
            "env.ray.task_id": context.get_task_id(),
            "env.ray.gpu_ids": ",".join(map(str, gpu_ids)) or None,
        })
    except Exception as error:  # not inside a Ray task (a test calling cell_task directly)
        fields["env.ray.node_id"] = None
        fields["env.ray.unavailable_reason"] = f"{type(error).__name__}: {error}"
    fields.update(gpu_uuids(os.environ))
    return fields


def gpu_uuids(environ: Mapping[str, str], pynvml: Any = None) -> dict[str, Any]:
    """`env.ray.gpu_uuids`: NVML's UUID of each GPU the cell can see, in CUDA_VISIBLE_DEVICES order (the
    cell's cuda:0 first), or None with `env.ray.gpu_uuids_reason`."""
    from qbench.cell.measure import nvml

    visible = [entry for entry in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    if not visible:
        return {"env.ray.gpu_uuids": None, "env.ray.gpu_uuids_reason": "no GPU given to this task"}
    try:
        if pynvml is None:
            import pynvml  # nvidia-ml-py
        pynvml.nvmlInit()
    except Exception as error:
        return {"env.ray.gpu_uuids": None, "env.ray.gpu_uuids_reason": f"NVML cannot start: {type(error).__name__}: {error}"}
    try:
        ordered = {**environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}  # as every cell process runs (protocol.child_env)
        uuids = [nvml.resolve(pynvml, ordinal, environ=ordered).uuid for ordinal in range(len(visible))]
        return {"env.ray.gpu_uuids": ",".join(uuids)}
    except Exception as error:
        return {"env.ray.gpu_uuids": None, "env.ray.gpu_uuids_reason": f"{type(error).__name__}: {error}"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


class _Checkpoint:
    """The cell's record file, read again whenever it changed on disk."""

    def __init__(self, path: Path):
        self.path = path
        self._seen: tuple[int, int] | None = None

    def changed(self) -> dict[str, Any] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        if (stat.st_mtime_ns, stat.st_size) == self._seen:
            return None
        record = results.read_record(self.path)
        if record is not None:
            self._seen = (stat.st_mtime_ns, stat.st_size)
        return record


def cell_task(spec: dict[str, Any], env: Mapping[str, str], target: tuple[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Run the cell `spec` (a `CellSpec` as a dict; its record_path is replaced by one on this machine)
    in a fresh process and yield what it does (see the item kinds above).

    `env` is added to this worker's environment for the cell (the driver forwards its qbench, Hugging
    Face and thread settings); Ray has already set CUDA_VISIBLE_DEVICES to the GPUs it gave the task.
    `target` (module, "module:function") is what the cell process runs; None: this worker's
    `python -m qbench.cell`. When the task is cancelled
    (KeyboardInterrupt) or closed, the cell process is asked to stop and waited for."""
    yield {"kind": "placement", "fields": placement_fields()}
    with tempfile.TemporaryDirectory(prefix="qbench-ray-cell-") as scratch:
        record_path = Path(scratch) / "record.json"
        log_path = Path(scratch) / "cell.log"
        cell_spec = CellSpec(**{**spec, "record_path": str(record_path)})
        with open(log_path, "w", encoding="utf-8") as log, open(log_path, encoding="utf-8") as log_reader:
            launched = time.monotonic()
            cell = CellProcess(cell_spec, child_env(dict(env)), log, Target(*target) if target else CELL, cwd=scratch)
            checkpoint = _Checkpoint(record_path)
            lines: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()

            def pump() -> None:  # a thread reads the cell's output, so the task's own thread never blocks
                try:
                    for event in cell.events():
                        lines.put(event)
                finally:
                    lines.put(None)

            threading.Thread(target=pump, name="qbench-cell-output", daemon=True).start()
            try:
                finished = False
                while not finished:
                    try:
                        event = lines.get(timeout=POLL_S)
                    except queue.Empty:
                        event = {}
                    finished = event is None
                    log.flush()
                    yield from _new_log(log_reader)
                    record = checkpoint.changed()
                    if record is not None:
                        yield {"kind": "checkpoint", "record": record}
                    if event:
                        yield {"kind": "event", "event": event}
                returncode = cell.wait()
                wall_s = time.monotonic() - launched
            finally:
                cell.stop()  # cancelled or closed: the cell records itself interrupted and ends
            log.flush()
            yield from _new_log(log_reader)
            yield {"kind": "done", "returncode": returncode, "last_phase": cell.last_phase,
                   "record": results.read_record(record_path), "wall_s": wall_s}


def collected_cell_task(spec: dict[str, Any], env: Mapping[str, str], target: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """`cell_task`'s items all at once, when the cell ended (for Ray Client, which cannot stream them)."""
    return list(cell_task(spec, env, target))


def _new_log(reader: Any) -> Iterator[dict[str, Any]]:
    while text := reader.read(LOG_CHUNK_CHARS):
        yield {"kind": "log", "text": text}


def spec_dict(spec: CellSpec) -> dict[str, Any]:
    return asdict(spec)
