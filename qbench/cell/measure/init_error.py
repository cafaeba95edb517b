"""How far the initialised adapter on its base is from the checkpoint, before any step: ‖W − (Q + B·A)‖ / ‖W‖.

For each LoRA layer W is the checkpoint's weight (float32), Q + B·A the weight the layer computes with as
initialised (merge.merged_weight: the dequantized stored base plus the scaled B·A, DoRA's magnitude
included). Beside it, the plain error of the same layer, ‖W − dequant(quant(W))‖ / ‖W‖: W stored in the arm's
precision as loading it would (bitsandbytes' own Params4bit / Int8Params, or the dense dtype), B·A = 0. An init
that recovers what quantization lost has the first below the second; `lora_init.recovered_share` says by how much
(1 − error / plain, over all layers; negative: the init is further from W than the plain quantized base).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qbench.cell import merge
from qbench.cell.measure.weight_error import CheckpointTensors, CheckpointUnavailable, safetensors_files
from qbench.contract.precisions import BNB_4BIT_BLOCKSIZE, Precision

DEFINITION = ("per LoRA layer: ||W - (Q + B·A)||_F / ||W||_F before training, W = checkpoint safetensors in float32, "
              "Q + B·A = the layer's merged weight as initialised; plain: ||W - dequant(quant(W))||_F / ||W||_F, "
              "W stored in the arm's precision as loading stores it")


def stored_as(weight: torch.Tensor, precision: Precision, compute_dtype: str) -> torch.Tensor:
    """`weight` stored in `precision` the way transformers + bitsandbytes store a checkpoint's weight on loading
    (cast to the storage dtype, then quantized by the same Params class), and read back in float32."""
    dtype = getattr(torch, precision.dense_dtype or compute_dtype)
    weight = weight.to(dtype)
    if precision.kind == "dense":
        return weight.float()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    if precision.kind == "int8":
        stored = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(weight.device)
        return bnbf.int8_vectorwise_dequant(stored.data, stored.SCB).float()
    stored = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type=precision.quant_type,
                               compress_statistics=precision.double_quant, blocksize=BNB_4BIT_BLOCKSIZE).to(weight.device)
    return bnbf.dequantize_4bit(stored.data, stored.quant_state).float()


def measure(model: Any, checkpoint: str, precision: Precision, compute_dtype: str, revision: str | None = None) -> dict[str, Any]:
    """`lora_init.*` (over every LoRA layer) and `per_layer.init_*` (in `per_layer.lora_modules` order)."""
    record: dict[str, Any] = {"lora_init.error_definition": DEFINITION}
    try:
        tensors = CheckpointTensors(safetensors_files(checkpoint, revision))
    except (CheckpointUnavailable, OSError) as error:
        record["lora_init.error_unavailable_reason"] = str(error)
        return record
    names: list[str] = []
    errors: list[float] = []
    plains: list[float] = []
    error_sq = plain_sq = norm_sq = 0.0
    with torch.no_grad():
        for name, layer in merge.lora_layers(model):
            key = tensors.find(merge.base_name(name))
            effective = merge.merged_weight(layer)
            original = tensors.get(key).to(device=effective.device, dtype=torch.float32) if key else None
            if original is None or original.shape != effective.shape:
                continue
            norm = float(torch.linalg.vector_norm(original))
            error = float(torch.linalg.vector_norm(original - effective))
            plain = float(torch.linalg.vector_norm(original - stored_as(original, precision, compute_dtype)))
            names.append(merge.base_name(name))
            errors.append(error / norm if norm else math.nan)
            plains.append(plain / norm if norm else math.nan)
            error_sq, plain_sq, norm_sq = error_sq + error**2, plain_sq + plain**2, norm_sq + norm**2
    if not names:
        record["lora_init.error_unavailable_reason"] = "no LoRA layer's weight found in the checkpoint under the same name and shape"
        return record
    overall, plain_overall = math.sqrt(error_sq / norm_sq), math.sqrt(plain_sq / norm_sq)
    record.update({
        "lora_init.error_rel_overall": overall,
        "lora_init.error_rel_mean": sum(errors) / len(errors),
        "lora_init.error_rel_max": max(errors),
        "lora_init.plain_error_rel_overall": plain_overall,
        "lora_init.recovered_share": 1 - overall / plain_overall if plain_overall else None,
        "lora_init.layers": len(names),
        "per_layer.lora_modules": names,
        "per_layer.init_error_rel": errors,
        "per_layer.init_plain_error_rel": plains,
    })
    return record
