"""Exact bytes of the loaded base, and a read-back of the format each linear really has."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from qbench.contract.precisions import BNB_4BIT_BLOCKSIZE, LLM_INT8_THRESHOLD, Precision


class FormatMismatch(RuntimeError):
    """The loaded model is not stored the way the precision's name says."""


# what stays unquantized, by the kind of module that owns it (record keys weights.<phase>.unquantized.<kind>_bytes)
UNQUANTIZED_KINDS = ("embedding", "norm", "dense_linear", "quantized_linear_bias", "conv", "other_param", "buffer")
# every tensor bitsandbytes keeps beside the codes (record keys weights.<phase>.quant_state.<kind>_bytes)
STATE_KINDS = ("absmax", "nested_absmax", "code_table", "nested_code_table", "offset", "row_scale")


def _tensor_key(tensor: torch.Tensor) -> tuple[Any, int, int]:
    return (tensor.device, tensor.data_ptr(), tensor.nbytes)


def quant_state_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(kind, tensor) for every tensor a bitsandbytes linear keeps beside its codes."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    tensors: list[tuple[str, Any]] = []
    if state is not None:  # Linear4bit: absmax per block (uint8 when nested), the 16-value code table, offset
        tensors += [("absmax", state.absmax), ("code_table", state.code), ("offset", getattr(state, "offset", None))]
        nested = getattr(state, "state2", None)
        if nested is not None:  # double quantization: float32 absmax per 256 blocks, 256-value code table
            tensors += [("nested_absmax", nested.absmax), ("nested_code_table", nested.code)]
    tensors.append(("row_scale", getattr(weight, "SCB", None)))  # Linear8bitLt: one float32 scale per row
    return [(kind, t) for kind, t in tensors if isinstance(t, torch.Tensor)]


def is_bnb_linear(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def quantized_param_count(module: nn.Module) -> int:
    """Number of weight values a bitsandbytes linear represents (not the number of packed bytes)."""
    state = getattr(module.weight, "quant_state", None)
    if state is not None:
        return int(torch.Size(state.shape).numel())
    return module.weight.numel()


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the frozen base only, as it was loaded: with LoRA attached (a peft model), the
    adapters (`lora_A`, `lora_B`, ...) are left out, each wrapper is replaced by the layer it wraps
    (`base_layer`) under the wrapped layer's own name; without LoRA, every module of `model`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = []
    for name, module in inner.named_modules():
        parts = name.split(".") if name else []
        if any(part.startswith("lora_") for part in parts):
            continue
        if isinstance(getattr(module, "base_layer", None), nn.Module):
            continue  # the adapter's wrapper: its `base_layer` child is the base's layer
        found.append((".".join(p for p in parts if p != "base_layer"), module))
    return found


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _module_kind(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.Embedding) or name.endswith(("Embedding", "Embeddings")):
        return "embedding"
    if "Norm" in name:
        return "norm"
    if isinstance(module, nn.Linear):
        return "dense_linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    return "other_param"


def account_base(model: nn.Module, phase: str = "load") -> dict[str, Any]:
    """Bytes of parameters, buffers and quantization state of `model`, each stored tensor counted once, as
    `weights.<phase>.*` (the base as phase `phase` left it: load, prepare).

    Splits the total into the quantized linears' codes, their quantization state (by kind), and what
    stays unquantized (by the kind of module holding it), gives bits per quantized parameter, and the
    same total by dtype (`weights.<phase>.dtype.<dtype>_bytes`, e.g. uint8 codes, bfloat16 norms). With LoRA
    attached, only the base is counted (`base_modules`).
    """
    seen: set[tuple[Any, int, int]] = set()
    totals: Counter[str] = Counter()
    by_dtype: Counter[str] = Counter()
    unquantized_dtypes: Counter[str] = Counter()

    def add(bucket: str, tensor: torch.Tensor) -> bool:
        """Count a tensor's bytes once, however many modules share it (tied embeddings and heads)."""
        key = _tensor_key(tensor)
        if key in seen:
            return False
        seen.add(key)
        totals[bucket] += tensor.nbytes
        by_dtype[_dtype_name(tensor)] += tensor.nbytes
        if bucket.startswith("unquantized.") and bucket != "unquantized.buffer":
            unquantized_dtypes[_dtype_name(tensor)] += tensor.nbytes
        return True

    quantized_params = unquantized_params = 0
    for _, module in base_modules(model):
        if is_bnb_linear(module):
            add("codes", module.weight.data)
            for kind, tensor in quant_state_tensors(module):
                add(f"state.{kind}", tensor)
            quantized_params += quantized_param_count(module)
            if module.bias is not None and add("unquantized.quantized_linear_bias", module.bias.data):
                unquantized_params += module.bias.numel()
            for buffer in module.buffers(recurse=False):
                add("unquantized.buffer", buffer)
            continue
        kind = _module_kind(module)
        for parameter in module.parameters(recurse=False):
            if add(f"unquantized.{kind}", parameter.data):
                unquantized_params += parameter.numel()
        for buffer in module.buffers(recurse=False):
            add("unquantized.buffer", buffer)

    state_bytes = sum(totals[f"state.{k}"] for k in STATE_KINDS)
    unquantized_bytes = sum(totals[f"unquantized.{k}"] for k in UNQUANTIZED_KINDS)
    base_bytes = totals["codes"] + state_bytes + unquantized_bytes
    params = quantized_params + unquantized_params
    figures: dict[str, Any] = {
        "base_bytes": base_bytes,
        "quantized_codes_bytes": totals["codes"],
        "quant_state_bytes": state_bytes,
        "unquantized_bytes": unquantized_bytes,
        "params": params,
        "quantized_params": quantized_params,
        "unquantized_params": unquantized_params,
        "quantized_share_of_params": quantized_params / max(1, params),
        "unquantized_share_of_bytes": unquantized_bytes / base_bytes if base_bytes else None,
        "bits_per_quantized_param": (8 * (totals["codes"] + state_bytes) / quantized_params) if quantized_params else None,
        "bits_per_param": 8 * (base_bytes - totals["unquantized.buffer"]) / params if params else None,
        "unquantized_param_dtypes": _joined(unquantized_dtypes),
    }
    figures.update({f"dtype.{name}_bytes": size for name, size in sorted(by_dtype.items())})
    figures.update({f"quant_state.{k}_bytes": totals[f"state.{k}"] for k in STATE_KINDS})
    figures.update({f"unquantized.{k}_bytes": totals[f"unquantized.{k}"] for k in UNQUANTIZED_KINDS})
    return {f"weights.{phase}.{key}": value for key, value in figures.items()}


def _joined(counter: Counter) -> str | None:
    return ",".join(str(k).lower() for k in sorted(counter, key=str)) or None


def read_format(model: nn.Module, phase: str = "load") -> dict[str, Any]:
    """What the model really holds as phase `phase` left it: counts of bitsandbytes linears and their settings
    (`weights.<phase>.linears.*`)."""
    classes: Counter[str] = Counter()
    quant_types, blocksizes, compressed, compute_dtypes, thresholds = Counter(), Counter(), Counter(), Counter(), Counter()
    dense_dtypes: Counter[str] = Counter()
    dense_linears = 0
    for _, module in base_modules(model):
        name = type(module).__name__
        if name == "Linear4bit":
            classes[name] += 1
            state = module.weight.quant_state
            quant_types[state.quant_type] += 1
            blocksizes[int(state.blocksize)] += 1
            compressed[bool(state.nested)] += 1
            compute_dtypes[str(module.compute_dtype).removeprefix("torch.")] += 1
        elif name == "Linear8bitLt":
            classes[name] += 1
            thresholds[float(module.state.threshold)] += 1
        elif isinstance(module, nn.Linear):
            dense_linears += 1
            dense_dtypes[str(module.weight.dtype).removeprefix("torch.")] += 1
    prefix = f"weights.{phase}.linears."
    return {
        prefix + "linear4bit_count": classes["Linear4bit"],
        prefix + "linear8bitlt_count": classes["Linear8bitLt"],
        prefix + "dense_linear_count": dense_linears,
        prefix + "quant_types": _joined(quant_types),
        prefix + "blocksizes": _joined(blocksizes),
        prefix + "compressed_statistics": _joined(compressed),
        prefix + "compute_dtypes": _joined(compute_dtypes),
        prefix + "int8_thresholds": _joined(thresholds),
        prefix + "dense_linear_dtypes": _joined(dense_dtypes),
    }


def _kept_dense(model: nn.Module) -> list[str]:
    """Modules transformers keeps unquantized on purpose (output head, tied and last modules, llm_int8_skip_modules)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer, "modules_to_not_convert", None) is not None:
        return list(quantizer.modules_to_not_convert)
    try:  # loaded without a quantizer: what transformers would have skipped
        from transformers.quantizers.base import get_keys_to_not_convert

        return list(get_keys_to_not_convert(model))
    except Exception:
        return []


def _is_kept_dense(name: str, patterns: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return not should_convert_module(name, patterns)
    except ImportError:
        return any(name == p or name.endswith("." + p) for p in patterns)


def check_format(model: nn.Module, precision: Precision, compute_dtype: str | None = None, stage: str = "loaded",
                 llm_int8_threshold: float = LLM_INT8_THRESHOLD) -> None:
    """Raise FormatMismatch, naming the modules that disagree, unless the model is stored as `precision` says.

    For a quantized precision every linear must be the precision's bitsandbytes class with its
    settings (quant type, double quantization, blocksize, compute dtype, LLM.int8 threshold), except
    the modules transformers keeps dense on purpose; for a dense precision no linear may be quantized
    and every linear weight must have the precision's dtype. With LoRA attached only the base is
    checked (`base_modules`). `stage` says when, in the message ("loaded", "after the prepare phase").
    """
    wrong: list[str] = []
    expected = precision.expected_linear_class
    kept_dense = _kept_dense(model.get_base_model() if hasattr(model, "get_base_model") else model) if expected is not None else []
    dense_dtype = precision.dense_dtype or compute_dtype or "bfloat16"
    for name, module in base_modules(model):
        cls = type(module).__name__
        if is_bnb_linear(module):
            if cls != expected:
                wrong.append(f"{name} is {cls}, expected {expected or 'a dense Linear'}")
                continue
            state = getattr(module.weight, "quant_state", None)
            if precision.kind == "4bit" and state is not None:
                if state.quant_type != precision.quant_type:
                    wrong.append(f"{name} has quant_type {state.quant_type}, expected {precision.quant_type}")
                if bool(state.nested) != precision.double_quant:
                    wrong.append(f"{name} has double quantization {'on' if state.nested else 'off'}, expected {'on' if precision.double_quant else 'off'}")
                if int(state.blocksize) != BNB_4BIT_BLOCKSIZE:
                    wrong.append(f"{name} has blocksize {state.blocksize}, expected {BNB_4BIT_BLOCKSIZE}")
                if compute_dtype is not None and module.compute_dtype != getattr(torch, compute_dtype):
                    wrong.append(f"{name} computes in {module.compute_dtype}, expected torch.{compute_dtype}")
            if precision.kind == "int8" and float(module.state.threshold) != llm_int8_threshold:
                wrong.append(f"{name} has LLM.int8 threshold {module.state.threshold}, expected {llm_int8_threshold}")
        elif isinstance(module, nn.Linear):
            if expected is not None and not _is_kept_dense(name, kept_dense):
                wrong.append(f"{name} is {cls}, expected {expected}")
            elif expected is None and str(module.weight.dtype).removeprefix("torch.") != dense_dtype:
                wrong.append(f"{name} stores {module.weight.dtype}, expected torch.{dense_dtype}")
    if wrong:
        shown = "; ".join(wrong[:5]) + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise FormatMismatch(f"{stage} model does not match precision {precision.name!r} ({len(wrong)} modules disagree): {shown}"
                             if stage == "loaded" else
                             f"the base {stage} does not match precision {precision.name!r} ({len(wrong)} modules disagree): {shown}")
