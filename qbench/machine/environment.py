"""Where a record was measured: package versions, device, driver, git commit, host."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from qbench.machine import cpuinfo

# every library whose version can move a figure (pillow draws the builtin images, numpy their noise, tokenizers and
# safetensors read the model), so that two records that differ can be traced to what differed
PACKAGES = ("qbench", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "pandas", "nvidia-ml-py", "pillow",
            "numpy", "tokenizers", "safetensors")
# CPU instruction-set flags that choose which kernels torch (ATen, oneDNN) and bitsandbytes run on a CPU
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    return cpuinfo.model()


def cpu_isa_flags() -> str | None:
    """The ISA_FLAGS this CPU has, comma-separated ("" when none; None where /proc/cpuinfo cannot be read)."""
    present = cpuinfo.flags()
    return None if present is None else ",".join(flag for flag in ISA_FLAGS if flag in present)


def git_commit() -> str | None:
    """The commit of the qbench source tree, with '+dirty' when it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def run_facts() -> dict[str, Any]:
    """The `env.*` fields that stay the same for every cell of a run (package versions, git commit, CPU
    model), looked up once per process: the run's fork server looks them up before forking any cell."""
    from qbench.machine.memo import memo

    def look_up() -> dict[str, Any]:
        fields: dict[str, Any] = {f"env.{name}_version": version for name, version in package_versions().items()}
        fields.update({
            "env.python_version": platform.python_version(),
            "env.hostname": socket.gethostname(),
            "env.git_commit": git_commit(),
            "env.cpu_model": cpu_model(),
        })
        return fields

    return dict(memo(("environment facts",), look_up))


def describe(device: str) -> dict[str, Any]:
    """Flat `env.*` fields for a record (imports torch: call it in a cell's process)."""
    import torch

    from qbench.machine.threads import available_cores

    fields: dict[str, Any] = run_facts()
    fields.update(
        {
            "env.torch_threads": torch.get_num_threads(),  # intra-op threads the cell computes with
            "env.pid": os.getpid(),  # the cell's own process: each cell runs in a fresh one
            # the kernels a CPU computes with: figures are bit-identical run to run only on the same level
            # (wider vectors sum in another order; docs/reports-and-gate.md, "Reproducible baselines")
            "env.torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "env.cpu_isa_flags": cpu_isa_flags(),
            "env.cpu_cores_available": available_cores(),
            "env.device": device,
            "env.cuda_version": torch.version.cuda,
            "env.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        fields["env.device_name"] = torch.cuda.get_device_name(index)
        fields["env.device_total_memory_bytes"] = torch.cuda.get_device_properties(index).total_memory
        fields["env.cuda_device_count"] = torch.cuda.device_count()
        try:
            import pynvml

            pynvml.nvmlInit()
            fields["env.cuda_driver_version"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as error:
            fields["env.cuda_driver_version"] = None
            fields["env.cuda_driver_unavailable_reason"] = f"{type(error).__name__}: {error}"
    else:
        fields["env.device_name"] = cpu_model()
        fields["env.device_total_memory_bytes"] = None
        fields["env.cuda_driver_version"] = None
    return fields


def machine_report(device: str = "auto", compute_dtype: str = "auto", timeout_s: float = 600) -> dict[str, Any]:
    """Everything `qbench env` shows: versions, machine, and (from a probe process) torch, CUDA, NVML
    and which weight formats work on `device`; this process never imports torch."""
    report: dict[str, Any] = {
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "git_commit": git_commit(),
        "environment": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")},
    }
    from qbench.contract.protocol import child_env

    env = child_env()
    try:
        probe = subprocess.run(
            [sys.executable, "-m", "qbench.cell.probe", "--device", device, "--compute-dtype", compute_dtype],
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )
    except subprocess.TimeoutExpired:
        report["probe_error"] = f"the probe process did not finish in {timeout_s:.0f} s"
        return report
    lines = [line for line in probe.stdout.splitlines() if line.startswith("{")]
    if probe.returncode != 0 or not lines:
        report["probe_error"] = f"the probe process exited with code {probe.returncode}: {probe.stderr.strip()[-800:]}"
        return report
    report.update(json.loads(lines[-1]))
    return report
