"""Which kernels this machine's libraries compute with: torch's BLAS and oneDNN; bitsandbytes' native
library and its CPU paths (int8 matmul, 4-bit dequantization, the fused 4-bit kernel: a hub kernel or the bundled
one); whether transformers may swap layers for hub kernels. A cell's speed and the last digits of its quality
depend on them, so every record carries them (`kernels.*`); what one model's layers ran is the cell's to read
(qbench.cell.readback.kernel_paths)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from qbench.machine.memo import memo

HUB_4BIT_KERNEL = "kernels-community/quantization-bitsandbytes"


def _torch_config(pattern: str) -> str | None:
    import torch

    found = re.search(pattern, torch.__config__.show())
    return found.group(1) if found else None


def torch_facts() -> dict[str, Any]:
    """torch's BLAS, oneDNN and float32 matmul precision (its CPU kernel level is env.torch_cpu_capability)."""
    import torch

    onednn = None
    if torch.backends.mkldnn.is_available():
        onednn = (_torch_config(r"MKL-DNN (v[\d.]+)") or "present") + ("" if torch.backends.mkldnn.enabled else ", disabled")
    return {
        "kernels.torch_blas": _torch_config(r"BLAS_INFO=(\w+)"),
        "kernels.torch_onednn": onednn,
        "kernels.torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def bitsandbytes_facts() -> dict[str, Any]:
    """bitsandbytes' native library and the CPU paths its registered kernels take on this machine."""
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes import cextension
        from bitsandbytes.backends.cpu import ops
    except Exception as error:  # not installed, or it fails to load here: the record says so
        return {"kernels.bnb_native_library": f"unavailable: {type(error).__name__}: {error}"}
    library = getattr(getattr(cextension.lib, "_lib", None), "_name", None)
    avx512 = bool(getattr(ops, "_has_avx512", False))
    if not hasattr(ops, "gemm_4bit_forward_kernel"):
        fused = "not offered: the CPU has no AVX512-BF16"
    elif ops.gemm_4bit_forward_kernel is not None:
        fused = f"hub kernel {HUB_4BIT_KERNEL}"
    else:
        why = ("the kernels package is not installed" if importlib.util.find_spec("kernels") is None else
               "not in the local Hugging Face cache and the hub offline" if os.environ.get("HF_HUB_OFFLINE") == "1" else
               "it failed to load")
        fused = f"bundled in {Path(library).name if library else 'the native library'} (hub kernel {HUB_4BIT_KERNEL}: {why})"
    return {
        "kernels.bnb_native_library": Path(library).name if library else "none (a mock: no native library loaded)",
        "kernels.bnb_cpu_avx512bf16": hasattr(ops, "gemm_4bit_forward_kernel"),
        "kernels.bnb_int8_matmul": "torch._int_mm (AVX-512)" if avx512 else "bitsandbytes' default: int8 weights dequantized to float",
        "kernels.bnb_4bit_fused_cpu_kernel": fused,
    }


def transformers_facts() -> dict[str, Any]:
    """Whether transformers may put hub kernels in place of layers that ask for one (its use_kernels default)."""
    enabled = os.environ.get("USE_HUB_KERNELS", "1").upper() not in ("0", "FALSE", "NO", "OFF")
    kernels = importlib.util.find_spec("kernels") is not None
    return {"kernels.transformers_hub_kernels": ("on" if enabled and kernels else
                                                  "off: the kernels package is not installed" if enabled else
                                                  "off: USE_HUB_KERNELS")}


def describe() -> dict[str, Any]:
    """Every `kernels.*` machine fact, looked up once per process."""
    return memo(("kernel facts",), lambda: {**torch_facts(), **bitsandbytes_facts(), **transformers_facts()})
