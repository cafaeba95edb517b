"""What the base really is once loaded, and again just before it trains: where it sits, its format read
back and checked, its exact bytes and dtypes, and how far its dequantized weights are from the checkpoint's."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qbench.contract.precisions import Precision
    from qbench.contract.suite import Suite


def inspect_base(model: torch.nn.Module, precision: Precision, suite: Suite, model_path: str,
                 fields: dict[str, Any], compute_dtype: str | None = None) -> None:
    """Add the loaded base's record fields to `fields` as they are read, so that when the base is not in the
    format its precision names (FormatMismatch is raised) what was read back stays in the record as evidence."""
    from qbench.cell import models
    from qbench.cell.measure import weight_error, weights

    fields.update(models.placement(model))
    fields["model.output_embeddings_tied"] = _head_tied(model)
    fields["bnb.cpu_weight_packing_disabled_layers"] = models.disable_bnb_cpu_weight_packing(model)
    fields.update(weights.read_format(model, "load"))
    fields.update(weights.account_base(model, "load"))
    weights.check_format(model, precision, _dtype(model, compute_dtype or suite.compute_dtype),  # the arm must be what its name says
                         llm_int8_threshold=suite.quantization.llm_int8_threshold)
    started = time.perf_counter()  # outside every phase: reading the originals is the harness's work
    fields.update(weight_error.measure(model, model_path, suite.model.revision))
    # within time.readback.wall_s (the pipeline times the whole read-back), so outside time.*: the time.*_s
    # figures sum to time.cell.wall_s
    fields["readback.weight_error_s"] = time.perf_counter() - started


def inspect_trained_base(model: torch.nn.Module, precision: Precision, suite: Suite, fields: dict[str, Any],
                         compute_dtype: str | None = None) -> None:
    """Read the base back after the prepare phase (k-bit preparation and LoRA attached), just before training:
    `weights.prepare.*` (bytes by kind and by dtype, and its linears, as `weights.load.*` at load); then fail
    with FormatMismatch, naming modules and dtypes, if the base is no longer in its precision's format (a
    preparation that cast a 16-bit base to float32 would otherwise train an fp32 arm under a bf16 label)."""
    from qbench.cell.measure import weights

    fields.update(weights.account_base(model, "prepare"))
    fields.update(weights.read_format(model, "prepare"))
    weights.check_format(model, precision, _dtype(model, compute_dtype or suite.compute_dtype),
                         stage=f'after the prepare phase (train.prepare = "{suite.train.prepare}")',
                         llm_int8_threshold=suite.quantization.llm_int8_threshold)


def _head_tied(model: torch.nn.Module) -> bool | None:
    """Whether the output head is the input embedding's tensor as loaded (a config's tie_word_embeddings says what
    was meant; a checkpoint that stores both keeps them apart), None for a model without both."""
    try:
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if head is None or embedding is None or not hasattr(head, "weight") or not hasattr(embedding, "weight"):
        return None
    return head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr()


def _dtype(model: torch.nn.Module, setting: str) -> str:
    """The compute dtype a setting means where the model sits ("auto": as a run decides it on that device)."""
    from qbench.machine.compute import resolve

    if setting != "auto":
        return setting
    return resolve(setting, next(iter(model.parameters())).device.type)


def kernel_paths(model: torch.nn.Module, precision: Precision, device: str) -> dict[str, Any]:
    """What this model's layers computed with (`kernels.*`, beside the machine's facts of qbench.machine.kernels):
    the attention implementation transformers chose, the layers that ask transformers for a hub kernel and how many
    of them run one, and for a 4-bit base on a CPU how its linears multiply: bitsandbytes dequantizes each weight
    and torch multiplies, unless its weights were repacked for the fused AVX512-BF16 kernel (qbench turns that
    repacking off: `bnb.cpu_weight_packing_disabled_layers`)."""
    from qbench.machine import kernels

    modules = list(model.modules())
    hub = [m for m in modules if getattr(m, "kernel_layer_name", None)]
    swapped = [m for m in hub if getattr(getattr(m, "forward", None), "__func__", None) is not type(m).forward]
    config = getattr(model, "config", None)
    fields: dict[str, Any] = {
        "kernels.attn_implementation": getattr(config, "_attn_implementation", None),
        "kernels.transformers_hub_layers": len(hub),
        "kernels.transformers_hub_layers_swapped": len(swapped),
        "kernels.bnb_4bit_packed_layers": None,
        "kernels.bnb_4bit_compute_dtypes": None,
        "kernels.bnb_4bit_matmul": None,
    }
    if precision.kind == "4bit":
        # bitsandbytes' own layers (peft's LoRA wrapper of one has the same class name)
        linears = [m for m in modules if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")]
        packed = sum(bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)) for m in linears)
        fields["kernels.bnb_4bit_packed_layers"] = packed
        # bitsandbytes switches a layer to its input's dtype at the first forward when that is float32 or bf16,
        # whatever bnb_4bit_compute_dtype said: the dtype each layer really computed in, once it has run
        ran = sorted({str(m.compute_dtype).removeprefix("torch.") for m in linears if getattr(m, "compute_dtype", None) is not None})
        fields["kernels.bnb_4bit_compute_dtypes"] = ",".join(ran) or None
        if not device.startswith("cpu"):
            fields["kernels.bnb_4bit_matmul"] = "bitsandbytes' CUDA kernels"
        elif packed:
            fused = kernels.describe().get("kernels.bnb_4bit_fused_cpu_kernel")
            fields["kernels.bnb_4bit_matmul"] = f"fused kernel on repacked weights in {packed} of {len(linears)} layers: {fused}"
        else:
            fields["kernels.bnb_4bit_matmul"] = "weights dequantized by bitsandbytes' CPU library, multiplied by torch"
    return fields
