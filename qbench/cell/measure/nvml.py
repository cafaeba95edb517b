"""NVML readings (nvidia-ml-py): which physical GPU a torch device is, its used memory, and a process tree's share.

Two traps shape this module. torch numbers GPUs fastest-first unless CUDA_DEVICE_ORDER=PCI_BUS_ID,
while NVML always numbers them by PCI bus, so "cuda:0" is NVML device 0 only by luck: the device is
found by the UUID torch reports, else through CUDA_VISIBLE_DEVICES under PCI_BUS_ID ordering, else
not at all. And NVML's device `used` holds every process on the GPU plus the driver's reserve, so
this process's own usage is summed from the per-process lists, each PID counted once even when it
is listed as a compute, a graphics and an MPS process at the same time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

PROCESS_LISTS = (
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetGraphicsRunningProcesses",
    "nvmlDeviceGetMPSComputeRunningProcesses",
)


class NvmlUnavailable(RuntimeError):
    """NVML cannot say anything trustworthy about the device; the message says why."""


def normalize_uuid(uuid: Any) -> str:
    """'GPU-58c3...' (NVML) and '58c3...' (torch) name the same device."""
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    return text.strip().lower().removeprefix("gpu-")


def device_ordinal(device: str) -> int:
    """The index in a torch device string: 'cuda' -> 0, 'cuda:1' -> 1."""
    return int(device.split(":", 1)[1]) if ":" in device else 0


@dataclass(frozen=True)
class ResolvedDevice:
    handle: Any
    index: int  # NVML's (PCI bus) index
    uuid: str
    name: str
    how: str  # how the torch device was matched to this NVML device


def _device_info(pynvml: Any, index: int, how: str) -> ResolvedDevice:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    return ResolvedDevice(handle, index, str(pynvml.nvmlDeviceGetUUID(handle)), str(pynvml.nvmlDeviceGetName(handle)), how)


def _find_by_uuid(pynvml: Any, wanted: str, count: int, how: str) -> ResolvedDevice:
    wanted = normalize_uuid(wanted)
    for index in range(count):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        if normalize_uuid(pynvml.nvmlDeviceGetUUID(handle)).startswith(wanted):  # CUDA accepts UUID prefixes
            return _device_info(pynvml, index, how)
    raise NvmlUnavailable(f"no NVML device has UUID {wanted!r} (a MIG instance, or another container's view?)")


def resolve(pynvml: Any, ordinal: int, torch_uuid: str | None = None, environ: Mapping[str, str] | None = None) -> ResolvedDevice:
    """The NVML device that torch calls cuda:`ordinal`; NvmlUnavailable when that cannot be known."""
    environ = os.environ if environ is None else environ
    count = int(pynvml.nvmlDeviceGetCount())
    if torch_uuid:
        return _find_by_uuid(pynvml, torch_uuid, count, "matched by the UUID torch reports")
    visible = [entry.strip() for entry in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    if "CUDA_VISIBLE_DEVICES" in environ and not visible:
        raise NvmlUnavailable("CUDA_VISIBLE_DEVICES is empty: torch sees no GPU")
    if visible:
        if ordinal >= len(visible):
            raise NvmlUnavailable(f"cuda:{ordinal} does not exist: CUDA_VISIBLE_DEVICES={','.join(visible)}")
        entry = visible[ordinal]
        if entry.upper().startswith("GPU-"):
            return _find_by_uuid(pynvml, entry, count, f"CUDA_VISIBLE_DEVICES entry {entry}")
        if entry.upper().startswith("MIG-"):
            raise NvmlUnavailable(f"cuda:{ordinal} is MIG instance {entry}: NVML does not report per-process memory inside MIG")
        if not entry.isdigit():
            raise NvmlUnavailable(f"cannot read CUDA_VISIBLE_DEVICES entry {entry!r}")
        index, how = int(entry), f"CUDA_VISIBLE_DEVICES position {ordinal} -> index {entry}"
    else:
        index, how = ordinal, f"cuda:{ordinal} -> index {ordinal}"
    if count > 1 and environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        raise NvmlUnavailable(
            f"{count} GPUs and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA numbers them fastest-first, NVML by PCI bus, "
            "so the index does not say which GPU this is (set CUDA_DEVICE_ORDER=PCI_BUS_ID)"
        )
    if index >= count:
        raise NvmlUnavailable(f"NVML sees {count} GPU(s); index {index} does not exist")
    return _device_info(pynvml, index, how + (" (PCI bus order)" if count > 1 else " (the only GPU)"))


class NvmlDevice:
    """One GPU seen through NVML: the device's used memory and the memory of the PIDs a caller owns."""

    description = (
        "nvidia-ml-py: per-process = sum of usedGpuMemory over this process and its descendants (each PID once, "
        "compute, graphics and MPS lists merged); device = nvmlDeviceGetMemoryInfo.used (every process on the GPU "
        "plus the driver's reserve); sampled from a separate process"
    )

    def __init__(self, pynvml: Any, device: ResolvedDevice):
        self._pynvml = pynvml
        self.device = device

    @classmethod
    def open(
        cls, ordinal: int, torch_uuid: str | None = None, environ: Mapping[str, str] | None = None, pynvml: Any = None
    ) -> NvmlDevice:
        """Initialise NVML and find the device; NvmlUnavailable with the reason otherwise."""
        try:
            if pynvml is None:
                import pynvml  # provided by nvidia-ml-py
            pynvml.nvmlInit()
        except Exception as error:  # no library, no driver: "not measured", never a zero
            raise NvmlUnavailable(f"NVML cannot start: {type(error).__name__}: {error}") from None
        try:
            return cls(pynvml, resolve(pynvml, ordinal, torch_uuid, environ))
        except NvmlUnavailable:
            cls._shutdown(pynvml)
            raise
        except Exception as error:
            cls._shutdown(pynvml)
            raise NvmlUnavailable(f"NVML cannot find cuda:{ordinal}: {type(error).__name__}: {error}") from None

    def info(self) -> dict[str, Any]:
        memory = self._pynvml.nvmlDeviceGetMemoryInfo(self.device.handle)
        try:
            driver = str(self._pynvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = None
        return {
            "index": self.device.index,
            "uuid": self.device.uuid,
            "name": self.device.name,
            "matched": self.device.how,
            "total_bytes": int(memory.total),
            "used_at_start_bytes": int(memory.used),
            "driver_version": driver,
        }

    def process_memory(self) -> dict[int, int | None]:
        """PID -> used bytes (None where NVML does not know) over every process list; each PID once."""
        used: dict[int, int | None] = {}
        answered = False
        for getter in PROCESS_LISTS:
            read = getattr(self._pynvml, getter, None)
            if read is None:
                continue
            try:
                processes = read(self.device.handle)
            except Exception:  # one list not supported (e.g. MPS) does not make the others wrong
                continue
            answered = True
            for process in processes:
                value = None if process.usedGpuMemory is None else int(process.usedGpuMemory)
                # the same PID in two lists reports the same per-process total: keep it once, never add
                if process.pid not in used or (value is not None and (used[process.pid] or 0) < value):
                    used[int(process.pid)] = value
        if not answered:
            raise NvmlUnavailable("NVML answers none of the process lists on this device")
        return used

    def process_used_bytes(self, is_mine: Callable[[int], bool]) -> int | None:
        """Bytes used by the PIDs for which `is_mine` is true; None when NVML lists one of them without a figure."""
        total = 0
        for pid, value in self.process_memory().items():
            if is_mine(pid):
                if value is None:
                    return None
                total += value
        return total

    def device_used_bytes(self) -> int:
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self.device.handle).used)

    @staticmethod
    def _shutdown(pynvml: Any) -> None:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass

    def close(self) -> None:
        self._shutdown(self._pynvml)
