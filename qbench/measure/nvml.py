"""NVML readings (nvidia-ml-py): this process's own GPU memory and the device's used memory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


def _visible_index(device: str) -> int | str:
    """The NVML index (or GPU-/MIG- UUID) of a torch device string, honouring CUDA_VISIBLE_DEVICES
    (qbench --gpus sets it per cell; CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA's order NVML's)."""
    ordinal = int(device.split(":", 1)[1]) if ":" in device else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if ordinal < len(entries):
            return int(entries[ordinal]) if entries[ordinal].isdigit() else entries[ordinal]
    return ordinal


@dataclass
class NvmlSource:
    """One GPU seen through NVML; `available` is False with a reason when NVML cannot be used."""

    available: bool
    unavailable_reason: str = ""
    description: str = ""
    pids: set[int] = field(default_factory=set)
    _pynvml: Any = None
    _handle: Any = None

    @classmethod
    def open(cls, device: str, pynvml: Any = None) -> NvmlSource:
        try:
            if pynvml is None:
                import pynvml  # provided by nvidia-ml-py
            pynvml.nvmlInit()
            which = _visible_index(device)
            if isinstance(which, str):
                handle = pynvml.nvmlDeviceGetHandleByUUID(which)
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(which)
        except Exception as error:  # NVML missing, no driver, bad index: all mean "not measured"
            return cls(False, unavailable_reason=f"unavailable: {type(error).__name__}: {error}")
        return cls(
            True,
            description="nvidia-ml-py: per-process used GPU memory (this process and its children) and device used memory, sampled",
            pids={os.getpid()},
            _pynvml=pynvml,
            _handle=handle,
        )

    def process_used_bytes(self) -> int | None:
        import psutil

        try:
            me = psutil.Process(os.getpid())
            pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
        except psutil.Error:
            pids = {os.getpid()}
        total, seen = 0, False
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                processes = getattr(self._pynvml, getter)(self._handle)
            except Exception:
                continue
            for process in processes:
                if process.pid in pids and process.usedGpuMemory is not None:
                    total += int(process.usedGpuMemory)
                    seen = True
        return total if seen else None

    def device_used_bytes(self) -> int | None:
        try:
            return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except Exception:
            return None

    def close(self) -> None:
        if self.available:
            try:
                self._pynvml.nvmlShutdown()
            except Exception:
                pass
