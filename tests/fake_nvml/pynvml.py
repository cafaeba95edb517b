"""A stand-in for nvidia-ml-py's `pynvml`, driven by files, so the NVML path runs without a GPU.

Put this folder first on PYTHONPATH and `import pynvml` finds it, in the test process and in any
process it starts (the memory sampler, a child that plants a spike). The state lives in the folder
named by $QBENCH_FAKE_NVML_DIR:

    devices.json      {"driver_version": ..., "devices": [{"uuid", "name", "total_bytes", "reserved_bytes"}, ...]}
                      listed in PCI bus order, as NVML numbers them
    procs/<pid>.json  {"device": index, "used_bytes": n, "lists": ["compute", "graphics", "mps"], "watched": bool}
    seen/<pid>.<reader pid>   written the first time a process reads a watched entry: the reader's
                      time.monotonic() then (a system-wide clock on Linux), so that a test can hold a spike
                      until the reader it is about has seen it, however busy the machine is
    read-kinds/<pid>.<reader pid>.<kind>   the same per way of reading it (kind: processes, memory)

Like NVML, a device's `used` is its reserve plus every listed process; only live PIDs are listed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

STATE_ENV = "QBENCH_FAKE_NVML_DIR"


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_InvalidArgument(NVMLError):
    pass


class NVMLError_NotFound(NVMLError):
    pass


# ---- test-side controls ----

def configure(folder: Path | str, devices: list[dict], driver_version: str = "550.54.15") -> None:
    folder = Path(folder)
    (folder / "procs").mkdir(parents=True, exist_ok=True)
    (folder / "seen").mkdir(exist_ok=True)
    _write(folder / "devices.json", {"driver_version": driver_version, "devices": devices})


def set_usage(pid: int, used_bytes: int, device: int = 0, lists: tuple[str, ...] = ("compute",), folder: Path | str | None = None,
              watched: bool = False) -> None:
    """List `pid` with `used_bytes`; `watched`: note who reads it (seen_by) from now on."""
    state = _state(folder)
    if watched:
        for old in [*(state / "seen").glob(f"{pid}.*"), *(state / "read-kinds").glob(f"{pid}.*")]:
            old.unlink(missing_ok=True)
    entry = {"device": device, "used_bytes": used_bytes, "lists": list(lists), "watched": watched}
    _write(state / "procs" / f"{pid}.json", entry)


def clear_usage(pid: int, folder: Path | str | None = None) -> None:
    (_state(folder) / "procs" / f"{pid}.json").unlink(missing_ok=True)


def seen_by(pid: int, folder: Path | str | None = None, kinds: tuple[str, ...] | None = None) -> dict[int, float]:
    """The processes that have read `pid`'s watched entry since it was set: reader pid -> when it first did;
    with `kinds`, only those that have read it each of these ways, and when they first had."""
    if kinds:
        times: dict[int, dict[str, float]] = {}
        for path in (_state(folder) / "read-kinds").glob(f"{pid}.*.*"):
            try:
                _, reader, kind = path.name.split(".")
                times.setdefault(int(reader), {})[kind] = float(path.read_text())
            except (OSError, ValueError):  # being written, or a temporary file
                continue
        return {reader: max(found.values()) for reader, found in times.items() if set(kinds) <= set(found)}
    seen = {}
    for path in (_state(folder) / "seen").glob(f"{pid}.*"):
        try:
            seen[int(path.suffix[1:])] = float(path.read_text())
        except (OSError, ValueError):  # being written
            continue
    return seen


def wait_until_seen(pid: int, reader=lambda reader_pid: True, timeout_s: float = 60.0,
                    kinds: tuple[str, ...] | None = None) -> float | None:
    """Wait until a reader that `reader(pid)` accepts has read `pid`'s watched entry (each of `kinds` ways); when
    it first did, or None after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [when for reader_pid, when in seen_by(pid, kinds=kinds).items() if reader(reader_pid)]
        if found:
            return min(found)
        time.sleep(0.001)
    return None


def _write(path: Path, data: dict) -> None:
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)  # a reader sees the old state or the new one, never half


def _state(folder: Path | str | None = None) -> Path:
    if folder is not None:
        return Path(folder)
    if STATE_ENV not in os.environ:
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
    return Path(os.environ[STATE_ENV])


# ---- the pynvml API qbench uses ----

_initialised = 0


def _devices() -> list[dict]:
    return json.loads((_state() / "devices.json").read_text())["devices"]


def nvmlInit() -> None:
    global _initialised
    if not (_state() / "devices.json").is_file():
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
    _initialised += 1


def nvmlShutdown() -> None:
    global _initialised
    _initialised = max(0, _initialised - 1)


def _check() -> None:
    if not _initialised:
        raise NVMLError("Uninitialized")


def nvmlSystemGetDriverVersion() -> str:
    _check()
    return json.loads((_state() / "devices.json").read_text())["driver_version"]


def nvmlDeviceGetCount() -> int:
    _check()
    return len(_devices())


def nvmlDeviceGetHandleByIndex(index: int) -> SimpleNamespace:
    _check()
    if not 0 <= index < len(_devices()):
        raise NVMLError_InvalidArgument("Invalid Argument")
    return SimpleNamespace(index=index)


def nvmlDeviceGetHandleByUUID(uuid: str) -> SimpleNamespace:
    _check()
    for index, device in enumerate(_devices()):
        if device["uuid"] == uuid:
            return SimpleNamespace(index=index)
    raise NVMLError_NotFound("Not Found")


def nvmlDeviceGetUUID(handle: SimpleNamespace) -> str:
    return _devices()[handle.index]["uuid"]


def nvmlDeviceGetName(handle: SimpleNamespace) -> str:
    return _devices()[handle.index]["name"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _entries(index: int, kind: str) -> list[tuple[int, dict]]:
    entries = []
    for path in (_state() / "procs").glob("*.json"):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):  # removed between listing and reading
            continue
        pid = int(path.stem)
        if entry["device"] == index and _alive(pid):
            entries.append((pid, entry))
            if entry.get("watched"):
                _note_reader(pid, kind)
    return entries


READ_KINDS = ("processes", "memory")  # a process list; the device's used memory


def _note_reader(pid: int, kind: str) -> None:
    """Leave seen/<pid>.<this process> with the time, once per watched entry and reader, and read-kinds/<pid>.<this
    process>.<kind> likewise per way of reading it (`seen_by(pid, kinds=READ_KINDS)`: read both ways. A sampler
    reads the process lists, then the device's memory: a spike set between the two is in the second only, and
    one cleared as soon as the lists had it would be missing from the device's figure)."""
    kinds = _state() / "read-kinds"
    kinds.mkdir(exist_ok=True)
    marker = kinds / f"{pid}.{os.getpid()}.{kind}"
    if not marker.exists():
        marker.write_text(repr(time.monotonic()))
    path = _state() / "seen" / f"{pid}.{os.getpid()}"
    if not path.exists():
        now = time.monotonic()
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(repr(now))
        os.replace(temporary, path)


def _processes(handle: SimpleNamespace, kind: str) -> list[SimpleNamespace]:
    _check()
    return [
        SimpleNamespace(pid=pid, usedGpuMemory=entry["used_bytes"])
        for pid, entry in _entries(handle.index, "processes")
        if kind in entry["lists"]
    ]


def nvmlDeviceGetComputeRunningProcesses(handle: SimpleNamespace) -> list[SimpleNamespace]:
    return _processes(handle, "compute")


def nvmlDeviceGetGraphicsRunningProcesses(handle: SimpleNamespace) -> list[SimpleNamespace]:
    return _processes(handle, "graphics")


def nvmlDeviceGetMPSComputeRunningProcesses(handle: SimpleNamespace) -> list[SimpleNamespace]:
    return _processes(handle, "mps")


def nvmlDeviceGetMemoryInfo(handle: SimpleNamespace) -> SimpleNamespace:
    _check()
    device = _devices()[handle.index]
    per_pid: dict[int, int] = {}
    for pid, entry in _entries(handle.index, "memory"):
        per_pid[pid] = entry["used_bytes"] or 0
    used = device.get("reserved_bytes", 0) + sum(per_pid.values())
    return SimpleNamespace(total=device["total_bytes"], used=used, free=device["total_bytes"] - used)
