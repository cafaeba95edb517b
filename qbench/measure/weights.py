"""Exact bytes of the loaded base, and a read-back of the format each linear really has."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from qbench.precisions import Precision


class FormatMismatch(RuntimeError):
    """The loaded model is not stored the way the precision's name says."""


def _tensor_key(tensor: torch.Tensor) -> tuple[int, int]:
    return (tensor.data_ptr(), tensor.nbytes)


def _quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor a bitsandbytes linear keeps beside its codes: absmax, nested absmax, code tables, offsets, row scales."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    tensors: list[torch.Tensor] = []
    if state is not None:  # Linear4bit
        tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
        nested = getattr(state, "state2", None)
        if nested is not None:
            tensors += [t for t in (nested.absmax, nested.code) if isinstance(t, torch.Tensor)]
    scb = getattr(weight, "SCB", None)
    if isinstance(scb, torch.Tensor):  # Linear8bitLt: one float32 scale per row
        tensors.append(scb)
    return tensors


def is_bnb_linear(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def quantized_param_count(module: nn.Module) -> int:
    """Number of weight values a bitsandbytes linear represents (not the number of packed bytes)."""
    state = getattr(module.weight, "quant_state", None)
    if state is not None:
        return int(torch.Size(state.shape).numel())
    return module.weight.numel()


def account_base(model: nn.Module) -> dict[str, Any]:
    """Bytes of parameters, buffers and quantization state of `model`, each stored tensor counted once.

    Splits the total into the quantized linears' codes, their quantization state, and what stays
    unquantized (embeddings, norms, biases, heads), and gives bits per quantized parameter.
    """
    seen: set[tuple[int, int]] = set()
    totals = Counter()

    def add(bucket: str, tensor: torch.Tensor) -> None:
        key = _tensor_key(tensor)
        if key not in seen:
            seen.add(key)
            totals[bucket] += tensor.nbytes

    quantized_params = 0
    for module in model.modules():
        if is_bnb_linear(module):
            add("codes", module.weight.data)
            for tensor in _quant_state_tensors(module):
                add("state", tensor)
            quantized_params += quantized_param_count(module)
            if module.bias is not None:
                add("unquantized", module.bias.data)
            continue
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            add("unquantized", tensor.data)

    unquantized_params = sum(
        p.numel() for m in model.modules() if not is_bnb_linear(m) for p in m.parameters(recurse=False)
    ) + sum(m.bias.numel() for m in model.modules() if is_bnb_linear(m) and m.bias is not None)
    quantized_bytes = totals["codes"] + totals["state"]
    return {
        "weights.base_bytes": totals["codes"] + totals["state"] + totals["unquantized"],
        "weights.quantized_codes_bytes": totals["codes"],
        "weights.quant_state_bytes": totals["state"],
        "weights.unquantized_bytes": totals["unquantized"],
        "weights.quantized_params": quantized_params,
        "weights.unquantized_params": unquantized_params,
        "weights.quantized_share_of_params": quantized_params / max(1, quantized_params + unquantized_params),
        "weights.bits_per_quantized_param": (8 * quantized_bytes / quantized_params) if quantized_params else None,
    }


def read_format(model: nn.Module) -> dict[str, Any]:
    """What the loaded model really holds: counts of bitsandbytes linears and their settings."""
    classes = Counter()
    quant_types, blocksizes, compressed = Counter(), Counter(), Counter()
    dense_linears = 0
    for module in model.modules():
        name = type(module).__name__
        if name == "Linear4bit":
            classes[name] += 1
            state = module.weight.quant_state
            quant_types[state.quant_type] += 1
            blocksizes[int(state.blocksize)] += 1
            compressed[bool(state.nested)] += 1
        elif name == "Linear8bitLt":
            classes[name] += 1
        elif isinstance(module, nn.Linear):
            dense_linears += 1
    return {
        "format.linear4bit_count": classes["Linear4bit"],
        "format.linear8bitlt_count": classes["Linear8bitLt"],
        "format.dense_linear_count": dense_linears,
        "format.quant_types": ",".join(sorted(quant_types)) or None,
        "format.blocksizes": ",".join(str(b) for b in sorted(blocksizes)) or None,
        "format.compressed_statistics": (",".join(str(c).lower() for c in sorted(compressed)) or None),
    }


def check_format(model: nn.Module, precision: Precision) -> None:
    """Raise FormatMismatch, naming the modules that disagree, unless the model is stored as `precision` says."""
    wrong: list[str] = []
    expected = precision.expected_linear_class
    found_expected = 0
    for name, module in model.named_modules():
        cls = type(module).__name__
        if is_bnb_linear(module):
            if cls != expected:
                wrong.append(f"{name} is {cls}, expected {expected or 'a dense Linear'}")
                continue
            found_expected += 1
            state = getattr(module.weight, "quant_state", None)
            if precision.kind == "4bit" and state is not None:
                if state.quant_type != precision.quant_type:
                    wrong.append(f"{name} has quant_type {state.quant_type}, expected {precision.quant_type}")
                if bool(state.nested) != precision.double_quant:
                    wrong.append(f"{name} has double quantization {'on' if state.nested else 'off'}, expected {'on' if precision.double_quant else 'off'}")
    if expected is not None and found_expected == 0:
        wrong.append(f"no {expected} module in the loaded model (the {precision.name} settings were not applied)")
    if wrong:
        shown = "; ".join(wrong[:5]) + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise FormatMismatch(f"loaded model does not match precision {precision.name!r}: {shown}")
