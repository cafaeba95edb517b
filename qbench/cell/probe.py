"""What this machine can do, tried rather than assumed: torch and CUDA, NVML, and each weight format
(quantize, forward and backward a small layer).

Run in its own process by `qbench env` (`python -m qbench.cell.probe --device cpu`), so that a format
whose kernels crash cannot take the command down and the CLI process never touches CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Any

IN_FEATURES, OUT_FEATURES, BATCH = 256, 128, 8


def _layer(precision: Any, dense: Any, device: str, compute_dtype: str) -> Any:
    """`dense` stored the way `precision` says, on `device` (bitsandbytes quantizes on the move)."""
    import torch

    dtype = getattr(torch, compute_dtype)
    if precision.kind == "dense":
        return copy.deepcopy(dense).to(device=device, dtype=getattr(torch, precision.dense_dtype or compute_dtype))
    import bitsandbytes as bnb

    from qbench.contract.precisions import LLM_INT8_THRESHOLD

    if precision.kind == "int8":
        layer = bnb.nn.Linear8bitLt(IN_FEATURES, OUT_FEATURES, bias=True, has_fp16_weights=False, threshold=LLM_INT8_THRESHOLD)
    else:
        layer = bnb.nn.Linear4bit(
            IN_FEATURES, OUT_FEATURES, bias=True, compute_dtype=dtype,
            quant_type=precision.quant_type, compress_statistics=precision.double_quant,
        )
    layer.load_state_dict({k: v.to(dtype) for k, v in dense.state_dict().items()})
    layer = layer.to(device)
    from qbench.cell.models import disable_bnb_cpu_weight_packing

    disable_bnb_cpu_weight_packing(layer)
    return layer


def probe_format(name: str, device: str, compute_dtype: str = "bfloat16") -> dict[str, Any]:
    """Quantize a 256->128 linear as `name`, run forward and backward; status ok only if all worked and
    the format read back from the layer is the one asked for."""
    import torch

    from qbench.cell.measure import weights
    from qbench.contract import precisions

    precision = precisions.get(name)
    started = time.perf_counter()
    try:
        torch.manual_seed(0)
        dense = torch.nn.Linear(IN_FEATURES, OUT_FEATURES)
        x = torch.randn(BATCH, IN_FEATURES)
        reference = dense(x).detach()
        layer = _layer(precision, dense, device, compute_dtype).requires_grad_(False)
        # the compute dtype: what a 4-bit layer computes in, and what the dense arm (no dense_dtype of its own) stores
        weights.check_format(torch.nn.Sequential(layer), precision, compute_dtype if precision.kind != "int8" else None)
        inputs = x.to(device=device, dtype=getattr(torch, compute_dtype) if precision.quantized else layer.weight.dtype)
        inputs.requires_grad_(True)
        output = layer(inputs)
        output.float().pow(2).mean().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        gradient = inputs.grad
        if gradient is None or not torch.isfinite(gradient).all() or gradient.abs().sum() == 0:
            raise RuntimeError("backward gave no usable gradient to the input")
        error = (output.detach().float().cpu() - reference).norm() / reference.norm()
        if not math.isfinite(error.item()) or error.item() > 0.5:
            raise RuntimeError(f"forward output is off by {error.item():.1%} of the dense layer's")
        return {"status": "ok", "output_rel_error": error.item(), "seconds": time.perf_counter() - started}
    except Exception as failure:  # what fails here is exactly what the report must say
        return {"status": "failed", "error": f"{type(failure).__name__}: {failure}"[:500], "seconds": time.perf_counter() - started}


def torch_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "torch_version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "devices": [],
    }
    if facts["cuda_available"]:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            facts["devices"].append(
                {
                    "torch_device": f"cuda:{index}",
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "total_memory_bytes": props.total_memory,
                    "uuid": str(getattr(props, "uuid", "")) or None,
                    "bf16_supported": torch.cuda.is_bf16_supported(),
                }
            )
        facts["cudnn_version"] = torch.backends.cudnn.version()
    try:
        import bitsandbytes

        facts["bitsandbytes_version"] = bitsandbytes.__version__
    except Exception as error:
        facts["bitsandbytes_error"] = f"{type(error).__name__}: {error}"
    return facts


def nvml_facts(torch_devices: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether NVML works, its devices, and which of them each torch device is."""
    from qbench.cell.measure import nvml

    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:
        return {"available": False, "reason": f"{type(error).__name__}: {error}"}
    try:
        facts: dict[str, Any] = {"available": True, "driver_version": str(pynvml.nvmlSystemGetDriverVersion()), "devices": []}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            device = nvml.NvmlDevice(pynvml, nvml.ResolvedDevice(handle, index, str(pynvml.nvmlDeviceGetUUID(handle)), "", ""))
            try:
                processes = device.process_memory()
                per_process = f"readable ({len(processes)} processes listed)"
            except nvml.NvmlUnavailable as error:
                per_process = f"unavailable: {error}"
            facts["devices"].append(
                {
                    "nvml_index": index,
                    "name": str(pynvml.nvmlDeviceGetName(handle)),
                    "uuid": str(pynvml.nvmlDeviceGetUUID(handle)),
                    "total_bytes": int(memory.total),
                    "used_bytes": int(memory.used),
                    "per_process_memory": per_process,
                }
            )
        for entry in torch_devices:
            ordinal = nvml.device_ordinal(entry["torch_device"])
            try:
                found = nvml.resolve(pynvml, ordinal, entry.get("uuid"))
                entry["nvml_index"], entry["nvml_match"] = found.index, found.how
            except nvml.NvmlUnavailable as error:
                entry["nvml_index"], entry["nvml_match"] = None, f"unavailable: {error}"
        return facts
    finally:
        pynvml.nvmlShutdown()


def collect(device: str, compute_dtype: str = "bfloat16") -> dict[str, Any]:
    from qbench.contract import precisions

    facts = {"torch": torch_facts()}
    facts["nvml"] = nvml_facts(facts["torch"]["devices"])
    facts["formats_device"] = device
    facts["formats_compute_dtype"] = compute_dtype
    facts["formats"] = {name: probe_format(name, device, compute_dtype) for name in precisions.REGISTRY}
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="where the formats are tried: auto, cpu, cuda, cuda:N")
    from qbench.contract import precisions

    parser.add_argument("--compute-dtype", default="auto", choices=("auto", *precisions.DTYPE_NAMES))
    args = parser.parse_args(argv)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from qbench.machine.compute import choose_unmeasured

    choice = choose_unmeasured(args.compute_dtype, device, why="qbench env probes formats, it measures no suite's model")
    facts = collect(device, choice.dtype)
    facts["formats_compute_dtype_reason"] = choice.reason
    sys.stdout.write(json.dumps(facts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
